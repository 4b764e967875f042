"""WebSocket (HTTP/1.1 Upgrade) through two real sidecars with mTLS, driven by the ``websockets``
library on both ends: the Upgrade passes outbound -> inbound -> app, the 101 comes back, and
then both hops are byte pumps (greeting sent before the client speaks, text, 512 KiB binary,
ping/pong, close handshake); a refused upgrade returns the app's status; the localhost upstream
port carries WebSocket too."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tcp_helpers import IO_TIMEOUT, Mesh, upstream
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from meshd.demo.harness import free_port, wait_until

pytestmark = pytest.mark.slow


class ChatApp:
    """Echo server: greets first, echoes every message, records request headers and closes."""

    def __init__(self, port: int) -> None:
        self.headers: list[dict[str, str]] = []
        self.closed: list[int | None] = []
        self.server: Server = serve(self.handle, "127.0.0.1", port, process_request=self.refuse,
                                    max_size=2 << 20)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuse(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/nows":
            return conn.respond(404, "no websocket here\n")
        return None

    def handle(self, ws: ServerConnection) -> None:
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        ws.send(f"hello {ws.request.path}")
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosedOK:
            pass
        self.closed.append(ws.close_code)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, ChatApp, int]]:
    h = Mesh(Path(tmp_path_factory.mktemp("ws")), ttl=3.0, drain=0.2)
    local = free_port()
    app = None
    try:
        h.start_meshd()
        sc = h.add_service("chat-1", "chat", None, {"version": "v1"}, mtls_mode="STRICT")
        app = ChatApp(sc.app_port)
        h.extra["client-1"] = upstream("chat", local)
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.wait_ready()
        h.wait_synced()
        h.wait_certs("client-1", "chat-1")
        yield h, app, local
    finally:
        if app is not None:
            app.server.shutdown()
        h.close()


def _exchange(ws: ClientConnection, path: str) -> None:
    assert ws.recv(timeout=IO_TIMEOUT) == f"hello {path}"  # sent by the app right after the 101
    ws.send("ping?")
    assert ws.recv(timeout=IO_TIMEOUT) == "ping?"
    blob = bytes(range(256)) * 2048  # 512 KiB in one frame
    ws.send(blob)
    assert ws.recv(timeout=IO_TIMEOUT) == blob
    ws.ping().wait(IO_TIMEOUT)


def test_websocket_through_two_sidecars(mesh) -> None:
    h, app, _ = mesh
    before = h.handshakes("chat-1")
    sock = socket.create_connection(("127.0.0.1", h.sidecars["client-1"].outbound), timeout=IO_TIMEOUT)
    with connect("ws://chat/echo", sock=sock, proxy=None, open_timeout=IO_TIMEOUT) as ws:
        _exchange(ws, "/echo")
    assert h.handshakes("chat-1") > before  # the Upgrade went over mTLS
    seen = app.headers[-1]
    assert seen["upgrade"].lower() == "websocket" and "sec-websocket-key" in seen
    assert "x-meshd-peer" not in seen  # mesh metadata never reaches the app
    _wait(lambda: len(app.closed) >= 1)
    assert app.closed[-1] == 1000  # the close handshake crossed both pumps


def test_websocket_through_local_upstream_port(mesh) -> None:
    _, app, local = mesh
    count = len(app.closed)
    with connect(f"ws://127.0.0.1:{local}/up", proxy=None, open_timeout=IO_TIMEOUT) as ws:
        _exchange(ws, "/up")
    _wait(lambda: len(app.closed) > count)


def test_refused_upgrade_returns_the_app_status(mesh) -> None:
    h, _, _ = mesh
    sock = socket.create_connection(("127.0.0.1", h.sidecars["client-1"].outbound), timeout=IO_TIMEOUT)
    with pytest.raises(InvalidStatus) as caught:
        connect("ws://chat/nows", sock=sock, proxy=None, open_timeout=IO_TIMEOUT)
    assert caught.value.response.status_code == 404


def _wait(check: Callable[[], bool]) -> None:
    wait_until(check, IO_TIMEOUT, "websocket server saw the close")
