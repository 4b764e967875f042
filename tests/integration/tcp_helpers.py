"""Helpers of the TCP / WebSocket / SNI integration tests: a mesh whose bootstraps take extra
TOML (``[[upstreams]]``, ``app_protocol``), a threaded raw TCP app, socket assertions."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from meshd.demo.harness import MeshHarness, Sidecar

IO_TIMEOUT = 20.0  # seconds any single socket operation of a test may block (generous: shared CPU)


class Mesh(MeshHarness):
    """``MeshHarness`` whose sidecar bootstraps get ``extra[name]`` appended."""

    def __init__(self, workdir: Path, **kw: float) -> None:
        super().__init__(workdir, **kw)
        self.extra: dict[str, str] = {}

    def _bootstrap(self, sc: Sidecar) -> str:
        return super()._bootstrap(sc) + self.extra.get(sc.name, "")

    def handshakes(self, name: str) -> int:
        return int(self.admin_json(name, "/certs")["tls"]["handshakes"])


def upstream(service: str, local_port: int, port: int = 0) -> str:
    extra = f"port = {port}\n" if port else ""
    return f'[[upstreams]]\nservice = "{service}"\nlocal_port = {local_port}\n{extra}'


class TcpApp:
    """A TCP server on 127.0.0.1:``port``; each connection runs ``handler(conn)`` in a thread.
    ``errors`` collects exceptions raised by handlers (a test asserts it stays empty)."""

    def __init__(self, port: int, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", port), backlog=128)
        self.errors: list[BaseException] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.listener.close()


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF (raises on reset or IO_TIMEOUT)."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def ends(sock: socket.socket) -> str:
    """How the peer ended: ``"eof"`` or ``"reset"`` (reads within IO_TIMEOUT; data is skipped)."""
    try:
        while sock.recv(65536):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock
