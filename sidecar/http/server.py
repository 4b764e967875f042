"""Downstream HTTP/1.1: serve one connection on any ``trio.abc.Stream`` with h11 (server role).

Per request, in a keep-alive loop::

    wait for the first byte    idle_timeout; EOF or timeout -> close quietly
    read the whole head        header_timeout from that byte -> 408; > max_headers_bytes -> 431
    check_raw_head             obs-fold, bare CR/LF, control bytes, duplicate CL, > 100 lines
    h11 + check_framing        CL+TE, TE on 1.0, TE != chunked (501), bad Host, HTTP/2.0 (505)
    parse received body bytes  bad chunk framing -> 400 before the handler runs
    handler(head, body, info)  MeshError.status -> that status; anything else -> 500 + close
    write the response         bytes body: one send_all; stream: one send_all per chunk
    finish the request body    drain <= max_drain_bytes within drain_timeout, else close

Rejections answer ``status + connection: close`` and close. A fresh ``h11.Connection`` serves
each request; bytes after a request (pipelining) come back through ``trailing_data``, so every
head passes ``check_raw_head`` before h11 sees it. Closing after a response half-closes and
reads for ``linger_timeout`` (nginx's lingering close), so that unread request bytes do not turn
into a TCP RST that destroys the response. Peer misbehaviour never escapes ``serve_http1``;
``trio.Cancelled`` does.
"""

from __future__ import annotations

import logging
from collections import deque
from http import HTTPStatus

import h11
import trio

from meshd.errors import LocalProtocolError, MeshError, ProtocolError, RemoteProtocolError
from sidecar.core.headers import (
    check_framing,
    check_raw_head,
    declared_length,
    decode_headers,
    find_head_end,
    strip_hop_by_hop,
)
from sidecar.http.limits import DEFAULT_SERVER_LIMITS, ServerLimits
from sidecar.http.messages import Body, ConnInfo, Handler, RequestHead, Response, ResponseHead

log = logging.getLogger(__name__)

PHRASES: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_NO_BODY_STATUS = frozenset({204, 304})
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_KEEP, _CLOSE, _GONE = "keep", "close", "gone"  # outcome of one request cycle


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
    body = ((text or PHRASES.get(status, b"").decode()) + "\n").encode()
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    return Response(ResponseHead(status, tuple(headers)), body)


