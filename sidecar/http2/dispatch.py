"""One entry for a listener's connection: HTTP/2 or HTTP/1.1, decided before any byte is read.

``serve_http(stream, handler, info)``: a TLS stream whose ALPN chose ``h2`` is HTTP/2; any
other TLS stream is HTTP/1.1 (ALPN ``http/1.1`` or none); a plain-text stream is HTTP/2 when it
starts with the client preface ``PRI * HTTP/2.0`` (h2c prior knowledge, RFC 9113 §3.3), read
with ``MSG_PEEK`` on sockets so HTTP/1.1 keeps its unwrapped stream. Both servers take the same
``Handler``. A listener's drain (``sidecar.lifecycle.ConnectionGroup``) reaches HTTP/2
connections as a GOAWAY (``serve_h2(drain=...)``).
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Any

import trio

from sidecar.http.limits import DEFAULT_SERVER_LIMITS, ServerLimits
from sidecar.http.messages import ConnInfo, Handler
from sidecar.http.server import serve_http1
from sidecar.http2.limits import DEFAULT_H2_LIMITS, H2Limits
from sidecar.http2.server import H2_PREFACE, serve_h2
from sidecar.identity.tls import ALPN_H2, PrefixedStream

PEEK_RETRY = 0.005  # seconds between peeks while only a prefix of the preface has arrived


async def serve_http(stream: trio.abc.Stream, handler: Handler, info: ConnInfo, *,
                     h1_limits: ServerLimits = DEFAULT_SERVER_LIMITS,
                     h2_limits: H2Limits = DEFAULT_H2_LIMITS,
                     wrap_h1: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None) -> None:
    """Serve ``stream`` with ``serve_h2`` or ``serve_http1`` (``wrap_h1`` applied first, e.g.
    ``lifecycle.drainable``); closes ``stream``. A peer silent for ``idle_timeout`` is closed, and
    so is one whose first bytes, a prefix of the client preface, do not complete it within
    ``header_timeout`` (a trickled preface, slowloris-style)."""
    alpn = selected_alpn(stream)
    if alpn == ALPN_H2:
        return await _serve_h2(stream, handler, info, h2_limits)
    if alpn is None:
        h2: bool | None = None
        group, hook = _current_group(), _DrainHook()
        if group is not None:  # a drain closes a connection that has not spoken yet
            group.http1.add(hook)
        with trio.move_on_after(h1_limits.idle_timeout) as hook.scope:  # only the first bytes
            try:
                if group is None or not group.draining:
                    h2, stream = await sniff_h2(stream, header_timeout=h1_limits.header_timeout)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                h2 = None
        if group is not None:
            group.http1.discard(hook)
        if h2 is None:  # EOF, error or silence before any byte
            await trio.aclose_forcefully(stream)
            return None
        if h2:
            return await _serve_h2(stream, handler, info, h2_limits)
    h1 = wrap_h1(stream) if wrap_h1 is not None else stream
    return await serve_http1(h1, handler, info, limits=h1_limits)


def selected_alpn(stream: trio.abc.Stream) -> str | None:
    """The ALPN protocol of a TLS stream (``"h2"``, ``"http/1.1"``); None for plain text or
    when none was negotiated."""
    if isinstance(stream, trio.SSLStream):
        return stream.selected_alpn_protocol()
    return None


async def sniff_h2(stream: trio.abc.Stream, *, header_timeout: float = math.inf
                   ) -> tuple[bool | None, trio.abc.Stream]:
    """``(True, stream)`` if the client preface starts the stream, ``(False, stream)`` if
    something else does, ``(None, stream)`` on EOF first or when the first bytes are a prefix of
    the preface that is still incomplete ``header_timeout`` seconds after the first byte (the
    wait for the first byte is the caller's). Bytes stay unread: ``MSG_PEEK`` on a socket, else
    a ``PrefixedStream`` that delivers them again."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        data = await sock.recv(len(H2_PREFACE), socket.MSG_PEEK)
        with trio.move_on_after(header_timeout):
            while True:
                if not data:
                    return None, stream
                if not H2_PREFACE.startswith(data) or len(data) == len(H2_PREFACE):
                    return data == H2_PREFACE, stream
                await trio.sleep(PEEK_RETRY)  # a prefix of the preface: wait for the rest
                data = await sock.recv(len(H2_PREFACE), socket.MSG_PEEK)
        return None, stream
    data = await stream.receive_some(len(H2_PREFACE))
    if not data:
        return None, stream
    with trio.move_on_after(header_timeout):
        while H2_PREFACE.startswith(data) and len(data) < len(H2_PREFACE):
            more = await stream.receive_some(len(H2_PREFACE) - len(data))
            if not more:
                return False, PrefixedStream(stream, data)
            data += more
        return data == H2_PREFACE, PrefixedStream(stream, data)
    return None, PrefixedStream(stream, data)


class _DrainHook:
    """A member of a ``ConnectionGroup``'s set of drainable connections whose
    ``close_if_idle`` (called when the group drains) starts the HTTP/2 GOAWAY."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.scope: trio.CancelScope | None = None  # cancelled too (the wait for a first byte)

    def close_if_idle(self) -> None:
        self.event.set()
        if self.scope is not None:
            self.scope.cancel()


async def _serve_h2(stream: trio.abc.Stream, handler: Handler, info: ConnInfo, limits: H2Limits) -> None:
    """``serve_h2`` with its drain event tied to the listener's group (``sidecar.lifecycle``)."""
    group = _current_group()
    if group is None:
        return await serve_h2(stream, handler, info, limits)
    hook = _DrainHook()
    group.http1.add(hook)
    if group.draining:
        hook.event.set()
    try:
        await serve_h2(stream, handler, info, limits, drain=hook.event)
    finally:
        group.http1.discard(hook)


def _current_group() -> Any:
    try:
        from sidecar import lifecycle
    except ImportError:  # pragma: no cover - lifecycle is optional for the HTTP layer
        return None
    var = getattr(lifecycle, "_GROUP", None)
    group = var.get() if var is not None else None
    return group if hasattr(group, "http1") else None
