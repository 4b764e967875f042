"""The sidecar's bootstrap file (TOML) — everything it needs before meshd answers.

Example (documented in ``docs/sidecar.md``)::

    service = "svcb"                 # required: the mesh host other services call
    instance_id = "svcb-1"           # default: <service>-<hostname>-<inbound_port>
    namespace = "default"
    labels = { version = "v1" }
    app_port = 8080                  # required: the local app
    inbound_port = 15006             # Istio's inbound capture port
    outbound_port = 15001            # Istio's outbound port (HTTP_PROXY target)
    admin_port = 15000               # Envoy admin port
    advertise_address = "127.0.0.1"  # how other sidecars reach the inbound listener
    meshd_addr = "http://127.0.0.1:15010"
    token = ""                       # join token (meshd token create); MESH_JOIN_TOKEN overrides
    token_file = ""                  # or a file with it (used when token is empty); MESH_JOIN_TOKEN_FILE
    mtls_mode = "PERMISSIVE"         # inbound: STRICT | PERMISSIVE | DISABLE (Istio PeerAuthentication)
    data_dir = "/var/lib/mesh-sidecar"   # last good snapshot cache
    ttl = 10.0                       # registry lease, seconds; heartbeat every ttl/3
    app_protocol = ""                # http | http2 | grpc | tcp; "" = detect from the first bytes

    [registry]                       # where to register (default: meshd's built-in registry)
    kind = "etcd"                    # meshd | consul | eureka | etcd (registry.config.RegistrarConfig)
    endpoints = ["http://127.0.0.1:2379"]

    [[upstreams]]                    # localhost port for a mesh service (Consul local_bind_port)
    service = "db"
    local_port = 15432               # the app connects to 127.0.0.1:15432

    [limits]                         # HTTP/1.1 server limits of every listener (ServerLimits)
    header_timeout = 10.0            # seconds for a whole request head (slowloris)
    max_connections = 10000          # open connections per listener; more are closed at once

``MESHD_ADDR`` and ``MESH_JOIN_TOKEN`` in the environment override ``meshd_addr``/``token``
(as ``CONSUL_HTTP_ADDR``/``CONSUL_HTTP_TOKEN`` do; ``MESHD_TOKEN`` stays the operator's).
Errors: ``ConfigError`` with file, line, field.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from meshd.errors import ConfigError
from meshd.rules.locate import convert_located, line_of
from registry.config import RegistrarConfig
from sidecar.http.limits import ServerLimits, server_limits

DEFAULT_INBOUND_PORT = 15006   # Istio inbound capture port
DEFAULT_OUTBOUND_PORT = 15001  # Istio outbound capture port
DEFAULT_ADMIN_PORT = 15000     # Envoy/Istio admin port
DEFAULT_MESHD_ADDR = "http://127.0.0.1:15010"
DEFAULT_TTL = 10.0             # seconds
DEFAULT_DRAIN = 5.0            # seconds; Envoy drain_timeout default


class Upstream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A localhost port for one mesh service (Consul ``upstreams``: ``destination_name``,
    ``local_bind_port``): the sidecar listens on ``local_address:local_port`` and sends what
    arrives to ``service`` — as TCP, or as HTTP when the service is declared or detected HTTP.
    ``port`` is the service port the app means (matched by tcp routes' ``port``; 0 = local_port)."""

    service: str
    local_port: int
    port: int = 0
    local_address: str = "127.0.0.1"


APP_PROTOCOLS = ("", "http", "http2", "grpc", "tcp")  # registry Instance.protocol values


