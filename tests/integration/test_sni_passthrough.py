"""TLS passthrough for egress, routed by SNI, never terminated by the sidecar: curl reaches a
trustme-certified HTTPS server on loopback through the outbound listener, with HTTP CONNECT
(``-x``, as HTTPS_PROXY clients do) and without (TLS straight to the outbound port); hosts no
egress rule allows, and a CONNECT whose ClientHello names another host (domain fronting), are
refused and never reach the server."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from tcp_helpers import IO_TIMEOUT, Mesh

pytestmark = pytest.mark.slow

ALLOWED, BLOCKED = "api.example.test", "blocked.example.test"


class TlsOrigin:
    """HTTPS on 127.0.0.1 with a certificate for both names; counts the requests it served."""

    def __init__(self, ca: trustme.CA) -> None:
        self.requests: list[str] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.requests.append(f"{self.headers['host']}{self.path}")
                body = b"hello over passthrough\n"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(ALLOWED, BLOCKED).configure_cert(ctx)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, TlsOrigin, Path]]:
    work = Path(tmp_path_factory.mktemp("sni"))
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    origin = TlsOrigin(ca)
    h = Mesh(work, ttl=3.0, drain=0.2)
    try:
        h.start_meshd()
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.wait_ready()
        h.push_rules(f'[[egress]]\nname = "api"\nhost = "{ALLOWED}"\nports = [443]\n'
                     f'endpoints = ["127.0.0.1:{origin.port}"]\n', "egress.toml")
        yield h, origin, ca_file
    finally:
        origin.server.shutdown()
        h.close()


def curl(ca_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", str(IO_TIMEOUT), "--cacert", str(ca_file),
                           "--noproxy", "", *args], capture_output=True, text=True, timeout=60)


def test_connect_tunnel_reaches_the_allowed_host(env) -> None:
    h, origin, ca_file = env
    out = curl(ca_file, "-x", f"http://127.0.0.1:{h.sidecars['client-1'].outbound}",
               f"https://{ALLOWED}/via-connect")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello over passthrough\n"
    assert origin.requests[-1] == f"{ALLOWED}/via-connect"  # TLS ended at the origin, not at us


def test_tls_to_outbound_port_is_routed_by_sni(env) -> None:
    h, origin, ca_file = env
    out = curl(ca_file, "--connect-to", f"{ALLOWED}:443:127.0.0.1:{h.sidecars['client-1'].outbound}",
               f"https://{ALLOWED}/via-sni")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello over passthrough\n" and origin.requests[-1] == f"{ALLOWED}/via-sni"


def test_disallowed_hosts_are_refused(env) -> None:
    h, origin, ca_file = env
    served = len(origin.requests)
    outbound = h.sidecars["client-1"].outbound
    no_egress = curl(ca_file, "--connect-to", f"{BLOCKED}:443:127.0.0.1:{outbound}", f"https://{BLOCKED}/")
    assert no_egress.returncode != 0  # reset during the handshake
    denied = curl(ca_file, "-x", f"http://127.0.0.1:{outbound}", f"https://{BLOCKED}/")
    assert denied.returncode != 0 and "502" in denied.stderr, denied.stderr
    assert len(origin.requests) == served


def test_connect_with_another_sni_is_reset(env) -> None:
    """CONNECT to the allowed host, then a ClientHello for another name: reset, nothing served."""
    h, origin, ca_file = env
    served = len(origin.requests)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", h.sidecars["client-1"].outbound), timeout=IO_TIMEOUT) as s:
        s.sendall(f"CONNECT {ALLOWED}:443 HTTP/1.1\r\nHost: {ALLOWED}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1024)
        assert head.startswith(b"HTTP/1.1 200")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(s, server_hostname=BLOCKED) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if not tls.recv(1024):
                    raise ConnectionError("closed")
    assert len(origin.requests) == served
