"""A small threaded HTTP/1.1 server base for the API doubles (stdlib ``ThreadingHTTPServer``).

``DoubleServer`` runs in a background thread on ``127.0.0.1`` (port 0 = any), can be stopped
and started again on the **same** port (a registry outage: connections refused, keep-alive
connections reset), and dispatches every request to ``handle(method, path, query, headers,
body) -> (status, headers, body_bytes)`` under no lock (subclasses lock their own state).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], bytes]


def json_reply(status: int, data: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def text_reply(status: int, text: str) -> Reply:
    return status, {"Content-Type": "text/plain; charset=utf-8"}, text.encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, data = self.server.owner.handle(
            self.command, urllib.parse.unquote(url.path), query, self.headers, body)
        if self.server.owner.closing:
            self.close_connection = True
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], owner: DoubleServer) -> None:
        self.owner = owner
        self.conns: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.conns.discard(request)
        super().shutdown_request(request)


class DoubleServer:
    """Base of the doubles: ``start()``, ``stop()``, ``url``; subclasses implement ``handle``."""

    def __init__(self) -> None:
        self.port = 0
        self.closing = False
        self._srv: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes) -> Reply:
        raise NotImplementedError

    def wake(self) -> None:
        """Wake blocked requests (subclasses with condition variables override)."""

    def start(self) -> None:
        self.closing = False
        self._srv = _Server(("127.0.0.1", self.port), self)
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and reset every open connection (the registry is down)."""
        if self._srv is None:
            return
        self.closing = True
        self.wake()
        self._srv.shutdown()
        self._srv.server_close()
        for conn in list(self._srv.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assert self._thread is not None
        self._thread.join(5)
        self._srv = None

    def __enter__(self) -> DoubleServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
