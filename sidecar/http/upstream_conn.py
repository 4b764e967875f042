"""One pooled upstream connection, its errors, and the streamed response body it delivers.

Used by ``sidecar.http.client.UpstreamPool`` (see its docstring for the flow and the error
taxonomy). ``response_parts`` picks the response body's framing the way RFC 9112 §6.3 and h11
do: none for HEAD, 204, 304 and a 2xx to CONNECT; then chunked; then Content-Length; else the
body runs until EOF and the connection is not reused.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import trio

from meshd.errors import RemoteProtocolError, UpstreamResetError, UpstreamTimeoutError
from sidecar.core.headers import split_hop_by_hop
from sidecar.http.decoders import ChunkedDecoder, Decoder, EOFDecoder, LengthDecoder
from sidecar.http.limits import ClientLimits
from sidecar.http.messages import RequestHead, ResponseHead
from sidecar.http.parser import ParsedResponse

Key = tuple[str, int]
IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class UpstreamProtocolError(UpstreamResetError):
    """The upstream sent a malformed response (502, Envoy flag UPE)."""

    response_flag = "UPE"
    status = 502


def reset(cls: type[UpstreamResetError], msg: str, request_sent: bool) -> UpstreamResetError:
    err = cls(msg)
    err.request_sent = request_sent  # type: ignore[attr-defined]
    return err


class StaleConnection(Exception):
    """A reused connection failed before any response byte; ``error`` if no retry is possible."""

    def __init__(self, error: UpstreamResetError):
        super().__init__(str(error))
        self.error = error


class UpstreamConn:
    __slots__ = ("buf", "got_bytes", "host", "idle_since", "keep", "key", "opened_at", "out",
                 "reused", "scope", "stream")

    def __init__(self, key: Key, stream: trio.abc.Stream):
        self.key = key
        self.stream = stream
        host, port = key
        name = f"[{host}]" if ":" in host else host
        self.host = name if port == 80 else f"{name}:{port}"  # Host when the request has none
        self.buf = bytearray()  # received bytes not consumed yet (none when reusable)
        self.idle_since = 0.0
        self.opened_at = 0.0  # trio time the connection was made (max connection duration)
        self.keep = False  # the current exchange allows reuse
        self.reused = False  # taken from the idle pool for the current exchange
        self.got_bytes = False  # a response byte arrived in the current exchange
        self.out = False  # checked out of the pool (guards the active counter)
        self.scope = trio.CancelScope()  # of the current exchange; its deadline is the step timer

    def failure(self, exc: BaseException | str, what: str) -> Exception:
        """The error for an I/O failure: a timeout, a reset, or a stale keep-alive to retry."""
        host, port = self.key
        if isinstance(exc, trio.TooSlowError):
            return UpstreamTimeoutError(f"{what} {host}:{port}: no progress")
        err = reset(UpstreamResetError, f"{what} {host}:{port}: {exc!r}", request_sent=True)
        return StaleConnection(err) if self.reused and not self.got_bytes else err


class Pool(Protocol):
    async def checkin(self, conn: UpstreamConn) -> None: ...

    async def discard(self, conn: UpstreamConn) -> None: ...


def feed(conn: UpstreamConn, decoder: Decoder, data: bytes) -> bytes:
    """Decode ``data`` (b"": EOF); keep what follows the body in ``conn.buf`` (then the
    connection is not reused). Maps decoding errors: UPE, or a reset at EOF."""
    try:
        payload, rest = decoder.feed(data) if not decoder.done else (b"", data)
    except RemoteProtocolError as exc:
        cls = UpstreamProtocolError if data else UpstreamResetError
        host, port = conn.key
        raise reset(cls, f"response body from {host}:{port}: {exc}", True) from exc
    if rest:
        conn.buf += rest
    return payload


def response_parts(
    request: RequestHead, parsed: ParsedResponse, keep: bool, max_framing: int
) -> tuple[ResponseHead, Decoder, bool]:
    """The forwarded head, the body decoder, and whether the connection may be reused after."""
    headers, tokens = split_hop_by_hop(parsed.headers)
    status, method = parsed.status, request.method
    decoder: Decoder
    if method == "HEAD" or status == 204 or status == 304 or (method == "CONNECT" and status < 300):
        decoder = LengthDecoder(0)
    elif parsed.chunked:
        decoder = ChunkedDecoder(max_framing)
    elif parsed.length is not None:
        decoder = LengthDecoder(parsed.length)
    else:
        decoder, keep = EOFDecoder(), False
    keep = keep and parsed.version == "1.1" and "close" not in tokens
    return ResponseHead(status, headers, parsed.reason), decoder, keep


class ResponseBody:
    """The upstream response body: chunks as they arrive, never buffered whole."""

    __slots__ = ("_chunks", "_conn", "_decoder", "_done", "_limits", "_pool")

    def __init__(self, pool: Pool, conn: UpstreamConn, decoder: Decoder, limits: ClientLimits, first: bytes):
        self._pool = pool
        self._conn = conn
        self._decoder = decoder
        self._limits = limits
        self._chunks: deque[bytes] = deque((first,) if first else ())  # decoded with the head
        self._done = False

    def __aiter__(self) -> ResponseBody:
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
        conn, lim, decoder = self._conn, self._limits, self._decoder
        while not decoder.done:
            try:
                with trio.move_on_after(lim.stream_idle_timeout) as scope:
                    data = await conn.stream.receive_some(lim.max_recv)
            except IO_ERRORS as exc:
                raise conn.failure(exc, "response body from") from exc
            if scope.cancelled_caught:
                raise conn.failure(trio.TooSlowError(), "response body from")
            payload = feed(conn, decoder, data)
            if payload:
                return payload
        return None

    async def aclose(self) -> None:
        """Close the connection unless the body was read to its end (idempotent)."""
        if not self._done:
            self._done = True
            self._chunks.clear()
            await self._pool.discard(self._conn)