class Bootstrap(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    service: str
    app_port: int
    instance_id: str = ""
    namespace: str = "default"
    labels: dict[str, str] = {}
    app_address: str = "127.0.0.1"
    inbound_port: int = DEFAULT_INBOUND_PORT
    inbound_address: str = "0.0.0.0"
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    outbound_address: str = "127.0.0.1"
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_address: str = "127.0.0.1"
    advertise_address: str = "127.0.0.1"
    meshd_addr: str = DEFAULT_MESHD_ADDR
    token: str = ""
    token_file: str = ""  # file holding the join token (0600; systemd credential, compose secret)
    data_dir: str = "/var/lib/mesh-sidecar"
    ttl: float = DEFAULT_TTL
    drain_seconds: float = DEFAULT_DRAIN
    mtls_mode: Literal["STRICT", "PERMISSIVE", "DISABLE"] = "PERMISSIVE"  # Istio's default
    meshd_ca_file: str = ""  # PEM that signs meshd's HTTPS certificate (https meshd_addr)
    app_protocol: str = ""  # the app port's protocol: http | http2 | grpc | tcp ("" = detect)
    upstreams: list[Upstream] = []  # localhost ports for mesh services (Consul local_bind_port)
    registry: RegistrarConfig = RegistrarConfig()  # where this instance registers ([registry])
    # [limits]: ServerLimits fields (sidecar.http.limits), checked by server_limits at parse time
    limits: dict[str, int | float] = {}

    @property
    def node(self) -> str:
        return self.instance_id

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{self.service}"

    def server_limits(self) -> ServerLimits:
        """The HTTP/1.1 server limits of every listener: defaults with ``[limits]`` applied."""
        return server_limits(self.limits)


def _check(b: Bootstrap) -> list[tuple[str, str]]:
    problems = []
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", b.service):
        problems.append(("service", "must be a lower-case DNS name"))
    for field in ("app_port", "inbound_port", "outbound_port", "admin_port"):
        port = getattr(b, field)
        if not 0 <= port < 65536 or (field == "app_port" and port == 0):
            problems.append((field, "must be a port within 1..65535"))
    if not b.meshd_addr.startswith(("http://", "https://")):
        problems.append(("meshd_addr", "must start with http:// or https://"))
    if not 1.0 <= b.ttl <= 3600:
        problems.append(("ttl", "must be within 1..3600 seconds"))
    if b.app_protocol not in APP_PROTOCOLS:
        problems.append(("app_protocol", f"must be one of {', '.join(APP_PROTOCOLS[1:])} (or empty)"))
    return problems


def _check_upstreams(b: Bootstrap) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    taken = {b.inbound_port: "inbound_port", b.outbound_port: "outbound_port", b.admin_port: "admin_port"}
    for i, up in enumerate(b.upstreams):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", up.service):
            problems.append((("upstreams", i, "service"), "must be a lower-case DNS name"))
        if not 0 < up.local_port < 65536:
            problems.append((("upstreams", i, "local_port"), "must be a port within 1..65535"))
        elif up.local_port in taken:
            problems.append((("upstreams", i, "local_port"), f"port {up.local_port} is already "
                             f"used by {taken[up.local_port]}"))
        taken[up.local_port] = f"upstreams[{i}]"
        if not 0 <= up.port < 65536:
            problems.append((("upstreams", i, "port"), "must be a port within 1..65535 (or 0)"))
    return problems


def parse(text: str, file: str = "<bootstrap>", env: dict[str, str] | None = None) -> Bootstrap:
    """Parse and check a bootstrap; environment overrides applied; raises ConfigError."""
    env = dict(os.environ) if env is None else env
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(str(exc), file=file, line=int(m.group(1)) if m else 0) from exc
    if isinstance(data.get("limits"), dict):  # before msgspec: errors name limits.<field>
        _check_limits(data["limits"], file, text)
    boot = convert_located(data, text, file, Bootstrap)
    problems = _check(boot)
    if problems:
        field, reason = problems[0]
        raise ConfigError(reason, file=file, line=line_of(text, (field,)), field=field)
    for path, reason in _check_upstreams(boot)[:1]:
        raise ConfigError(reason, file=file, line=line_of(text, path),
                          field=".".join(str(p) for p in path))
    changes: dict[str, object] = {}
    if not boot.instance_id:
        changes["instance_id"] = f"{boot.service}-{socket.gethostname()}-{boot.inbound_port}"
    if env.get("MESHD_ADDR"):
        changes["meshd_addr"] = env["MESHD_ADDR"]
    if env.get("MESH_JOIN_TOKEN"):
        changes["token"] = env["MESH_JOIN_TOKEN"]
    if env.get("MESH_JOIN_TOKEN_FILE"):
        changes["token_file"] = env["MESH_JOIN_TOKEN_FILE"]
    token_file = str(changes.get("token_file", boot.token_file))
    if token_file and not changes.get("token", boot.token):
        changes["token"] = _read_token(token_file, file, text)
    return msgspec.structs.replace(boot, **changes) if changes else boot


def _check_limits(table: dict[str, object], file: str, text: str) -> None:
    """``ConfigError`` naming ``limits.<field>`` (and its line) for an unknown limit, a wrong
    type or a value that is not > 0 (``sidecar.http.limits.server_limits``)."""
    try:
        server_limits(table)
    except ConfigError as exc:
        path = tuple(exc.field.split("."))
        raise ConfigError(exc.reason, file=file, line=line_of(text, path), field=exc.field) from None


def _read_token(path: str, file: str, text: str) -> str:
    """The join token in ``path`` (surrounding whitespace stripped); ConfigError if unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token_file {path}: {exc.strerror}", file=file,
                          line=line_of(text, ("token_file",)), field="token_file") from exc


def load(path: str | Path, env: dict[str, str] | None = None) -> Bootstrap:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read bootstrap: {exc.strerror}", file=str(path)) from exc
    return parse(text, str(path), env)
