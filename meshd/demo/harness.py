"""Start meshd, apps and sidecars as real processes on loopback; used by the demo and the tests.

``MeshHarness(workdir)`` hands out free loopback ports, writes sidecar bootstrap files, starts
``meshd serve``, the demo apps and ``mesh-sidecar run`` with ``sys.executable -m`` (no PATH
assumptions), waits for readiness by polling HTTP endpoints with deadlines, and stops every
process it started on ``close()`` (SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STOP_GRACE = 3.0      # seconds between SIGTERM and SIGKILL
READY_TIMEOUT = 20.0  # seconds


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the ephemeral range, so that no outgoing connection of this
    busy host takes it between this check and the process that binds it."""
    high = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE) -> None:
    """SIGTERM every process still running, SIGKILL those left after ``grace`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(check: Callable[[], bool], timeout: float, what: str, period: float = 0.05) -> float:
    """Poll ``check`` until true; returns seconds waited; raises TimeoutError naming ``what``."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(period)


@dataclass
class Sidecar:
    name: str
    service: str
    app_port: int
    inbound: int
    outbound: int
    admin: int
    config: Path
    labels: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mtls_mode: str = "PERMISSIVE"


class MeshHarness:
    def __init__(self, workdir: Path, ttl: float = 3.0, drain: float = 0.5) -> None:
        self.workdir = workdir
        self.ttl = ttl
        self.drain = drain
        self.meshd_port = free_port()
        self.meshd_addr = f"http://127.0.0.1:{self.meshd_port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sidecars: dict[str, Sidecar] = {}
        self.meshd: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(timeout=10.0)
        self.token = ""

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None,
               ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=log,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_meshd(self, token: str = "", *extra: str) -> None:
        """Start ``meshd serve``, requiring operator ``token`` on its API if given. Sidecars get
        their own join tokens (``POST /v1/tokens``) in their bootstrap files."""
        self.token = token
        if token:
            self.http.headers["authorization"] = f"Bearer {token}"
        self.meshd = self._spawn("meshd", ["meshd.cli.main", "serve", "--listen",
                                           f"127.0.0.1:{self.meshd_port}", "--data-dir",
                                           str(self.workdir / "meshd-data"), "--log-level", "warning",
                                           *extra],
                                 {"MESHD_TOKEN": token})
        wait_until(lambda: self.http.get(f"{self.meshd_addr}/healthz").status_code == 200,
                   READY_TIMEOUT, "meshd /healthz")

    def stop_meshd(self, sig: int = signal.SIGKILL) -> None:
        assert self.meshd is not None
        self.meshd.send_signal(sig)
        self.meshd.wait(timeout=10)

    def start_app(self, name: str, app: str, port: int, env: dict[str, str] | None = None,
                  **opts: str) -> subprocess.Popen[bytes]:
        extra = [a for k, v in opts.items() for a in (f"--{k}", v)]
        return self._spawn(name, ["meshd.demo.apps", app, "--port", str(port), *extra], env)

    def add_service(self, name: str, service: str, app: str | None = None,
                    labels: dict[str, str] | None = None, mtls_mode: str = "PERMISSIVE",
                    **app_opts: str) -> Sidecar:
        """Start ``app`` (a demo app name, ``"httpbin"``, or none) and its sidecar.

        ``app_opts`` become ``--key value`` options of the demo app (e.g. status="500")."""
        sc = Sidecar(name, service, free_port(), free_port(), free_port(), free_port(),
                     self.workdir / f"{name}.toml", dict(labels or {}), mtls_mode=mtls_mode)
        sc.config.write_text(self._bootstrap(sc))
        proxy_env = {"HTTP_PROXY": f"http://127.0.0.1:{sc.outbound}", "NO_PROXY": ""}
        if app == "httpbin":
            sc.procs.append(self._spawn(f"{name}-app", ["httpbin.core", "--port", str(sc.app_port),
                                                        "--host", "127.0.0.1"]))
        elif app is not None:
            version = sc.labels.get("version", "v1")
            sc.procs.append(self.start_app(f"{name}-app", app, sc.app_port, proxy_env,
                                           version=version, instance=name, **app_opts))
        sc.procs.append(self._spawn(name, ["sidecar.main", "run", "--config", str(sc.config),
                                           "--log-level", "warning"]))
        self.sidecars[name] = sc
        return sc

    def _bootstrap(self, sc: Sidecar) -> str:
        labels = ", ".join(f'{k} = "{v}"' for k, v in sc.labels.items())
        return (f'service = "{sc.service}"\ninstance_id = "{sc.name}"\n'
                f"labels = {{ {labels} }}\napp_port = {sc.app_port}\n"
                f"inbound_port = {sc.inbound}\noutbound_port = {sc.outbound}\n"
                f'admin_port = {sc.admin}\nmeshd_addr = "{self.meshd_addr}"\n'
                f'data_dir = "{self.workdir / sc.name}"\nttl = {self.ttl}\n'
                f'drain_seconds = {self.drain}\ntoken = "{self.join_token(sc.service)}"\n'
                f'mtls_mode = "{sc.mtls_mode}"\n')

    def join_token(self, service: str, namespace: str = "default") -> str:
        """A fresh join token for ``service`` from meshd (needs meshd running)."""
        resp = self.api("POST", "/v1/tokens", json={"service": service, "namespace": namespace})
        resp.raise_for_status()
        return str(resp.json()["token"])

    def wait_app(self, name: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the app of ``name`` accepts connections on its port."""
        port = self.sidecars[name].app_port

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_until(up, timeout, f"app of {name} on port {port}")

    def restart_sidecar(self, name: str) -> None:
        sc = self.sidecars[name]
        proc = sc.procs.pop()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        sc.procs.append(self._spawn(name, ["sidecar.main", "run", "--config", str(sc.config),
                                           "--log-level", "warning"]))

    def stop(self, name: str, sig: int = signal.SIGTERM) -> float:
        """Signal an instance's sidecar (last process) and wait; returns seconds until exit."""
        proc = self.sidecars[name].procs[-1]
        start = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        return time.monotonic() - start

    def kill(self, name: str) -> None:
        """SIGKILL an instance's app and sidecar (no deregistration: the TTL must expire it)."""
        for proc in self.sidecars[name].procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def admin_json(self, name: str, path: str) -> dict[str, object]:
        resp = self.http.get(f"http://127.0.0.1:{self.sidecars[name].admin}{path}")
        return dict(resp.json())

    def wait_ready(self, names: list[str] | None = None, timeout: float = READY_TIMEOUT) -> None:
        for name in names or list(self.sidecars):
            port = self.sidecars[name].admin
            wait_until(lambda p=port: self.http.get(f"http://127.0.0.1:{p}/ready").status_code
                       == 200, timeout, f"sidecar {name} /ready")

    def wait_certs(self, *names: str, timeout: float = 15.0) -> None:
        """Wait until each named sidecar (default: all) holds a workload certificate."""
        for name in names or list(self.sidecars):
            wait_until(lambda n=name: self.admin_json(n, "/certs")["identity"]["serial"] != "",  # type: ignore[index]
                       timeout, f"{name} certificate")

    def api(self, method: str, path: str, **kw: object) -> httpx.Response:
        return self.http.request(method, f"{self.meshd_addr}{path}", **kw)  # type: ignore[arg-type]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the ``meshd`` CLI against this mesh's controller."""
        return subprocess.run([sys.executable, "-m", "meshd.cli.main", "--addr", self.meshd_addr,
                               *args], capture_output=True, text=True, timeout=30)

    def push_rules(self, text: str, name: str = "") -> subprocess.CompletedProcess[str]:
        """``meshd rule push`` of ``text`` (written to the work dir as ``name``), then wait until
        every sidecar is SYNCED; AssertionError with the CLI's output if the push is refused."""
        path = self.workdir / (name or f"rules-{time.monotonic_ns()}.toml")
        path.write_text(text)
        out = self.cli("rule", "push", str(path))
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_synced()
        return out

    def proxy_status(self) -> list[dict[str, object]]:
        return list(self.api("GET", "/v1/proxy-status").json()["proxies"])

    def synced(self, names: list[str] | None = None) -> bool:
        wanted = set(names or self.sidecars)
        rows = [r for r in self.proxy_status() if r["node"] in wanted]
        return len(rows) == len(wanted) and all(r["state"] == "SYNCED" for r in rows)

    def wait_synced(self, names: list[str] | None = None, timeout: float = READY_TIMEOUT) -> float:
        return wait_until(lambda: self.synced(names), timeout, "all sidecars SYNCED")

    def close(self) -> None:
        stop_processes(self.procs)
        self.http.close()
