"""HTTP/1.1 protocol switches: the hand-off from the HTTP/1.1 server to a byte tunnel.

A handler answers an ``Upgrade`` request (WebSocket, RFC 6455 §4; RFC 9110 §7.8) or a
``CONNECT`` (RFC 9110 §9.3.6) with a ``TunnelResponse``: ``serve_http1`` writes its head —
``101 Switching Protocols`` with ``connection: upgrade`` and the ``upgrade`` token, or a 2xx
to CONNECT without any framing field — and then calls ``tunnel(stream, buffered)``: the
downstream stream and the bytes already received after the request head. From then on the
connection is no longer HTTP; it closes when ``tunnel`` returns.

``serve_http1`` hands the handler the request's ``upgrade`` header (hop-by-hop, otherwise
stripped; not for ``h2c``) so that it knows a switch was asked for; ``connection`` stays
stripped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from sidecar.core.headers import encode_response_head
from sidecar.http.messages import Response
from sidecar.http.replies import PHRASES

Tunnel = Callable[[trio.abc.Stream, bytes], Awaitable[None]]


@dataclass
class TunnelResponse(Response):
    """A 101 (Upgrade) or 2xx (CONNECT) answer after which ``tunnel`` owns the connection."""

    tunnel: Tunnel | None = None


def switch_head(resp: Response) -> bytes:
    """The head that switches protocols: ``connection: upgrade`` on a 101, no framing fields
    (Content-Length, Transfer-Encoding) on either. Raises LocalProtocolError like
    ``encode_response_head``."""
    head = resp.head
    data = encode_response_head(head.status, head.reason or PHRASES.get(head.status, ""), head.headers,
                                length=None, chunked=False, close=False)
    if head.status == 101:
        data = data[:-2] + b"connection: upgrade\r\n\r\n"
    return data


def upgrade_token(headers: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str | None:
    """The request's ``upgrade`` value (first field), None without one or for ``h2c``: HTTP/2
    by upgrade is served as HTTP/1.1 (RFC 9113 §3.1 deprecates it; Envoy passes only the
    upgrades it is configured for, WebSocket in Istio)."""
    for name, value in headers:
        if name == "upgrade":
            return None if value.strip(" \t").lower() == "h2c" else value
    return None
