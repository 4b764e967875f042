"""Upstream HTTP/1.1 client: a keep-alive pool keyed by ``(host, port)``.

``UpstreamPool.request`` flow::

    idle pooled connection (LIFO, expired ones closed) or connect (connect_timeout)
    send head + bytes body in one send_all, or the head and then one send_all per chunk
    read the response head    response_timeout; same raw checks as the server; 1xx skipped
    body already received  -> Response.body is bytes, the connection is back in the pool
    else                   -> Response.body streams; the pool gets the connection back at
                              the end of the body, Response.aclose closes it if cut short

Heads are serialised by ``encode_request_head`` and parsed by ``sidecar.http.parser`` (llhttp);
``sidecar.http.decoders`` decode the body: Content-Length, chunked, or until EOF (then never
reused). A connection is reused only after a complete HTTP/1.1 exchange without
``Connection: close``, CONNECT or Upgrade, and with no byte after the response. Sending and the
wait for the head run under one cancel scope per exchange whose deadline moves with the step.

Errors, mapped here once from trio/parser/OSError to the meshd taxonomy:

* ``UpstreamConnectError``: refused, unreachable or connect timeout. Nothing was sent and the
  body was not read: safe to retry on another endpoint.
* ``UpstreamResetError``: closed or reset before a complete head, or mid-body (then raised by
  the body iterator). ``request_sent`` is True once request bytes were handed to the stream.
* ``UpstreamProtocolError`` (an ``UpstreamResetError``; 502, flag ``UPE``): malformed response.
* ``UpstreamTimeoutError``: no response head in ``response_timeout``, or a send or body read
  without progress for ``stream_idle_timeout``.

Stale keep-alive: a pooled connection that the server closed while idle fails with EOF or a
reset before any response byte. Such a request is retried once on a fresh connection; a streamed
body is replayed from its first ``replay_buffer_bytes`` (beyond that, the error is raised).
Caveat: a server that dies after reading a request but before answering looks the same, so a
non-idempotent request can run twice (Go's net/http retries only idempotent ones).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshd.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    UpstreamConnectError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from sidecar.core.headers import check_raw_head, connection_tokens, encode_request_head, find_head_end
from sidecar.http.bodies import RecordingBody
from sidecar.http.limits import DEFAULT_CLIENT_LIMITS, ClientLimits
from sidecar.http.messages import Body, RequestHead, Response, body_length
from sidecar.http.messages import buffered_body as _buffered
from sidecar.http.parser import ParsedResponse, parse_response_head
from sidecar.http.server import receive_head
from sidecar.http.upstream_conn import IO_ERRORS as _IO_ERRORS
from sidecar.http.upstream_conn import Key, ResponseBody, feed, response_parts
from sidecar.http.upstream_conn import StaleConnection as _StaleConnection
from sidecar.http.upstream_conn import UpstreamConn as _Conn
from sidecar.http.upstream_conn import UpstreamProtocolError as UpstreamProtocolError
from sidecar.http.upstream_conn import reset as _reset

Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # send Content-Length: 0 (RFC 9110 §8.6)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """``idle``: idle connections per endpoint; ``active``: checked out; counters since start."""

    idle: dict[Key, int]
    active: int
    opened: int
    reused: int
    stale_retries: int


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to upstream endpoints; see the module docstring."""

    def __init__(
        self, *, limits: ClientLimits = DEFAULT_CLIENT_LIMITS, connect: Connect | None = None
    ) -> None:
        self._limits = limits
        self._connect: Connect = connect or trio.open_tcp_stream
        self._idle: dict[Key, list[_Conn]] = {}
        self._active = self._opened = self._reused = self._retries = 0
        self._closed = False
        self._next_reap = 0.0

    async def request(
        self,
        host: str,
        port: int,
        head: RequestHead,
        body: Body | bytes = b"",
        *,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        max_age: float | None = None,
    ) -> Response:
        """Send ``head`` + ``body`` to ``host:port``; the response streams (see module doc).

        Per-call overrides (seconds, from the destination's connection pool policy):
        ``connect_timeout``; ``idle_timeout`` (a pooled connection idle longer is not reused;
        the pool's own limit applies when shorter); ``max_age`` (Envoy
        max_connection_duration: a pooled connection older than this is closed, not reused)."""
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        key = (host, port)
        buffered = _buffered(body)
        body = body if buffered is None else buffered
        conn = await self._checkout(key, idle_timeout, max_age)
        recorder = None
        if conn is not None:
            if not isinstance(body, bytes | bytearray):
                body = recorder = RecordingBody(body, self._limits.replay_buffer_bytes)
            try:
                return await self._exchange(conn, head, body)
            except _StaleConnection as stale:
                if recorder is not None and not recorder.replayable:
                    raise stale.error from None
                self._retries += 1
                body = recorder.replay() if recorder is not None else body
        try:
            conn = await self._open(key, connect_timeout)
        except UpstreamConnectError as exc:
            if recorder is not None and recorder.touched:  # the body is no longer whole
                raise _reset(UpstreamResetError, str(exc), request_sent=True) from exc
            raise
        return await self._exchange(conn, head, body)

    def statistics(self) -> PoolStatistics:
        idle = {key: len(stack) for key, stack in self._idle.items() if stack}
        return PoolStatistics(idle, self._active, self._opened, self._reused, self._retries)

    async def aclose(self) -> None:
        """Close idle connections; connections in use are closed when their response ends."""
        self._closed = True
        idle = [conn for stack in self._idle.values() for conn in stack]
        self._idle.clear()
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    async def _checkout(self, key: Key, idle_timeout: float | None = None,
                        max_age: float | None = None) -> _Conn | None:
        now = trio.current_time()
        if now >= self._next_reap:
            await self._reap(now)
        idle = min(idle_timeout or self._limits.idle_timeout, self._limits.idle_timeout)
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if now - conn.idle_since < idle and (max_age is None or now - conn.opened_at < max_age):
                self._active += 1
                self._reused += 1
                conn.out = conn.reused = True
                conn.got_bytes = False
                return conn
            await trio.aclose_forcefully(conn.stream)
        return None

    async def _reap(self, now: float) -> None:
        """Close idle connections older than ``idle_timeout`` (oldest sit at the stack bottom)."""
        self._next_reap = now + self._limits.idle_timeout / 4
        for key in list(self._idle):
            stack = self._idle[key]
            while stack and now - stack[0].idle_since >= self._limits.idle_timeout:
                await trio.aclose_forcefully(stack.pop(0).stream)
            if not stack:
                del self._idle[key]

    async def _open(self, key: Key, connect_timeout: float | None = None) -> _Conn:
        host, port = key
        timeout = connect_timeout or self._limits.connect_timeout
        try:
            with trio.move_on_after(timeout) as scope:
                stream = await self._connect(host, port)
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"connect {host}:{port}: {exc}") from exc
        if scope.cancelled_caught:
            raise UpstreamConnectError(f"connect {host}:{port}: timeout after {timeout} s")
        self._opened += 1
        self._active += 1
        conn = _Conn(key, stream)
        conn.opened_at = trio.current_time()
        conn.out = True
        return conn

    async def _exchange(self, conn: _Conn, head: RequestHead, body: Body | bytes) -> Response:
        """Send the request and read the response head under one cancel scope, whose deadline
        is the timer of the current step (cheaper than a scope per operation)."""
        lim, sending = self._limits, True
        try:
            with trio.CancelScope(deadline=trio.current_time() + lim.stream_idle_timeout) as scope:
                conn.scope = scope
                keep = await self._send_request(conn, head, body)
                sending = False
                scope.deadline = trio.current_time() + lim.response_timeout
                parsed, rest = await self._receive_head(conn)
            if scope.cancelled_caught:
                step = (
                    "sending stalled to" if sending else f"no response head in {lim.response_timeout} s from"
                )
                raise UpstreamTimeoutError(f"{step} {conn.key[0]}:{conn.key[1]}")
            head_out, decoder, conn.keep = response_parts(head, parsed, keep, lim.max_headers_bytes)
            first = feed(conn, decoder, rest) if rest else b""
            if decoder.done:  # the whole body came with the head (the usual small response)
                await self.checkin(conn)
                return Response(head_out, first, _noop)
            body_out = ResponseBody(self, conn, decoder, lim, first)
            return Response(head_out, body_out, body_out.aclose)
        except BaseException:
            await self.discard(conn)
            raise

    async def _send_request(self, conn: _Conn, head: RequestHead, body: Body | bytes) -> bool:
        """Send the request; True if it allows keep-alive (no close, CONNECT or Upgrade)."""
        method, headers = head.method, head.headers
        data, length = encode_request_head(
            method,
            head.path,
            headers,
            default_host=conn.host,
            length=body_length(body),
            body_method=method in _BODY_METHODS,
        )
        if isinstance(body, bytes | bytearray):
            await self._send(conn, data + body if body else data, arm=False)
        else:
            await self._send(conn, data, arm=False)
            await self._send_stream(conn, body, length)
        if method == "CONNECT":
            return False
        for name, _ in headers:
            if name == "upgrade" or (name == "connection" and "close" in connection_tokens(headers)):
                return False
        return True

    async def _send_stream(self, conn: _Conn, body: Body, length: int | None) -> None:
        """Send a streamed body: chunked when ``length`` is None, else exactly ``length`` bytes."""
        chunks, sent = body.__aiter__(), 0
        while True:
            conn.scope.deadline = math.inf  # waiting for the downstream is not our timeout
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            if not chunk:
                continue
            sent += len(chunk)
            if length is None:
                await self._send(conn, b"%x\r\n%b\r\n" % (len(chunk), chunk))
            elif sent > length:
                raise LocalProtocolError(f"request body exceeds its Content-Length {length}", 500)
            else:
                await self._send(conn, chunk)
        if length is None:
            await self._send(conn, b"0\r\n\r\n")
        elif sent != length:
            raise LocalProtocolError(f"request body has {sent} of {length} bytes", 500)

    async def _send(self, conn: _Conn, data: bytes, *, arm: bool = True) -> None:
        """``send_all`` with errors mapped; ``arm``: restart the stream-idle timer first."""
        if arm:
            conn.scope.deadline = trio.current_time() + self._limits.stream_idle_timeout
        try:
            await conn.stream.send_all(data)
        except _IO_ERRORS as exc:
            raise conn.failure(exc, "sending to") from exc

    async def _receive_head(self, conn: _Conn) -> tuple[ParsedResponse, bytes]:
        """The final response head (1xx skipped) and the bytes after it; raises per the module
        docstring."""
        lim, buf = self._limits, conn.buf
        try:
            while True:
                if buf:
                    end = await receive_head(
                        conn.stream, buf, max_bytes=lim.max_headers_bytes, max_recv=lim.max_recv
                    )
                    data = bytes(buf)
                    buf.clear()
                else:  # the usual case: the whole head in one read
                    data = await conn.stream.receive_some(lim.max_recv)
                    end = find_head_end(data) if data else -1
                    if data and end < 0:
                        conn.got_bytes = True
                        buf += data
                        continue
                conn.got_bytes = conn.got_bytes or bool(data)
                if end < 0:
                    raise conn.failure("connection closed before a response head", "reading")
                head, rest = (data, b"") if end == len(data) else (data[:end], data[end:])
                check_raw_head(head, max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
                parsed = parse_response_head(head)
                if parsed.status >= 200:
                    return parsed, rest
                if parsed.status == 101:
                    raise RemoteProtocolError("unexpected 101 Switching Protocols")
                buf += rest  # 1xx: skipped
        except _IO_ERRORS as exc:
            conn.got_bytes = conn.got_bytes or bool(buf)
            raise conn.failure(exc, "reading from") from exc
        except RemoteProtocolError as exc:
            msg = f"malformed response head from {conn.key[0]}:{conn.key[1]}: {exc}"
            raise _reset(UpstreamProtocolError, msg, request_sent=True) from exc

    async def checkin(self, conn: _Conn) -> None:
        """Return ``conn`` after a complete exchange: to the idle pool if reusable, else close."""
        stack = self._idle.setdefault(conn.key, [])
        # bytes after the response (conn.buf): the peer is confused
        if (
            conn.keep
            and not conn.buf
            and not self._closed
            and len(stack) < self._limits.max_idle_per_endpoint
        ):
            self._active -= conn.out
            conn.out = conn.reused = False
            conn.idle_since = trio.current_time()
            stack.append(conn)
            return
        await self.discard(conn)

    async def discard(self, conn: _Conn) -> None:
        """Close ``conn`` (idempotent for the active counter)."""
        self._active -= conn.out
        conn.out = False
        await trio.aclose_forcefully(conn.stream)


async def _noop() -> None:
    return None
