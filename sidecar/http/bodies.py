"""Streamed bodies of the HTTP layer: the server's request body and the client's replay buffer.

``RequestBody`` is what a handler iterates: chunks decoded (``sidecar.http.parser``) from the
connection's buffer, then from reads the connection times. ``RecordingBody`` / ``ReplayBody``
let the upstream pool resend a streamed request body after a stale keep-alive connection.
Both follow the ``messages`` conventions (``expected_length``, ``buffered``).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from meshd.errors import RemoteProtocolError
from sidecar.http.decoders import Decoder
from sidecar.http.messages import Body, body_length


class Source(Protocol):
    """The downstream connection as a body sees it."""

    buf: bytearray  # received bytes not decoded yet

    async def receive(self, body: RequestBody) -> bytes: ...


class RequestBody:
    """The request body given to the handler: chunks as they are read, never buffered whole.

    Bytes that arrived with the head are decoded before the handler runs (``prefetch``), so bad
    chunk framing there is a 400 without the handler. ``waiting_100``: the client sent
    ``Expect: 100-continue`` and no body byte arrived yet (h11's rule). ``error``: the framing
    error (``RemoteProtocolError``) met while the handler read, so the connection can answer
    400 and close even if a proxying handler turned it into another status.
    """

    __slots__ = (
        "_chunks", "_decoder", "_source", "_started", "error", "expected_length", "received", "waiting_100",
    )

    def __init__(self, source: Source, decoder: Decoder, expected_length: int | None, expect_100: bool):
        self._source = source
        self._decoder = decoder
        self._chunks: deque[bytes] = deque()
        self._started = False
        self.expected_length = expected_length
        self.received = 0  # body bytes decoded so far
        self.waiting_100 = expect_100 and not decoder.done
        self.error: RemoteProtocolError | None = None  # bad framing met while the handler read

    @property
    def done(self) -> bool:
        """The body's end was decoded (chunks may still be queued)."""
        return self._decoder.done

    @property
    def buffered(self) -> bytes | None:
        """The whole body if it already arrived and nothing was read yet, else None."""
        if not self._decoder.done or self._started:
            return None
        return b"".join(self._chunks) if self._chunks else b""

    def prefetch(self, buf: bytearray) -> None:
        """Decode the body bytes in ``buf``, leaving what follows the body. Raises
        ``RemoteProtocolError`` (400)."""
        decoder = self._decoder
        if buf and not decoder.done:
            data = bytes(buf)
            buf.clear()
            payload, rest = decoder.feed(data)
            buf += rest
            if payload:
                self._chunks.append(payload)
                self.received += len(payload)
                self.waiting_100 = False
        if decoder.done:
            self.expected_length = self.received
            self.waiting_100 = False

    def drainable(self, budget: int) -> bool:
        """False when the unread rest is known to exceed ``budget`` (close instead)."""
        if self._decoder.done or self.expected_length is None:
            return True  # chunked: try, and close if the budget runs out
        return self.expected_length - self.received <= budget

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        if self._chunks:
            return self._chunks.popleft()
        decoder, source = self._decoder, self._source
        while not decoder.done:
            data = await source.receive(self)
            try:
                payload, rest = decoder.feed(data)  # b"" (EOF) raises 400
            except RemoteProtocolError as exc:
                self.error = exc  # the connection answers it, whatever the handler made of it
                raise
            if rest:
                source.buf += rest
            if payload:
                self.received += len(payload)
                self.waiting_100 = False
                return payload
        self.waiting_100 = False
        raise StopAsyncIteration


class RecordingBody:
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

    def __aiter__(self) -> RecordingBody:
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

    def replay(self) -> ReplayBody:
        return ReplayBody(self.chunks, self._src, self.expected_length)


class ReplayBody:
    """Recorded chunks first, then the rest of the original body."""

    __slots__ = ("_first", "_src", "expected_length")

    def __init__(self, first: list[bytes], src: Body, expected_length: int | None):
        self._first = deque(first)
        self._src = src
        self.expected_length = expected_length

    def __aiter__(self) -> ReplayBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            return self._first.popleft()
        return await self._src.__anext__()
