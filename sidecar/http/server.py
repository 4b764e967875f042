"""Downstream HTTP/1.1: serve one connection on any ``trio.abc.Stream`` (h11 parses requests).

Per request, in a keep-alive loop::

    wait for the first byte    idle_timeout; EOF or timeout -> close quietly
    read the whole head        header_timeout from that byte -> 408; > max_headers_bytes -> 431
    check_raw_head             obs-fold, bare CR/LF, control bytes, duplicate CL, > 100 lines
    h11 + check_framing        CL+TE, TE on 1.0, TE != chunked (501), bad Host, HTTP/2.0 (505)
    parse received body bytes  bad chunk framing -> 400 before the handler runs
    handler(head, body, info)  MeshError.status -> that status; anything else -> 500 + close
    write the response         bytes body: one send_all; stream: one send_all per chunk
    finish the request body    drain <= max_drain_bytes within drain_timeout, else close

Rejections answer ``status + connection: close`` and close. A fresh ``h11.Connection`` parses
each request; bytes after a request (pipelining) come back through ``trailing_data``, so every
head passes ``check_raw_head`` before h11 sees it. Responses are serialised by
``encode_response_head`` (h11's writer cost about as much CPU as everything else together).
Timers are deadlines on one cancel scope per connection (cheaper than a scope per operation):
idle, head, and ``stream_idle_timeout`` around body reads and writes; never around the handler.
Closing after a response half-closes and reads for ``linger_timeout`` (nginx's lingering close),
so unread request bytes do not turn into a TCP RST that destroys the response. Peer misbehaviour
never escapes ``serve_http1``; ``trio.Cancelled`` does.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from http import HTTPStatus

import h11
import trio

from meshd.errors import LocalProtocolError, MeshError, ProtocolError, RemoteProtocolError
from sidecar.core.headers import (
    check_framing,
    check_raw_head,
    connection_tokens,
    declared_length,
    decode_headers,
    encode_response_head,
    find_head_end,
    strip_hop_by_hop,
)
from sidecar.http.limits import DEFAULT_SERVER_LIMITS, ServerLimits
from sidecar.http.messages import Body, ConnInfo, Handler, RequestHead, Response, ResponseHead

log = logging.getLogger(__name__)

PHRASES: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_KEEP, _CLOSE, _GONE = "keep", "close", "gone"  # outcome of one request cycle
_IDLE, _HEAD, _BUSY = "idle", "head", "busy"  # what a fired deadline means: quiet close / 408 / close
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def serve_http1(
    stream: trio.abc.Stream,
    handler: Handler,
    info: ConnInfo,
    *,
    limits: ServerLimits = DEFAULT_SERVER_LIMITS,
) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until the peer closes, idles out or misbehaves.

    Closes ``stream`` before returning. Returns normally on any peer error; logs our own bugs.
    """
    conn = _Downstream(stream, handler, info, limits)
    try:
        await conn.run()
    except _PEER_GONE:
        pass
    except Exception:
        log.exception("HTTP/1.1 connection from %s failed", info.peer)
    finally:
        with trio.move_on_after(limits.linger_timeout):
            await stream.aclose()


async def receive_head(
    stream: trio.abc.ReceiveStream,
    buf: bytearray,
    *,
    max_bytes: int,
    max_recv: int,
    skip_empty_lines: bool = False,
) -> int:
    """Read into ``buf`` until it holds a complete head; return the head's end offset.

    Returns -1 if the peer closed first (``buf`` keeps any partial head). Raises
    ``RemoteProtocolError`` (431) once more than ``max_bytes`` arrived without the blank line,
    whatever the read sizes. ``skip_empty_lines``: drop CRLFs before a request line
    (RFC 9112 §2.2).
    """
    scan = 0
    while True:
        if skip_empty_lines and scan == 0:
            while buf.startswith(b"\r\n"):
                del buf[:2]
        end = find_head_end(buf, scan)
        if end >= 0:
            return end
        if len(buf) > max_bytes:
            raise RemoteProtocolError(f"head exceeds {max_bytes} bytes", 431)
        scan = max(0, len(buf) - 3)
        data = await stream.receive_some(max_recv)
        if not data:
            return -1
        buf += data


