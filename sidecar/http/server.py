"""Downstream HTTP/1.1: serve one connection on any ``trio.abc.Stream``.

Per request, in a keep-alive loop::

    wait for the first byte    idle_timeout; EOF or timeout -> close quietly
    read the whole head        header_timeout from that byte -> 408; > max_headers_bytes -> 431
    check_raw_head             obs-fold, bare CR/LF, control bytes, duplicate CL, > 100 lines
    parse_request_head         llhttp (strict) + h11's start-line rules + check_framing: CL+TE,
                               TE on 1.0, TE != chunked (501), Host missing or repeated, 505;
                               check_target: target form, Host syntax, absolute-form = Host
    decode received body bytes bad chunk framing -> 400 before the handler runs
    handler(head, body, info)  MeshError.status -> that status; anything else -> 500 + close;
                               bad body framing met while it read -> 400 + close regardless
    write the response         bytes body: one send_all; stream: one send_all per chunk
    finish the request body    drain <= max_drain_bytes within drain_timeout, else close

Rejections answer ``status + connection: close`` and close. The connection keeps one buffer:
the head is cut from it, the body decoder (``sidecar.http.decoders``) takes its bytes from it and
hands back what follows the body (pipelining), so every head passes ``check_raw_head`` before
the parser sees it. Responses are serialised by ``encode_response_head``. Timers are deadlines
on one cancel scope per connection (cheaper than a scope per operation): idle, head, and
``stream_idle_timeout`` around body reads and writes; never around the handler. Closing after a
response half-closes and reads for ``linger_timeout`` (nginx's lingering close), so unread
request bytes do not turn into a TCP RST that destroys the response. Peer misbehaviour never
escapes ``serve_http1``; ``trio.Cancelled`` does. CONNECT and Upgrade requests are answered
like any other and the connection closes after the response, unless the handler returns a
``TunnelResponse`` (``sidecar.http.upgrade``): then the connection is handed to its tunnel.
``gated(ConnectionGate(limits.max_connections), serve)`` caps a listener's open connections.
Every limit and the attack it answers: ``docs/security.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from meshd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from sidecar.core.headers import (
    check_raw_head,
    encode_response_head,
    find_head_end,
    split_hop_by_hop,
)
from sidecar.http.bodies import RequestBody
from sidecar.http.decoders import ChunkedDecoder, LengthDecoder
from sidecar.http.limits import DEFAULT_SERVER_LIMITS, ServerLimits
from sidecar.http.messages import Body, ConnInfo, Handler, RequestHead, Response, body_trailers
from sidecar.http.parser import parse_request_head
from sidecar.http.replies import PHRASES, error_response, raw_error, response_framing
from sidecar.http.replies import simple_response as simple_response
from sidecar.http.upgrade import TunnelResponse, switch_head, upgrade_token

log = logging.getLogger(__name__)

_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_KEEP, _CLOSE, _GONE = "keep", "close", "gone"  # outcome of one request cycle
_IDLE, _HEAD, _BUSY = "idle", "head", "busy"  # what a fired deadline means: quiet close / 408 / close
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
S = TypeVar("S", bound=trio.abc.AsyncResource)


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


class ConnectionGate:
    """The open-connection cap of one listener (Envoy's listener ``max_connections``, edge
    guide 10 000): ``admit`` says whether one more connection may be served. ``open`` is the
    number served now, ``refused`` counts the connections closed unserved."""

    __slots__ = ("limit", "open", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    def admit(self) -> bool:
        """Take a slot (True) or count a refusal (False); pair a True with ``release``."""
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


def gated(gate: ConnectionGate, serve: Callable[[S], Awaitable[None]]) -> Callable[[S], Awaitable[None]]:
    """Wrap a ``trio.serve_tcp`` connection handler: over ``gate.limit`` open connections a new
    one is closed at once, before any byte is read or a TLS handshake starts (the client sees
    EOF or a reset); connections already being served keep working."""

    async def serve_gated(stream: S) -> None:
        if not gate.admit():
            await trio.aclose_forcefully(stream)
            return
        try:
            await serve(stream)
        finally:
            gate.release()

    return serve_gated


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


class _Downstream:
    """One downstream connection: the keep-alive loop, its reads, writes and timers."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler, info: ConnInfo, limits: ServerLimits):
        self._stream = stream
        self._handler = handler
        self._info = info
        self._limits = limits
        self.buf = bytearray()  # received bytes not parsed yet (the body decoder takes from it)
        self._served = 0
        self._scope = trio.CancelScope()  # its deadline is the timer of the current phase
        self._phase = _IDLE
        self._responding = False  # response bytes may be on the wire for the current request
        self._sent_100 = False
        self._secure = isinstance(stream, trio.SSLStream)  # https:// targets allowed

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
        raw = await self._read_head()
        if raw is None:
            return _GONE
        req = parse_request_head(raw, secure=self._secure)
        headers, tokens = split_hop_by_hop(req.headers, keep_te_trailers=True)
        if req.upgrade and "upgrade" in tokens and req.method != "CONNECT":  # see http/upgrade.py
            token = upgrade_token(req.headers)
            headers = (*headers, ("upgrade", token)) if token else headers
        keep_alive = req.version == "1.1" and "close" not in tokens and not req.upgrade
        lim = self._limits
        decoder = ChunkedDecoder(lim.max_headers_bytes) if req.chunked else LengthDecoder(req.length or 0)
        body = RequestBody(self, decoder, req.length, req.expect_100)
        body.prefetch(self.buf)
        head = RequestHead(req.method, req.target, headers, req.version)
        self._served += 1
        self._responding = self._sent_100 = False
        response = await self._call(head, body)
        if isinstance(response, TunnelResponse) and response.tunnel is not None:
            return await self._switch(response)
        if body.error is not None:  # bad body framing, maybe mapped to a 5xx by a proxy: 400
            if response.aclose is not None:
                await response.aclose()
            raise body.error
        unread = not decoder.done
        waiting_100 = body.waiting_100 and not self._sent_100
        drainable = body.drainable(lim.max_drain_bytes)
        close = not keep_alive or (unread and (waiting_100 or not drainable))
        if not await self._write(response, head, close):
            return _CLOSE
        if unread and not await self._drain(body):
            return _CLOSE
        return _KEEP

    async def _switch(self, response: TunnelResponse) -> str:
        """Send the head that switches protocols, then hand the connection (and the bytes read
        past the request head) to ``response.tunnel``; the connection ends with it."""
        try:
            data = switch_head(response)
            self._responding = True
            await self._send(data)
            self._phase, self._scope.deadline = _BUSY, math.inf
            rest, self.buf = bytes(self.buf), bytearray()
            await response.tunnel(self._stream, rest)  # type: ignore[misc]
        finally:
            if response.aclose is not None:
                await response.aclose()
        return _GONE

    async def _read_head(self) -> bytes | None:
        """The next request's head, complete and checked; None if the peer left. The bytes
        after the head stay in ``buf``."""
        lim, buf = self._limits, self.buf
        if not buf:
            self._arm(_IDLE, lim.idle_timeout)
            data = await self._stream.receive_some(lim.max_recv)
            if not data:
                return None
            end = -1 if data.startswith(b"\r\n") else find_head_end(data)
            if end >= 0:  # the usual case: a whole head in one read
                self._phase, self._scope.deadline = _BUSY, math.inf
                if end < len(data):
                    buf += memoryview(data)[end:]
                    data = data[:end]
                check_raw_head(data, max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
                return bytes(data)
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
        head = bytes(buf[:end])
        del buf[:end]
        check_raw_head(head, max_bytes=lim.max_headers_bytes, max_count=lim.max_headers_count)
        return head

    async def _call(self, head: RequestHead, body: Body) -> Response:
        try:
            return await self._handler(head, body, self._info)
        except Exception as exc:
            return error_response(exc)

    async def receive(self, body: RequestBody) -> bytes:
        """Buffered bytes, else the next read (b"" at EOF); sends ``100 Continue`` if awaited.

        A stall longer than ``stream_idle_timeout`` cancels the connection (408 if no response
        started).
        """
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        if body.waiting_100 and not self._sent_100:
            self._sent_100 = True
            await self._send(_CONTINUE)
        self._arm(_BUSY, self._limits.stream_idle_timeout)
        data = await self._stream.receive_some(self._limits.max_recv)
        self._scope.deadline = math.inf
        return data

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
        length, close_asked = response_framing(head.headers, status)
        is_bytes, chunked = isinstance(body, (bytes, bytearray)), False
        if no_body:
            pass
        elif is_bytes:
            if length is not None and length != len(body):
                raise LocalProtocolError(f"Content-Length {length} but {len(body)} body bytes", 500)
            length = len(body)
        elif length is None:
            chunked = request.http_version == "1.1"
            close = close or not chunked  # HTTP/1.0: the body ends at close
        close = close or close_asked or self._served >= self._limits.max_requests_per_connection
        reason = head.reason or PHRASES.get(status, "")
        data = encode_response_head(status, reason, head.headers, length=length, chunked=chunked, close=close)
        self._responding = True
        if no_body or is_bytes:
            await self._send(data if no_body or not body else data + body)  # type: ignore[operator]
            return not close
        await self._send(data)
        trailers = chunked and request.header("te") == "trailers"  # the client accepts trailers
        return await self._stream_body(body, length, chunked, trailers) and not close  # type: ignore[arg-type]

    async def _stream_body(self, body: Body, length: int | None, chunked: bool,
                           trailers: bool = False) -> bool:
        """Send ``body`` chunk by chunk; False if it did not match ``length``. ``trailers``:
        the body's trailers (``messages.body_trailers``) go in the last chunk (RFC 9112 §7.1.2)."""
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                return False
            await self._send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            await self._send(b"0\r\n" + (_trailer_block(body_trailers(body)) if trailers else b"") + b"\r\n")
        return length is None or sent == length

    async def _drain(self, body: RequestBody) -> bool:
        """Discard the unread request body (<= max_drain_bytes, drain_timeout); True if done."""
        if body.waiting_100 and not self._sent_100:
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
            return body.done
        return False

    async def _send(self, data: bytes) -> None:
        self._arm(_BUSY, self._limits.stream_idle_timeout)  # left armed: covers the next chunk wait
        await self._stream.send_all(data)

    async def _send_error(self, exc: ProtocolError) -> None:
        status = exc.status_hint if isinstance(exc, RemoteProtocolError) else 500
        if not isinstance(exc, RemoteProtocolError):  # hostile input (501, 505 too) is no error
            log.error("closing connection from %s: %s", self._info.peer, exc)
        else:
            log.debug("rejected request from %s: %d %s", self._info.peer, status, exc)
        with trio.move_on_after(self._limits.linger_timeout):
            try:
                await self._stream.send_all(raw_error(status))
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


def _trailer_block(trailers: tuple[tuple[str, str], ...]) -> bytes:
    """Trailer fields as HTTP/1.1 lines; fields that could split the message are dropped."""
    lines = [f"{name}: {value}\r\n" for name, value in trailers
             if name.isascii() and " " not in name and ":" not in name
             and not any(c in value or c in name for c in "\r\n\x00")]
    return "".join(lines).encode("latin-1", "replace")
