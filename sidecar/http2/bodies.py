"""The two streamed bodies of the HTTP/2 layer, both following ``sidecar.http.messages``'
conventions (``expected_length``, ``buffered``, ``trailers``).

* ``RequestBody`` — what ``serve_h2`` hands the handler: DATA chunks as they arrive; the
  stream's flow-control window is credited back only when a chunk is read, so an unread
  stream buffers at most its window (backpressure to the client).
* ``ResponseStream`` — one upstream exchange of ``H2Pool``: the response head, then the body
  as an async iterator, its ``trailers`` set at the end; ``aclose`` cancels the stream.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import trio
from h2.errors import ErrorCodes

from meshd.errors import (
    MeshError,
    ProtocolError,
    RemoteProtocolError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from sidecar.http.messages import ResponseHead


class _Limits(Protocol):
    stream_idle_timeout: float


class BodySource(Protocol):
    """The server connection as a request body sees it."""

    limits: _Limits

    def credit(self, body: RequestBody, flow: int) -> None: ...


class StreamOwner(Protocol):
    """The upstream connection as a response stream sees it (``credit`` and ``reset`` queue
    frames that the connection's writer task sends)."""

    name: str
    limits: _Limits
    streams: dict[int, ResponseStream]
    idle_since: float

    def credit(self, sid: int, flow: int) -> None: ...

    def reset(self, sid: int, code: ErrorCodes) -> None: ...


def reset_error(msg: str) -> UpstreamResetError:
    err = UpstreamResetError(msg)
    err.request_sent = True  # type: ignore[attr-defined]
    return err



class RequestBody:
    """A request body (server side): DATA chunks as they arrive; flow-control credit returned when read."""

    __slots__ = ("_chunks", "_conn", "_wake", "done", "error", "expected_length", "sid", "started",
                 "unacked")

    def __init__(self, conn: BodySource, sid: int, expected_length: int | None) -> None:
        self._conn = conn
        self.sid = sid
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._wake = trio.Event()
        self.done = False
        self.error: ProtocolError | None = None
        self.expected_length = expected_length
        self.started = False
        self.unacked = 0  # flow-controlled bytes received and not yet credited back

    @property
    def buffered(self) -> bytes | None:
        if not self.done or self.started or self.error is not None:
            return None
        return b"".join(chunk for chunk, _ in self._chunks)

    def feed(self, data: bytes, flow: int) -> None:
        self.unacked += flow
        if data:
            self._chunks.append((data, flow))
        elif flow:
            self._conn.credit(self, flow)
        self._wake.set()

    def end(self, error: ProtocolError | None = None) -> None:
        self.done = True
        self.error = self.error or error
        self._wake.set()

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                raise StopAsyncIteration
            self._wake = trio.Event()
            with trio.move_on_after(self._conn.limits.stream_idle_timeout) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                raise RemoteProtocolError("request body stalled", 408)
        data, flow = self._chunks.popleft()
        self._conn.credit(self, flow)
        return data



class ResponseStream:
    """One stream: the response head, then its body as an async iterator (``trailers`` at the end)."""

    __slots__ = ("_chunks", "_wake", "closed", "conn", "done", "error", "expected_length", "got_head",
                 "head", "send_scope", "sending", "sid", "trailers")

    def __init__(self, conn: StreamOwner, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.head: ResponseHead | None = None
        self.got_head = trio.Event()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._wake = trio.Event()
        self.done = False
        self.error: MeshError | None = None
        self.trailers: tuple[tuple[str, str], ...] | None = None
        self.send_scope = trio.CancelScope()
        self.expected_length: int | None = None
        self.closed = False
        self.sending = False  # the request body task has not finished

    def fail(self, error: MeshError) -> None:
        if not self.done:
            self.error = self.error or error
        self.got_head.set()
        self._wake.set()

    def feed(self, data: bytes, flow: int) -> None:
        if data:
            self._chunks.append((data, flow))
        else:
            self.conn.credit(self.sid, flow)
        self._wake.set()

    def end(self) -> None:
        self.done = True
        self.got_head.set()
        self._wake.set()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self.done:
                await self.aclose()
                raise StopAsyncIteration
            if self.error is not None:
                await self.aclose()
                raise self.error
            self._wake = trio.Event()
            with trio.move_on_after(self.conn.limits.stream_idle_timeout) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                await self.aclose()
                raise UpstreamTimeoutError(f"response body from {self.conn.name}: no progress")
        data, flow = self._chunks.popleft()
        self.conn.credit(self.sid, flow)  # a WINDOW_UPDATE, if h2 makes one, goes with the next write
        return data

    async def aclose(self) -> None:
        """End the exchange: RST_STREAM(CANCEL) unless both directions completed (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.send_scope.cancel()
        conn = self.conn
        conn.streams.pop(self.sid, None)
        if not self.done or self.sending:
            conn.reset(self.sid, ErrorCodes.CANCEL)
        for _, flow in self._chunks:
            conn.credit(self.sid, flow)
        self._chunks.clear()
        self.done = True
        conn.idle_since = trio.current_time()
        await trio.lowlevel.checkpoint()
