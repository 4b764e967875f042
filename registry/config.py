"""``meshd.toml``: which discovery sources meshd runs and how it merges them.

Example (documented in ``docs/registries.md``)::

    [merge]                       # optional; the mass-disappearance guard (registry.guard)
    max_removal_share = 0.5       # withhold an update removing more than this share at once
    guard_hold = 30.0             # seconds a withheld removal must persist before it applies
    guard_min_removed = 2         # a single removal is never withheld

    [[sources]]
    kind = "builtin"              # meshd's own registry (sidecars register over the API)

    [[sources]]
    kind = "docker"
    name = "docker"               # default: the kind; unique per meshd
    network = "app_default"       # whose IP to use (default: the only or first network)

    [[sources]]
    kind = "etcd"
    endpoints = ["http://127.0.0.1:2379"]
    prefix = "/meshd/services/"

    [[sources]]
    kind = "static"
    path = "/etc/meshd/static.toml"

    [[sources]]
    kind = "consul"
    address = "http://127.0.0.1:8500"

    [[sources]]
    kind = "eureka"
    address = "http://127.0.0.1:8761/eureka"

Without a ``meshd.toml`` meshd runs the built-in registry alone. Errors are ``ConfigError``
with ``file:line: field: reason`` (``toml_struct`` is shared with the static source and the
sidecar's registry bootstrap).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from meshd.errors import ConfigError
from meshd.rules.locate import convert_located, line_of
from registry.guard import GUARD_HOLD, MAX_REMOVAL_SHARE, MIN_REMOVED, GuardPolicy

T = TypeVar("T")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DOCKER_SOCKET = "unix:///var/run/docker.sock"  # docker.from_env() default
ETCD_ENDPOINT = "http://127.0.0.1:2379"        # etcd's default client URL
ETCD_PREFIX = "/meshd/services/"
EUREKA_URL = "http://127.0.0.1:8761/eureka"     # Spring Cloud Netflix default
STATIC_POLL = 1.0                               # seconds between mtime checks
PROTOCOLS = ("", "http", "http2", "grpc", "tcp")  # Instance.protocol values ("" = undeclared)


class _Source(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind"):
    name: str = ""

    @property
    def source_name(self) -> str:
        return self.name or str(type(self).__struct_config__.tag)


class BuiltinSource(_Source, tag="builtin"):
    pass


class DockerSource(_Source, tag="docker"):
    host: str = DOCKER_SOCKET     # unix:///path or http://host:port (DOCKER_HOST syntax)
    network: str = ""             # "" = the container's only network (first by name if several)
    label_prefix: str = "mesh."


class EtcdSource(_Source, tag="etcd"):
    endpoints: list[str] = msgspec.field(default_factory=lambda: [ETCD_ENDPOINT])
    prefix: str = ETCD_PREFIX


class StaticSource(_Source, tag="static"):
    path: str = ""
    poll_interval: float = STATIC_POLL


class ConsulSource(_Source, tag="consul"):
    address: str = ""             # "" = CONSUL_HTTP_ADDR, else http://127.0.0.1:8500
    token: str = ""               # "" = CONSUL_HTTP_TOKEN
    datacenter: str = ""          # "" = the agent's
    services: list[str] | None = None  # None = every service in the catalog
    wait: float = 300.0           # seconds; Consul's default blocking wait


class EurekaSource(_Source, tag="eureka"):
    address: str = EUREKA_URL     # with its prefix: .../eureka or .../eureka/v2
    poll: float = 30.0            # seconds; Netflix registryFetchIntervalSeconds


SourceConfig = BuiltinSource | DockerSource | EtcdSource | StaticSource | ConsulSource | EurekaSource


class MergeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_removal_share: float = MAX_REMOVAL_SHARE
    guard_hold: float = GUARD_HOLD
    guard_min_removed: int = MIN_REMOVED

    @property
    def policy(self) -> GuardPolicy:
        return GuardPolicy(self.max_removal_share, self.guard_hold, self.guard_min_removed)


class RegistrarConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A sidecar's ``[registry]`` table: where it registers its own instance.

    ``kind``: "meshd" (the built-in registry over meshd's API, default), "consul" (agent
    service + TTL check; ``address``, ``token``), "eureka" (``address`` with prefix, ``app``),
    "etcd" (``endpoints``, ``prefix``; key on a lease of the bootstrap's ``ttl``)."""

    kind: Literal["meshd", "consul", "eureka", "etcd"] = "meshd"
    address: str = ""                 # consul: "" = CONSUL_HTTP_ADDR; eureka: "" = EUREKA_URL
    token: str = ""                   # consul ACL token ("" = CONSUL_HTTP_TOKEN)
    app: str = ""                     # eureka application name ("" = service upper-cased)
    endpoints: list[str] = msgspec.field(default_factory=lambda: [ETCD_ENDPOINT])
    prefix: str = ETCD_PREFIX


class MeshdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sources: list[SourceConfig] = msgspec.field(default_factory=lambda: [BuiltinSource()])
    merge: MergeConfig = MergeConfig()


def toml_struct(text: str, file: str, typ: type[T]) -> T:
    """Parse TOML ``text`` into ``typ``; ConfigError with file, line and dotted field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(str(exc), file=file, line=int(m.group(1)) if m else 0) from exc
    return convert_located(data, text, file, typ)


def _check(cfg: MeshdConfig, text: str, file: str) -> None:
    seen: set[str] = set()
    for n, src in enumerate(cfg.sources):
        name = src.source_name

        def bad(field: str, reason: str, n: int = n) -> ConfigError:
            return ConfigError(reason, file=file, line=line_of(text, ("sources", n, field)),
                               field=f"sources.{n}.{field}")

        if not _NAME_RE.fullmatch(name):
            raise bad("name", "must be lower-case letters, digits and '-'")
        if name in seen:
            raise bad("name", f"source name {name!r} is used twice (set name = ...)")
        seen.add(name)
        if isinstance(src, StaticSource) and not src.path:
            raise bad("path", "a static source needs path = the instances TOML file")
        if isinstance(src, StaticSource) and not src.poll_interval > 0:
            raise bad("poll_interval", "must be > 0 seconds")
        if isinstance(src, EtcdSource) and (not src.endpoints or not src.prefix.endswith("/")):
            raise bad("prefix" if src.endpoints else "endpoints",
                      "needs at least one endpoint and a prefix ending in '/'")
    m = cfg.merge
    for field, ok in (("max_removal_share", 0.0 < m.max_removal_share <= 1.0),
                      ("guard_hold", m.guard_hold >= 0), ("guard_min_removed", m.guard_min_removed >= 1)):
        if not ok:
            raise ConfigError("out of range (share in (0, 1], hold >= 0, min_removed >= 1)",
                              file=file, line=line_of(text, ("merge", field)), field=f"merge.{field}")


def parse(text: str, file: str = "meshd.toml") -> MeshdConfig:
    cfg = toml_struct(text, file, MeshdConfig)
    _check(cfg, text, file)
    return cfg


def load(path: str | Path) -> MeshdConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from exc
    cfg = parse(text, str(path))
    base = Path(path).parent  # a relative static path is relative to meshd.toml
    sources = [msgspec.structs.replace(s, path=str(base / s.path))
               if isinstance(s, StaticSource) and not Path(s.path).is_absolute() else s
               for s in cfg.sources]
    return msgspec.structs.replace(cfg, sources=sources)

