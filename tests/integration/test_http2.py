"""HTTP/2 through real sidecars with third-party peers: ``h2load`` (nghttp2) at 100 concurrent
streams through one sidecar, ``curl --http2-prior-knowledge`` through two sidecars (mTLS, ALPN
h2 between them) to an HTTP/2 app (hypercorn, h2c) with trailers, an HTTP/1.1 client reaching
that HTTP/2 app and an HTTP/2 client reaching an HTTP/1.1 app, and trailers to an HTTP/1.1
client that sent ``TE: trailers`` (chunked)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshd.demo.harness import MeshHarness, Sidecar

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench"

H2_APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            await send({"type": event["type"] + ".complete"})
            if event["type"] == "lifespan.shutdown":
                return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    trailers = scope["path"] == "/trailers" and "http.response.trailers" in scope.get("extensions", {})
    await send({"type": "http.response.start", "status": 200, "trailers": trailers,
                "headers": [(b"content-type", b"text/plain")]})
    text = f"version={scope['http_version']} method={scope['method']} body={len(body)}"
    await send({"type": "http.response.body", "body": text.encode(), "more_body": trailers})
    if trailers:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await send({"type": "http.response.trailers", "more_trailers": False,
                    "headers": [(b"x-checksum", b"c0ffee")]})
'''


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHarness]:
    tmp = tmp_path_factory.mktemp("h2mesh")
    h = MeshHarness(tmp, ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        h.add_service("client-1", "client", None, {"version": "v1"})
        web = h.add_service("web-1", "web", None, {"version": "v1", '"mesh.protocol"': "http2"})
        (tmp / "h2app.py").write_text(H2_APP)
        h.procs.append(subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "h2app:app", "--bind", f"127.0.0.1:{web.app_port}"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        plain = h.add_service("plain-1", "plain", None, {"version": "v1"})
        h.procs.append(subprocess.Popen(
            [sys.executable, str(BENCH / "tiny_origin.py"), "--port", str(plain.app_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        h.wait_ready()
        h.wait_synced()
        for name in ("web-1", "plain-1"):
            h.wait_app(name)
        h.wait_certs()
        yield h
    finally:
        h.close()


def _sc(mesh: MeshHarness, name: str) -> Sidecar:
    return mesh.sidecars[name]


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_100_concurrent_streams_through_one_sidecar(mesh: MeshHarness) -> None:
    url = f"http://127.0.0.1:{_sc(mesh, 'plain-1').inbound}/"
    out = subprocess.run(["h2load", "-n", "2000", "-c", "1", "-m", "100", url],
                         capture_output=True, text=True, timeout=60).stdout
    assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in out, out
    assert "status codes: 2000 2xx" in out, out


def _curl(*args: str) -> str:
    proc = subprocess.run(["curl", "-sS", "-v", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_curl_h2c_through_two_sidecars_to_h2_app_with_trailers(mesh: MeshHarness) -> None:
    outbound = _sc(mesh, "client-1").outbound
    out = _curl("--http2-prior-knowledge", "-H", "Host: web", "-d", "x" * 5000,
                f"http://127.0.0.1:{outbound}/trailers")
    assert "< HTTP/2 200" in out and "version=2 method=POST body=5000" in out, out
    assert re.search(r"< x-checksum: c0ffee", out), out  # the app's trailer, end to end
    certs = mesh.admin_json("web-1", "/certs")["tls"]
    assert certs["handshakes"] >= 1  # the sidecar hop was mTLS (h2 by ALPN)


def test_http1_client_to_h2_app_and_h2_client_to_http1_app(mesh: MeshHarness) -> None:
    proxy = f"http://127.0.0.1:{_sc(mesh, 'client-1').outbound}"
    with httpx.Client(proxy=proxy, timeout=10) as client:  # HTTP/1.1 from the app's side
        for _ in range(5):
            resp = client.post("http://web/echo", content=b"y" * 70_000)
            assert resp.status_code == 200 and resp.http_version == "HTTP/1.1"
            assert resp.text == "version=2 method=POST body=70000"  # the app spoke HTTP/2
    out = _curl("--http2-prior-knowledge", "-H", "Host: plain", f"{proxy}/")
    assert "< HTTP/2 200" in out and "x" * 1024 in out  # HTTP/2 client, HTTP/1.1 app (tiny_origin)


def test_trailers_reach_http1_client_that_accepts_them(mesh: MeshHarness) -> None:
    outbound = _sc(mesh, "client-1").outbound

    def get(te: str) -> bytes:
        with socket.create_connection(("127.0.0.1", outbound), timeout=10) as s:
            s.sendall(b"GET /trailers HTTP/1.1\r\nHost: web\r\n%sConnection: close\r\n\r\n" % te.encode())
            data = b""
            while not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") < 2:  # head + last chunk
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data

    with_te = get("TE: trailers\r\n")
    assert b"transfer-encoding: chunked" in with_te.lower(), with_te
    assert with_te.endswith(b"0\r\nx-checksum: c0ffee\r\n\r\n"), with_te
    without = get("")
    assert b"200 OK" in without and b"x-checksum" not in without, without