def _raw_error(status: int) -> bytes:
    """A complete ``connection: close`` error response, built without h11 (it may be in ERROR)."""
    phrase = PHRASES.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n" % (status, phrase) + (
        b"content-length: %d\r\nconnection: close\r\n\r\n%s\n" % (len(phrase) + 1, phrase)
    )


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

    def drainable(self) -> bool:
        """False when the unread rest is known to exceed the drain budget (close instead)."""
        if self.expected_length is None:
            return True  # chunked: try, and close if the budget runs out
        return self.expected_length - self.received <= self._conn.max_drain_bytes

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
    """One downstream connection: the keep-alive loop and its reads and writes."""

    def __init__(
        self, stream: trio.abc.Stream, handler: Handler, info: ConnInfo, limits: ServerLimits
    ):
        self._stream = stream
        self._handler = handler
        self._info = info
        self._limits = limits
        self._buf = bytearray()
        self._served = 0
        self.max_drain_bytes = limits.max_drain_bytes

    async def run(self) -> None:
        outcome = _KEEP
        try:
            while outcome is _KEEP:
                outcome = await self._serve_one()
        except ProtocolError as exc:
            await self._send_error(exc)
            outcome = _CLOSE
        if outcome is _CLOSE:
            await self._linger()

    async def _serve_one(self) -> str:
        data = await self._read_head()
        if data is None:
            return _GONE
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_headers_bytes)
        h.receive_data(data)
        head, body = self._parse(h)
        self._served += 1
        response = await self._call(head, body)
        waiting_100 = h.they_are_waiting_for_100_continue
        close = h.their_state is not h11.DONE and (waiting_100 or not body.drainable())
        if not await self._write(h, response, head.method, close) or h.our_state is not h11.DONE:
            return _CLOSE
        if not await self._finish_body(h, body, waiting_100):
            return _CLOSE
        self._buf += h.trailing_data[0]
        return _KEEP

    async def _read_head(self) -> bytes | None:
        """The next request's bytes, a complete checked head first; None if the peer left."""
        lim, buf = self._limits, self._buf
        if not buf:
            data = b""
            with trio.move_on_after(lim.idle_timeout):
                data = await self._stream.receive_some(lim.max_recv)
            if not data:
                return None
            buf += data
        end = -1 if buf.startswith(b"\r\n") else find_head_end(buf)
        if end < 0:
            try:
                with trio.fail_after(lim.header_timeout):
                    end = await receive_head(
                        self._stream,
                        buf,
                        max_bytes=lim.max_headers_bytes,
                        max_recv=lim.max_recv,
                        skip_empty_lines=True,
                    )
            except trio.TooSlowError:
                raise RemoteProtocolError("request head not received in time", 408) from None
            if end < 0:
                return None
        data = bytes(buf)
        buf.clear()
        check_raw_head(data[:end], max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
        return data

    def _parse(self, h: h11.Connection) -> tuple[RequestHead, _RequestBody]:
        """The checked request head and its body. Raises ``RemoteProtocolError``."""
        event = _next_event(h)
        if type(event) is not h11.Request:
            raise RemoteProtocolError("incomplete request head", 400)
        version = event.http_version.decode("ascii")
        decoded = decode_headers(event.headers)
        check_framing(version, decoded)
        method, target = event.method.decode("ascii"), event.target.decode("ascii")
        head = RequestHead(method, target, strip_hop_by_hop(decoded), version)
        body = _RequestBody(self, h, declared_length(decoded))
        body.prefetch()
        return head, body

    async def _call(self, head: RequestHead, body: Body) -> Response:
        try:
            return await self._handler(head, body, self._info)
        except Exception as exc:
            return _error_response(exc)

    async def receive_body(self, h: h11.Connection) -> bytes | None:
        """Next request body chunk, None at its end; sends ``100 Continue`` if awaited.

        Raises ``RemoteProtocolError``: 400 on bad framing or EOF, 408 if the body stalls.
        """
        while True:
            event = _next_event(h)
            if type(event) is h11.Data:
                return event.data
            if event is not h11.NEED_DATA:
                return None
            if h.they_are_waiting_for_100_continue:
                await self._send(h.send(h11.InformationalResponse(status_code=100, headers=())))
            try:
                with trio.fail_after(self._limits.stream_idle_timeout):
                    data = await self._stream.receive_some(self._limits.max_recv)
            except trio.TooSlowError:
                raise RemoteProtocolError("request body stalled", 408) from None
            h.receive_data(data)  # b"" is EOF: h11 raises on the next event

    async def _write(self, h: h11.Connection, response: Response, method: str, close: bool) -> bool:
        """Send ``response``; False if it was cut short. Always awaits ``response.aclose``.

        Raises ``LocalProtocolError`` (500) if the handler's head cannot be sent at all.
        """
        head_sent = False
        try:
            head, body = response.head, response.body
            no_body = method == "HEAD" or head.status in _NO_BODY_STATUS
            reason = head.reason.encode("latin-1") if head.reason else PHRASES.get(head.status, b"")
            headers = self._headers(head, body, no_body, close)
            event = h11.Response(status_code=head.status, headers=headers, reason=reason)
            if isinstance(body, bytes | bytearray):
                out = h.send(event) or b""
                if body and not no_body:
                    out += h.send(h11.Data(data=body)) or b""
                out += h.send(h11.EndOfMessage()) or b""
                head_sent = True
                await self._send(out)
                return True
            out = h.send(event) or b""
            head_sent = True
            await self._send(out)
            if not no_body:
                async for chunk in body:
                    if chunk:
                        await self._send(h.send(h11.Data(data=chunk)) or b"")
            await self._send(h.send(h11.EndOfMessage()) or b"")
            return True
        except _PEER_GONE:
            raise
        except Exception as exc:
            if not head_sent:
                raise LocalProtocolError(f"handler response not sendable: {exc!r}", 500) from exc
            log.info("response to %s cut short: %r", self._info.peer, exc)
            return False
        finally:
            if response.aclose is not None:
                await response.aclose()

    def _headers(
        self, head: ResponseHead, body: Body | bytes, no_body: bool, close: bool
    ) -> list[tuple[bytes, bytes]]:
        """Encoded response headers, plus Content-Length for a bytes body and a close at the cap."""
        headers = [(n.encode("ascii"), v.encode("latin-1")) for n, v in head.headers]
        if (
            isinstance(body, bytes | bytearray)
            and not no_body
            and head.header("content-length") is None
        ):
            headers.append((b"content-length", b"%d" % len(body)))
        if close or self._served >= self._limits.max_requests_per_connection:
            headers.append((b"connection", b"close"))
        return headers

    async def _finish_body(self, h: h11.Connection, body: _RequestBody, waiting_100: bool) -> bool:
        """True once the request body is fully read, discarding at most ``max_drain_bytes``."""
        if h.their_state is h11.DONE:
            return True
        if waiting_100 or h.their_state is not h11.SEND_BODY:
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
        if data:
            with trio.fail_after(self._limits.stream_idle_timeout):
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
