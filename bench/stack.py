"""The processes under test, all on 127.0.0.1: origin (nginx), HAProxy, meshd and two sidecars.

* origin: nginx in the foreground (``daemon off; master_process off; worker_processes 1``)
  answering ``return 200 "<body>"``; if nginx is missing or fails to start,
  ``tiny_origin.py`` (asyncio) instead. It listens on two ports: one for the direct and
  HAProxy paths, one as the origin sidecar's ``app_port``.
* HAProxy: ``nbthread 1``, ``mode http``, ``http-reuse always``, keep-alive, no logs.
* mesh: ``MeshHarness`` starts ``meshd serve`` and two sidecars, ``origin`` (inbound ->
  nginx) and ``client`` (its outbound routes ``Host: origin`` to the origin sidecar).

Every process gets its own session (Ctrl-C in the terminal does not reach it) and a log file
in the work directory; ``close()`` sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from meshd.demo.harness import MeshHarness, Sidecar, free_port, stop_processes, wait_until

HERE = Path(__file__).resolve().parent
STOP_GRACE = 3.0     # seconds between SIGTERM and SIGKILL
START_TIMEOUT = 20.0  # seconds for any process to accept connections


DEBIAN_PACKAGES = {"wrk": "wrk", "haproxy": "haproxy", "nginx": "nginx"}


def find_tool(name: str) -> str | None:
    """Path of ``name`` on PATH or in /usr/sbin (not on a non-root PATH), else None."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


def install_missing(tools: list[str]) -> None:
    """``apt-get install`` the Debian packages of the missing ``tools`` (root with apt only)."""
    missing = [t for t in tools if find_tool(t) is None]
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    pkgs = [DEBIAN_PACKAGES[t] for t in missing]
    print(f"installing {' '.join(pkgs)} with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, check=False,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], env=env, timeout=600, check=False,
                   stdout=subprocess.DEVNULL)


def wait_port(port: int, timeout: float, what: str) -> None:
    """Wait until 127.0.0.1:``port`` accepts a TCP connection; raises TimeoutError."""
    def accepts() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    wait_until(accepts, timeout, what)


class Procs:
    """Processes the bench started itself (not the mesh): spawn, check, stop."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``args`` in its own session, output to ``<workdir>/<name>.log``."""
        with open(self.workdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """SIGTERM every process still running, SIGKILL those left after ``STOP_GRACE``."""
        stop_processes(self.procs, STOP_GRACE)
        self.procs.clear()


def nginx_config(workdir: Path, ports: list[int], body_size: int) -> str:
    """A self-contained nginx.conf: one process, no access log, a fixed text body."""
    listens = "".join(f"    listen 127.0.0.1:{p};\n" for p in ports)
    return (
        "daemon off;\nmaster_process off;\nworker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\nerror_log {workdir}/nginx-error.log warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n  access_log off;\n  keepalive_requests 100000;\n  keepalive_timeout 75s;\n"
        f"  client_body_temp_path {workdir}/nginx-body;\n"
        f"  proxy_temp_path {workdir}/nginx-proxy;\n"
        "  default_type text/plain;\n  server {\n" + listens +
        f'    location / {{ return 200 "{"x" * body_size}"; }}\n  }}\n}}\n'
    )


def start_origin(procs: Procs, ports: list[int], body_size: int,
                 use_nginx: bool) -> tuple[subprocess.Popen[bytes], str]:
    """Start nginx (or the fallback) listening on ``ports``; returns it and a description."""
    nginx = find_tool("nginx")
    if use_nginx and nginx:
        conf = procs.workdir / "nginx.conf"
        conf.write_text(nginx_config(procs.workdir, ports, body_size))
        proc = procs.spawn("nginx", [nginx, "-p", str(procs.workdir), "-c", str(conf),
                                     "-e", "stderr"])
        try:
            wait_port(ports[0], START_TIMEOUT, "nginx")
            return proc, tool_version([nginx, "-v"]) or "nginx"
        except TimeoutError:
            print(f"nginx did not start (exit {proc.poll()}), see {procs.workdir}/nginx.log; "
                  "using tiny_origin.py", file=sys.stderr)
    args = [sys.executable, str(HERE / "tiny_origin.py"), "--size", str(body_size)]
    proc = procs.spawn("tiny-origin", args + [a for p in ports for a in ("--port", str(p))])
    wait_port(ports[0], START_TIMEOUT, "tiny_origin.py")
    print("warning: origin is tiny_origin.py, not nginx: results are not comparable with "
          "nginx runs (check that the direct rate stays far above HAProxy's)", file=sys.stderr)
    return proc, "tiny_origin.py (asyncio; nginx unavailable)"


def haproxy_config(port: int, origin_port: int) -> str:
    """HAProxy as a one-hop HTTP/1.1 proxy with pooled keep-alive to the origin, no logging."""
    return (
        "global\n    nbthread 1\n    maxconn 4096\n"
        "defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend bench\n    bind 127.0.0.1:{port}\n    default_backend origin\n"
        f"backend origin\n    server nginx 127.0.0.1:{origin_port}\n"
    )


def start_haproxy(procs: Procs, port: int, origin_port: int) -> subprocess.Popen[bytes]:
    """Start ``haproxy -db`` (foreground) on ``port`` in front of the origin."""
    haproxy = find_tool("haproxy") or "haproxy"
    conf = procs.workdir / "haproxy.cfg"
    conf.write_text(haproxy_config(port, origin_port))
    proc = procs.spawn("haproxy", [haproxy, "-db", "-f", str(conf)])
    wait_port(port, START_TIMEOUT, "haproxy")
    return proc


def tool_version(args: list[str]) -> str:
    """First line a tool prints for its version flag (stdout or stderr), or ''."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


class Mesh:
    """meshd plus the ``origin`` and ``client`` sidecars, started through ``MeshHarness``."""

    def __init__(self, workdir: Path) -> None:
        self.harness = MeshHarness(workdir, ttl=10.0, drain=0.2)
        self.http = httpx.Client(timeout=5.0, trust_env=False)
        self.origin: Sidecar | None = None
        self.client: Sidecar | None = None

    def start(self) -> int:
        """Start meshd and both sidecars; returns the port the origin sidecar forwards to."""
        self.harness.start_meshd()
        self.origin = self.harness.add_service("bench-origin", "origin", labels={"version": "v1"})
        self.client = self.harness.add_service("bench-client", "client", labels={"version": "v1"})
        return self.origin.app_port

    def wait_routable(self) -> None:
        """Wait until both sidecars are ready and ``client -> origin -> app`` answers 200."""
        assert self.client is not None
        self.harness.wait_ready()
        url = f"http://127.0.0.1:{self.client.outbound}/"
        wait_until(lambda: self.http.get(url, headers={"host": "origin"}).status_code == 200,
                   START_TIMEOUT, "client sidecar -> origin sidecar -> origin")

    @staticmethod
    def pid(sidecar: Sidecar | None) -> int:
        """The process id of a started sidecar."""
        assert sidecar is not None and sidecar.procs, "mesh not started"
        return sidecar.procs[-1].pid

    def close(self) -> None:
        """Stop meshd and the sidecars (``MeshHarness.close``)."""
        self.http.close()
        self.harness.close()


__all__ = ["Mesh", "Procs", "find_tool", "free_port", "install_missing", "start_haproxy",
           "start_origin", "tool_version"]
