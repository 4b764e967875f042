"""Upstream HTTP/1.1 client: h11 (client role) over a keep-alive pool keyed by ``(host, port)``.

``UpstreamPool.request`` flow::

    idle pooled connection (LIFO, expired ones closed) or connect (connect_timeout)
    send head + bytes body in one send_all, or the head and then one send_all per chunk
    read the response head    response_timeout; same raw checks as the server; 1xx skipped
    body already received  -> Response.body is bytes, the connection is back in the pool
    else                   -> Response.body streams; the pool gets the connection back at
                              the end of the body, Response.aclose closes it if cut short

Errors, mapped here once from trio/h11/OSError to the meshd taxonomy:

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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from meshd.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    UpstreamConnectError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from sidecar.core.headers import check_framing, check_raw_head, decode_headers, strip_hop_by_hop
from sidecar.http.limits import DEFAULT_CLIENT_LIMITS, ClientLimits
from sidecar.http.messages import Body, RequestHead, Response, ResponseHead, body_length
from sidecar.http.messages import buffered_body as _buffered
from sidecar.http.server import receive_head

Key = tuple[str, int]
Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # send Content-Length: 0 (RFC 9110 §8.6)
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class UpstreamProtocolError(UpstreamResetError):
    """The upstream sent a malformed response (502, Envoy flag UPE)."""

    response_flag = "UPE"
    status = 502


def _reset(cls: type[UpstreamResetError], msg: str, request_sent: bool) -> UpstreamResetError:
    err = cls(msg)
    err.request_sent = request_sent  # type: ignore[attr-defined]
    return err


class _StaleConnection(Exception):
    """A reused connection failed before any response byte; ``error`` if no retry is possible."""

    def __init__(self, error: UpstreamResetError):
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """``idle``: idle connections per endpoint; ``active``: checked out; counters since start."""

    idle: dict[Key, int]
    active: int
    opened: int
    reused: int
    stale_retries: int


class _Conn:
    __slots__ = ("got_bytes", "h11", "idle_since", "key", "out", "reused", "scope", "step", "stream")

    def __init__(self, key: Key, stream: trio.abc.Stream, max_head: int):
        self.key = key
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.idle_since = 0.0
        self.reused = False  # taken from the idle pool for the current exchange
        self.got_bytes = False  # a response byte arrived in the current exchange
        self.out = False  # checked out of the pool (guards the active counter)
        self.scope = trio.CancelScope()  # of the current exchange; its deadline is the step timer
        self.step = ""  # what the current step's timeout means, for the error message

    def failure(self, exc: BaseException | str, what: str) -> Exception:
        """The error for an I/O failure: a timeout, a reset, or a stale keep-alive to retry."""
        host, port = self.key
        if isinstance(exc, trio.TooSlowError):
            return UpstreamTimeoutError(f"{what} {host}:{port}: no progress")
        err = _reset(UpstreamResetError, f"{what} {host}:{port}: {exc!r}", request_sent=True)
        return _StaleConnection(err) if self.reused and not self.got_bytes else err


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

    async def request(self, host: str, port: int, head: RequestHead, body: Body | bytes = b"",
                      *, connect_timeout: float | None = None) -> Response:
        """Send ``head`` + ``body`` to ``host:port``; the response streams (see module doc)."""
        if self._closed:
            raise UpstreamConnectError("upstream pool is closed")
        key = (host, port)
        buffered = _buffered(body)
        body = body if buffered is None else buffered
        conn = await self._checkout(key)
        recorder = None
        if conn is not None:
            if not isinstance(body, bytes | bytearray):
                body = recorder = _RecordingBody(body, self._limits.replay_buffer_bytes)
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

    async def _checkout(self, key: Key) -> _Conn | None:
        now = trio.current_time()
        if now >= self._next_reap:
            await self._reap(now)
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if now - conn.idle_since < self._limits.idle_timeout:
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
            with trio.fail_after(timeout):
                stream = await self._connect(host, port)
        except trio.TooSlowError:
            raise UpstreamConnectError(f"connect {host}:{port}: timeout after {timeout} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"connect {host}:{port}: {exc}") from exc
        self._opened += 1
        self._active += 1
        conn = _Conn(key, stream, self._limits.max_headers_bytes)
        conn.out = True
        return conn

    async def _exchange(self, conn: _Conn, head: RequestHead, body: Body | bytes) -> Response:
        """Send the request and read the response head under one cancel scope, whose deadline
        is the timer of the current step (cheaper than a scope per operation)."""
        lim = self._limits
        try:
            with trio.CancelScope(deadline=trio.current_time() + lim.stream_idle_timeout) as scope:
                conn.scope, conn.step = scope, "sending stalled to"
                await self._send_request(conn, head, body)
                scope.deadline = trio.current_time() + lim.response_timeout
                conn.step = f"no response head in {lim.response_timeout} s from"
                event = await self._receive_head(conn)
            if scope.cancelled_caught:
                raise UpstreamTimeoutError(f"{conn.step} {conn.key[0]}:{conn.key[1]}")
            return await self._response(conn, event)
        except BaseException:
            await self.discard(conn)
            raise

    async def _send_request(self, conn: _Conn, head: RequestHead, body: Body | bytes) -> None:
        h = conn.h11
        try:
            headers = _request_headers(head, body, *conn.key)
            out = h.send(h11.Request(method=head.method, target=head.path, headers=headers)) or b""
            if isinstance(body, bytes | bytearray):
                if body:
                    out += h.send(h11.Data(data=body)) or b""
                await self._send(conn, out + (h.send(h11.EndOfMessage()) or b""), arm=False)
                return
            await self._send(conn, out, arm=False)
            chunks = body.__aiter__()
            while True:
                conn.scope.deadline = math.inf  # waiting for the downstream is not our timeout
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                if chunk:
                    await self._send(conn, h.send(h11.Data(data=chunk)) or b"")
            await self._send(conn, h.send(h11.EndOfMessage()) or b"")
        except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
            raise LocalProtocolError(f"cannot send request upstream: {exc}", 500) from exc

    async def _send(self, conn: _Conn, data: bytes, *, arm: bool = True) -> None:
        """``send_all`` with errors mapped; ``arm``: restart the stream-idle timer first."""
        if not data:
            return
        if arm:
            conn.scope.deadline = trio.current_time() + self._limits.stream_idle_timeout
        try:
            await conn.stream.send_all(data)
        except _IO_ERRORS as exc:
            raise conn.failure(exc, "sending to") from exc

    async def _receive_head(self, conn: _Conn) -> h11.Response:
        """The final response head (1xx skipped); raises per the module docstring."""
        lim, h, buf = self._limits, conn.h11, bytearray()
        try:
            while True:
                end = await receive_head(
                    conn.stream, buf, max_bytes=lim.max_headers_bytes, max_recv=lim.max_recv
                )
                conn.got_bytes = conn.got_bytes or bool(buf)
                if end < 0:
                    raise conn.failure("connection closed before a response head", "reading")
                data = bytes(buf)
                buf.clear()
                check_raw_head(data[:end], max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
                h.receive_data(data[:end])
                event = h.next_event()
                if type(event) is h11.Response:
                    if len(data) > end:
                        h.receive_data(data[end:])
                    return event
                if type(event) is not h11.InformationalResponse or event.status_code == 101:
                    raise RemoteProtocolError(f"unexpected {event!r}")
                buf += data[end:]
        except _IO_ERRORS as exc:
            conn.got_bytes = conn.got_bytes or bool(buf)
            raise conn.failure(exc, "reading from") from exc
        except (RemoteProtocolError, h11.RemoteProtocolError) as exc:
            msg = f"malformed response head from {conn.key[0]}:{conn.key[1]}: {exc}"
            raise _reset(UpstreamProtocolError, msg, request_sent=True) from exc

    async def _response(self, conn: _Conn, event: h11.Response) -> Response:
        try:
            decoded = decode_headers(event.headers)
            check_framing(event.http_version.decode("ascii"), decoded)
        except RemoteProtocolError as exc:
            msg = f"bad response framing from {conn.key[0]}:{conn.key[1]}: {exc}"
            raise _reset(UpstreamProtocolError, msg, request_sent=True) from exc
        reason = event.reason.decode("latin-1")
        head = ResponseHead(event.status_code, strip_hop_by_hop(decoded), reason)
        body = _ResponseBody(self, conn)
        if body.prefetch():
            await self.checkin(conn)
            return Response(head, body.take(), _noop)
        return Response(head, body, body.aclose)

    async def checkin(self, conn: _Conn) -> None:
        """Return ``conn`` after a complete exchange: to the idle pool if reusable, else close."""
        h = conn.h11
        reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
        stack = self._idle.setdefault(conn.key, [])
        if reusable and not self._closed and len(stack) < self._limits.max_idle_per_endpoint:
            if not h.trailing_data[0]:  # bytes after the response: the peer is confused
                self._active -= conn.out
                conn.out = conn.reused = False
                h.start_next_cycle()
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


def _request_headers(
    head: RequestHead, body: Body | bytes, host: str, port: int
) -> list[tuple[bytes, bytes]]:
    """Encoded headers with Host ensured and framing chosen for ``body``."""
    out: list[tuple[bytes, bytes]] = []
    has_host, declared = False, None
    for name, value in head.headers:
        if name == "content-length":
            declared = value
            continue
        if name == "transfer-encoding":
            continue
        has_host = has_host or name == "host"
        out.append((name.encode("ascii"), value.encode("latin-1")))
    if not has_host:
        name = f"[{host}]" if ":" in host else host
        out.insert(0, (b"host", (name if port == 80 else f"{name}:{port}").encode("ascii")))
    length = body_length(body)
    if length is None and declared is not None and declared.strip().isdigit():
        length = int(declared)
    if length is None:
        out.append((b"transfer-encoding", b"chunked"))
    elif length or declared is not None or head.method in _BODY_METHODS:
        out.append((b"content-length", b"%d" % length))
    return out


class _ResponseBody:
    """The upstream response body: chunks as they arrive, never buffered whole."""

    __slots__ = ("_chunks", "_conn", "_done", "_eof", "_pool")

    def __init__(self, pool: UpstreamPool, conn: _Conn):
        self._pool = pool
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._done = False
        self._eof = False

    def prefetch(self) -> bool:
        """Parse the bytes already received; True if that completed the body."""
        while True:
            event = self._next()
            if type(event) is h11.Data:
                self._chunks.append(event.data)
            else:
                self._done = type(event) is h11.EndOfMessage
                return self._done

    def take(self) -> bytes:
        return b"".join(self._chunks)

    def _next(self) -> object:
        try:
            return self._conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            cls = UpstreamResetError if self._eof else UpstreamProtocolError
            host, port = self._conn.key
            raise _reset(cls, f"response body from {host}:{port}: {exc}", True) from exc

    def __aiter__(self) -> _ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks:
            return self._chunks.popleft()
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._read()
        except BaseException:
            await self.aclose()
            raise
        if chunk is None:
            self._done = True
            await self._pool.checkin(self._conn)
            raise StopAsyncIteration
        return chunk

    async def _read(self) -> bytes | None:
        conn, lim = self._conn, self._pool._limits
        while True:
            event = self._next()
            if type(event) is h11.Data:
                return event.data
            if type(event) is h11.EndOfMessage:
                return None
            if event is not h11.NEED_DATA:
                raise _reset(UpstreamProtocolError, f"unexpected {event!r}", True)
            try:
                with trio.fail_after(lim.stream_idle_timeout):
                    data = await conn.stream.receive_some(lim.max_recv)
            except (trio.TooSlowError, *_IO_ERRORS) as exc:
                raise conn.failure(exc, "response body from") from exc
            self._eof = not data
            conn.h11.receive_data(data)

    async def aclose(self) -> None:
        """Close the connection unless the body was read to its end (idempotent)."""
        if not self._done:
            self._done = True
            self._chunks.clear()
            await self._pool.discard(self._conn)


class _RecordingBody:
    """A streamed request body that keeps its first ``limit`` bytes for a stale-retry replay."""

    __slots__ = ("_limit", "_src", "chunks", "expected_length", "size", "touched")

    def __init__(self, src: Body, limit: int):
        self._src = src.__aiter__()
        self._limit = limit
        self.expected_length = body_length(src)
        self.chunks: list[bytes] = []
        self.size = 0
        self.touched = False

    @property
    def replayable(self) -> bool:
        return self.size <= self._limit

    def __aiter__(self) -> _RecordingBody:
        return self

    async def __anext__(self) -> bytes:
        self.touched = True
        chunk = await self._src.__anext__()
        self.size += len(chunk)
        if self.size <= self._limit:
            self.chunks.append(chunk)
        else:
            self.chunks.clear()
        return chunk

    def replay(self) -> _ReplayBody:
        return _ReplayBody(self.chunks, self._src, self.expected_length)


class _ReplayBody:
    """Recorded chunks first, then the rest of the original body."""

    __slots__ = ("_first", "_src", "expected_length")

    def __init__(self, first: list[bytes], src: Body, expected_length: int | None):
        self._first = deque(first)
        self._src = src
        self.expected_length = expected_length

    def __aiter__(self) -> _ReplayBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            return self._first.popleft()
        return await self._src.__anext__()