def simple_response(status: int, text: str = "", *, close: bool = False) -> Response:
    """A short ``text/plain`` response (the reason phrase when ``text`` is empty)."""
    body = ((text or PHRASES.get(status, "")) + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    return Response(ResponseHead(status, tuple(headers)), body)


def _raw_error(status: int) -> bytes:
    """A complete ``connection: close`` error response for a request we could not parse."""
    phrase = PHRASES.get(status, "Error")
    headers = (("content-type", "text/plain; charset=utf-8"),)
    body = phrase.encode() + b"\n"
    head = encode_response_head(status, phrase, headers, length=len(body), chunked=False, close=True)
    return head + body


def _error_response(exc: Exception) -> Response:
    """Map a handler exception: downstream protocol errors and unknown failures close."""
    status = getattr(exc, "status", None)
    if isinstance(exc, RemoteProtocolError):
        return simple_response(exc.status_hint, close=True)
    if isinstance(exc, MeshError) and not isinstance(exc, ProtocolError) and type(status) is int:
        return simple_response(status)
    log.error("handler failed", exc_info=exc)
    return simple_response(500, close=True)


def _next_event(h: h11.Connection) -> object:
    """``h.next_event()`` with h11's errors mapped to ours (status hint kept)."""
    try:
        return h.next_event()
    except h11.RemoteProtocolError as exc:
        raise RemoteProtocolError(str(exc), exc.error_status_hint) from exc


def _response_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    """The handler's declared Content-Length; ``LocalProtocolError`` (500) if not a number."""
    for name, value in headers:
        if name == "content-length":
            if not value.strip().isdigit():
                raise LocalProtocolError(f"bad response Content-Length {value!r}", 500)
            return int(value)
    return None


class _RequestBody:
    """The request body given to the handler: chunks as they are read, never buffered whole.

    Bytes that arrived with the head are parsed before the handler runs (``prefetch``).
    """

    __slots__ = ("_chunks", "_conn", "_done", "_h11", "_started", "expected_length", "received")

    def __init__(self, conn: _Downstream, h: h11.Connection, expected_length: int | None):
        self._conn = conn
        self._h11 = h
        self._chunks: deque[bytes] = deque()
        self._done = False
        self._started = False
        self.expected_length = expected_length
        self.received = 0  # body bytes parsed so far

    @property
    def buffered(self) -> bytes | None:
        """The whole body if it already arrived and nothing was read yet, else None."""
        return b"".join(self._chunks) if self._done and not self._started else None

    def prefetch(self) -> None:
        """Parse the body bytes already received. Raises ``RemoteProtocolError`` (400)."""
        while True:
            event = _next_event(self._h11)
            if type(event) is h11.Data:
                self._chunks.append(event.data)
                self.received += len(event.data)
            else:
                if type(event) is h11.EndOfMessage:
                    self._done = True
                    self.expected_length = self.received
                return

    def drainable(self, budget: int) -> bool:
        """False when the unread rest is known to exceed ``budget`` (close instead)."""
        if self._done or self.expected_length is None:
            return True  # chunked: try, and close if the budget runs out
        return self.expected_length - self.received <= budget

    def __aiter__(self) -> _RequestBody:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        if self._chunks:
            return self._chunks.popleft()
        if self._done:
            raise StopAsyncIteration
        chunk = await self._conn.receive_body(self._h11)
        if chunk is None:
            self._done = True
            raise StopAsyncIteration
        self.received += len(chunk)
        return chunk


class _Downstream:
    """One downstream connection: the keep-alive loop, its reads, writes and timers."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler, info: ConnInfo, limits: ServerLimits):
        self._stream = stream
        self._handler = handler
        self._info = info
        self._limits = limits
        self._buf = bytearray()
        self._served = 0
        self._scope = trio.CancelScope()  # its deadline is the timer of the current phase
        self._phase = _IDLE
        self._responding = False  # response bytes may be on the wire for the current request
        self._sent_100 = False

    def _arm(self, phase: str, seconds: float) -> None:
        self._phase = phase
        self._scope.deadline = trio.current_time() + seconds

    async def run(self) -> None:
        outcome, error = _CLOSE, None
        with self._scope:
            try:
                outcome = _KEEP
                while outcome is _KEEP:
                    outcome = await self._serve_one()
            except ProtocolError as exc:
                outcome, error = _CLOSE, exc
        if self._scope.cancelled_caught:
            if self._phase is _IDLE:
                return
            outcome = _CLOSE
            if not self._responding:
                error = RemoteProtocolError(f"request {self._phase} not received in time", 408)
        if error is not None:
            await self._send_error(error)
        if outcome is _CLOSE:
            await self._linger()

    async def _serve_one(self) -> str:
        data = await self._read_head()
        if data is None:
            return _GONE
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_headers_bytes)
        h.receive_data(data)
        head, body, keep_alive = self._parse(h)
        self._served += 1
        self._responding = self._sent_100 = False
        response = await self._call(head, body)
        waiting_100 = h.they_are_waiting_for_100_continue and not self._sent_100
        unread = h.their_state is not h11.DONE
        drainable = body.drainable(self._limits.max_drain_bytes)
        close = not keep_alive or (unread and (waiting_100 or not drainable))
        if not await self._write(response, head, close):
            return _CLOSE
        if unread and not await self._drain(h, body):
            return _CLOSE
        self._buf += h.trailing_data[0]
        return _KEEP

    async def _read_head(self) -> bytes | None:
        """The next request's bytes, a complete checked head first; None if the peer left."""
        lim, buf = self._limits, self._buf
        if not buf:
            self._arm(_IDLE, lim.idle_timeout)
            data = await self._stream.receive_some(lim.max_recv)
            if not data:
                return None
            buf += data
        end = -1 if buf.startswith(b"\r\n") else find_head_end(buf)
        if end < 0:
            self._arm(_HEAD, lim.header_timeout)
            end = await receive_head(
                self._stream,
                buf,
                max_bytes=lim.max_headers_bytes,
                max_recv=lim.max_recv,
                skip_empty_lines=True,
            )
            if end < 0:
                return None
        self._phase, self._scope.deadline = _BUSY, math.inf
        data = bytes(buf)
        buf.clear()
        check_raw_head(data[:end], max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
        return data

    def _parse(self, h: h11.Connection) -> tuple[RequestHead, _RequestBody, bool]:
        """The checked request head, its body, and whether the client allows keep-alive."""
        event = _next_event(h)
        if type(event) is not h11.Request:
            raise RemoteProtocolError("incomplete request head", 400)
        version = event.http_version.decode("ascii")
        decoded = decode_headers(event.headers)
        check_framing(version, decoded)
        keep_alive = version == "1.1" and "close" not in connection_tokens(decoded)
        method, target = event.method.decode("ascii"), event.target.decode("ascii")
        head = RequestHead(method, target, strip_hop_by_hop(decoded), version)
        body = _RequestBody(self, h, declared_length(decoded))
        body.prefetch()
        return head, body, keep_alive

    async def _call(self, head: RequestHead, body: Body) -> Response:
        try:
            return await self._handler(head, body, self._info)
        except Exception as exc:
            return _error_response(exc)

    async def receive_body(self, h: h11.Connection) -> bytes | None:
        """Next request body chunk, None at its end; sends ``100 Continue`` if awaited.

        Raises ``RemoteProtocolError`` (400) on bad framing or EOF. A stall longer than
        ``stream_idle_timeout`` cancels the connection (408 if no response started).
        """
        while True:
            event = _next_event(h)
            if type(event) is h11.Data:
                return event.data
            if event is not h11.NEED_DATA:
                return None
            if h.they_are_waiting_for_100_continue and not self._sent_100:
                self._sent_100 = True
                await self._send(_CONTINUE)
            self._arm(_BUSY, self._limits.stream_idle_timeout)
            data = await self._stream.receive_some(self._limits.max_recv)
            self._scope.deadline = math.inf
            h.receive_data(data)  # b"" is EOF: h11 raises on the next event

    async def _write(self, response: Response, request: RequestHead, close: bool) -> bool:
        """Send ``response``; True if it completed and the connection may stay open.

        Always awaits ``response.aclose``. Raises ``LocalProtocolError`` (500) if the head is
        invalid (nothing was sent then).
        """
        try:
            return await self._write_response(response, request, close)
        except _PEER_GONE:
            raise
        except Exception as exc:
            if not self._responding:  # nothing sent yet: run() answers 500
                raise LocalProtocolError(f"handler response not sendable: {exc!r}", 500) from exc
            log.info("response to %s cut short: %r", self._info.peer, exc)
            return False
        finally:
            if response.aclose is not None:
                await response.aclose()

    async def _write_response(self, response: Response, request: RequestHead, close: bool) -> bool:
        head, body = response.head, response.body
        status, method = head.status, request.method
        if not 200 <= status <= 999:
            raise LocalProtocolError(f"handler returned status {status}", 500)
        no_body = method == "HEAD" or status == 204 or status == 304
        length = None if status == 204 else _response_length(head.headers)
        is_bytes, chunked = isinstance(body, bytes | bytearray), False
        if no_body:
            pass
        elif is_bytes:
            if length is not None and length != len(body):
                raise LocalProtocolError(f"Content-Length {length} but {len(body)} body bytes", 500)
            length = len(body)
        elif length is None:
            chunked = request.http_version == "1.1"
            close = close or not chunked  # HTTP/1.0: the body ends at close
        close = close or self._served >= self._limits.max_requests_per_connection
        close = close or "close" in connection_tokens(head.headers)
        reason = head.reason or PHRASES.get(status, "")
        data = encode_response_head(status, reason, head.headers, length=length, chunked=chunked, close=close)
        self._responding = True
        if no_body or is_bytes:
            await self._send(data if no_body else data + body)  # type: ignore[operator]
            return not close
        await self._send(data)
        return await self._stream_body(body, length, chunked) and not close  # type: ignore[arg-type]

    async def _stream_body(self, body: Body, length: int | None, chunked: bool) -> bool:
        """Send ``body`` chunk by chunk; False if it did not match ``length``."""
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                return False
            await self._send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            await self._send(b"0\r\n\r\n")
        return length is None or sent == length

    async def _drain(self, h: h11.Connection, body: _RequestBody) -> bool:
        """Discard the unread request body (<= max_drain_bytes, drain_timeout); True if done."""
        if h.they_are_waiting_for_100_continue and not self._sent_100:
            return False  # the client may never send a body it was not asked for
        budget = self._limits.max_drain_bytes
        with trio.move_on_after(self._limits.drain_timeout):
            try:
                async for chunk in body:
                    budget -= len(chunk)
                    if budget < 0:
                        return False
            except ProtocolError:
                return False
            return h.their_state is h11.DONE
        return False

    async def _send(self, data: bytes) -> None:
        self._arm(_BUSY, self._limits.stream_idle_timeout)  # left armed: covers the next chunk wait
        await self._stream.send_all(data)

    async def _send_error(self, exc: ProtocolError) -> None:
        status = exc.status_hint if isinstance(exc, RemoteProtocolError) else 500
        if status >= 500:
            log.error("closing connection from %s: %s", self._info.peer, exc)
        else:
            log.debug("rejected request from %s: %d %s", self._info.peer, status, exc)
        with trio.move_on_after(self._limits.linger_timeout):
            try:
                await self._stream.send_all(_raw_error(status))
            except _PEER_GONE:
                pass

    async def _linger(self) -> None:
        """Half-close, then discard what the peer still sends for ``linger_timeout``."""
        lim = self._limits
        with trio.move_on_after(lim.linger_timeout):
            try:
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                left = lim.max_linger_bytes
                while left > 0:
                    data = await self._stream.receive_some(lim.max_recv)
                    if not data:
                        break
                    left -= len(data)
            except _PEER_GONE:
                pass
