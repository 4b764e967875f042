"""A real ``mesh-sidecar`` process with a ``[limits]`` table: its listeners close connections
over ``max_connections`` at once while the admitted ones keep working, a slow head gets 408 at
the configured ``header_timeout``, and ``x-forwarded-*`` follow Envoy's sanitizing from the app
to the upstream app (edge at the outbound, trusted mTLS hop at the inbound). meshd runs with an
operator token, which the CLI reads from ``MESHD_TOKEN_FILE``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshd.demo.harness import MeshHarness, Sidecar, wait_until
from sidecar.http.limits import HEADER_READ_TIMEOUT

pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 4
HEADER_TIMEOUT = 1.5  # seconds
LIMITS = f"\n[limits]\nmax_connections = {MAX_CONNECTIONS}\nheader_timeout = {HEADER_TIMEOUT}\n"
OPERATOR_TOKEN = "operator-secret"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"


class LimitedMesh(MeshHarness):
    """``MeshHarness`` whose sidecar bootstraps end with a ``[limits]`` table."""

    def _bootstrap(self, sc: Sidecar) -> str:
        return super()._bootstrap(sc) + LIMITS


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedMesh]:
    h = LimitedMesh(tmp_path_factory.mktemp("limits"), ttl=2.0, drain=0.2)
    try:
        h.start_meshd(OPERATOR_TOKEN)
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.add_service("echo-1", "echo", "static", {"version": "v1"})
        h.wait_ready()
        h.wait_synced()
        h.wait_certs("client-1", "echo-1")
        yield h
    finally:
        h.close()


def _request(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET to the echo service; the response head and JSON body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: echo\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def _closed_unread(port: int) -> bool:
    """A new connection that the listener closes without a byte sent (EOF or reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            return s.recv(1024) == b""
        except ConnectionResetError:
            return True


def test_connections_over_the_cap_are_closed_at_once_served_ones_keep_working(mesh: LimitedMesh) -> None:
    port = mesh.sidecars["client-1"].outbound
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, s in enumerate(held):
            assert _request(s, f"/first-{i}").startswith(b"HTTP/1.1 200 ")
        refused = sum(_closed_unread(port) for _ in range(5))
        for i, s in enumerate(held):  # the admitted connections are still served
            assert _request(s, f"/again-{i}").startswith(b"HTTP/1.1 200 ")
        held.pop().close()  # a slot frees up: a new connection is served again

        def served() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    return _request(s, "/after").startswith(b"HTTP/1.1 200 ")
            except (AssertionError, OSError):
                return False

        wait_until(served, 10, "a connection admitted after one closed")
    finally:
        for s in held:
            s.close()
    print(f"outbound max_connections={MAX_CONNECTIONS}: {refused}/5 extra connections closed unread")
    assert refused == 5


def test_inbound_slow_head_gets_408_at_the_configured_header_timeout(mesh: LimitedMesh) -> None:
    """Plain text to the PERMISSIVE inbound: the head trickles, 408 + close after
    ``header_timeout`` from ``[limits]``, well before the 10 s default."""
    port = mesh.sidecars["echo-1"].inbound
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_READ_TIMEOUT + 10) as s:
        start = time.monotonic()
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        elapsed = time.monotonic() - start
    print(f"inbound slow head: {data[:12]!r} + close after {elapsed:.2f} s "
          f"(header_timeout {HEADER_TIMEOUT} s)")
    assert data.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT - 0.2 <= elapsed < HEADER_READ_TIMEOUT


def test_forwarded_headers_from_the_app_to_the_upstream_app(mesh: LimitedMesh) -> None:
    port = mesh.sidecars["client-1"].outbound
    spoofed = {"host": "echo", "x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https",
               "x-forwarded-client-cert": "By=spiffe://evil;URI=spiffe://evil",
               "x-meshd-peer": "workload=evil", "x-envoy-original-path": "/admin"}
    resp = httpx.get(f"http://127.0.0.1:{port}/headers", headers=spoofed, timeout=10)
    assert resp.status_code == 200
    seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
    print(f"upstream app saw: {sorted((k, v) for k, v in seen.items() if k.startswith('x-'))}")
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"  # the app's address appended
    assert seen["x-forwarded-proto"] == "http"  # the app's connection, not its claim
    assert seen["x-forwarded-client-cert"] == f"By={ECHO_ID};URI={CLIENT_ID}"  # only our hop
    assert not any(k.startswith(("x-meshd-", "x-envoy-")) for k in seen)
    assert "evil" not in repr(seen)
    metrics = httpx.get(f"http://127.0.0.1:{mesh.sidecars['echo-1'].admin}/metrics").text
    assert "evil" not in metrics  # the spoofed x-meshd-peer named no workload in the metrics


def _cli(mesh: LimitedMesh, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_TOKEN")}
    return subprocess.run([sys.executable, "-m", "meshd.cli.main", "--addr", mesh.meshd_addr,
                           "proxy-status"], capture_output=True, text=True, timeout=30,
                          env={**base, **env})


def test_cli_reads_the_operator_token_from_meshd_token_file(mesh: LimitedMesh, tmp_path: Path) -> None:
    token_file = tmp_path / "operator-token"
    token_file.write_text(OPERATOR_TOKEN + "\n")
    token_file.chmod(0o600)
    ok = _cli(mesh, {"MESHD_TOKEN_FILE": str(token_file)})
    assert ok.returncode == 0 and "client-1" in ok.stdout, ok.stderr
    denied = _cli(mesh, {})
    assert denied.returncode == 1 and "refused" in denied.stderr
    wrong = _cli(mesh, {"MESHD_TOKEN": "wrong", "MESHD_TOKEN_FILE": str(token_file)})
    assert wrong.returncode == 1  # MESHD_TOKEN wins over the file
    missing = _cli(mesh, {"MESHD_TOKEN_FILE": str(tmp_path / "missing")})
    assert missing.returncode == 2 and "MESHD_TOKEN_FILE" in missing.stderr
