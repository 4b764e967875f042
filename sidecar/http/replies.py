"""Responses the HTTP layer makes itself, and checks of a handler's response head."""

from __future__ import annotations

import logging
from http import HTTPStatus

from meshd.errors import LocalProtocolError, MeshError, ProtocolError, RemoteProtocolError
from sidecar.core.headers import Header, connection_tokens, encode_response_head
from sidecar.http.messages import Response, ResponseHead

log = logging.getLogger("sidecar.http.server")

PHRASES: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}


def simple_response(status: int, text: str = "", *, close: bool = False) -> Response:
    """A short ``text/plain`` response (the reason phrase when ``text`` is empty)."""
    body = ((text or PHRASES.get(status, "")) + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    return Response(ResponseHead(status, tuple(headers)), body)


def raw_error(status: int) -> bytes:
    """A complete ``connection: close`` error response for a request we could not parse."""
    phrase = PHRASES.get(status, "Error")
    headers = (("content-type", "text/plain; charset=utf-8"),)
    body = phrase.encode() + b"\n"
    head = encode_response_head(status, phrase, headers, length=len(body), chunked=False, close=True)
    return head + body


def error_response(exc: Exception) -> Response:
    """Map a handler exception: downstream protocol errors and unknown failures close."""
    status = getattr(exc, "status", None)
    if isinstance(exc, RemoteProtocolError):
        return simple_response(exc.status_hint, close=True)
    if isinstance(exc, MeshError) and not isinstance(exc, ProtocolError) and type(status) is int:
        return simple_response(status)
    log.error("handler failed", exc_info=exc)
    return simple_response(500, close=True)


def response_framing(headers: tuple[Header, ...], status: int) -> tuple[int | None, bool]:
    """The handler's declared Content-Length (``LocalProtocolError`` 500 if not a number; None
    for a 204) and whether a Connection header says ``close``, in one pass."""
    length, close = None, False
    for name, value in headers:
        if name == "content-length":
            if length is None and status != 204:
                if not value.strip().isdigit():
                    raise LocalProtocolError(f"bad response Content-Length {value!r}", 500)
                length = int(value)
        elif name == "connection":
            close = close or "close" in connection_tokens(((name, value),))
    return length, close
