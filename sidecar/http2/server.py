"""Downstream HTTP/2: serve one connection on any ``trio.abc.Stream`` with the ``h2`` library.

``serve_h2(stream, handler, info, limits)`` calls the same ``Handler`` as ``serve_http1``
(``RequestHead``, ``Body``, ``ConnInfo`` -> ``Response``), one task per stream in a nursery::

    read loop      receive_some -> h2 events -> dispatch; one flush of h2's output per read
    writer task    h2's output once per scheduler batch: the frames of every stream that
                   answered in the same batch go out in one send (stream tasks wait only when
                   more than WRITE_HIGH_WATER bytes are queued: backpressure)
    HEADERS        head (sidecar.http2.convert; > 60 KiB / 100 fields -> 431) -> stream task
    DATA           queued on the stream's body; WINDOW_UPDATE only when the handler reads it
                   (so a stream buffers at most its window, INITIAL_STREAM_WINDOW)
    RST_STREAM     the stream task is cancelled; counted by the rapid-reset guard
    stream task    handler -> HEADERS, DATA within the peer's window, trailers or END_STREAM

Protection (``sidecar.http2.limits``; each closes with GOAWAY, the last stream id being the
last stream handed to a task): rapid reset (``guard.ResetGuard``, ENHANCE_YOUR_CALM), PING and
SETTINGS floods (``guard.RateGuard``, ENHANCE_YOUR_CALM), HPACK bombs and CONTINUATION floods
(h2's own DenialOfServiceError/ProtocolError, COMPRESSION_ERROR/PROTOCOL_ERROR), more than
``max_concurrent_streams`` open streams (h2, PROTOCOL_ERROR). Events are dispatched one by one
and the loop stops at the first trip, so a batch of 50 000 resets in one read never reaches
the handler beyond the trip point.

Drain: when ``drain`` is set, a GOAWAY (NO_ERROR) names the last stream processed; open
streams may finish within ``drain_timeout``; later streams are refused (REFUSED_STREAM, safe
to retry). Response trailers: a streamed body's ``trailers`` attribute (``messages``) after
its end. Peer misbehaviour never escapes ``serve_h2``; ``trio.Cancelled`` does.
"""

from __future__ import annotations

import logging
import math

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from meshd.errors import ProtocolError, RemoteProtocolError
from sidecar.http.limits import LINGER_TIMEOUT, MAX_LINGER_BYTES
from sidecar.http.messages import ConnInfo, Handler, RequestHead, Response, body_trailers
from sidecar.http.replies import error_response, simple_response
from sidecar.http2.bodies import RequestBody
from sidecar.http2.convert import request_head, response_headers, trailer_headers
from sidecar.http2.guard import RateGuard, ResetGuard
from sidecar.http2.h2conn import new_connection
from sidecar.http2.limits import DEFAULT_H2_LIMITS, H2Limits
from sidecar.http2.sender import H2Sender

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4 client connection preface
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)
_BYTES = (bytes, bytearray, memoryview)
_BODY_END = (h2.events.StreamEnded, h2.events.TrailersReceived)
_CONTROL = (h2.events.PingReceived, h2.events.RemoteSettingsChanged)


async def serve_h2(stream: trio.abc.Stream, handler: Handler, info: ConnInfo,
                   limits: H2Limits = DEFAULT_H2_LIMITS, *, drain: trio.Event | None = None) -> None:
    """Serve HTTP/2 streams on ``stream`` (h2c prior knowledge or TLS with ALPN ``h2``; the
    client preface is read from ``stream``) until the peer leaves, idles out or misbehaves.

    Closes ``stream`` before returning. Returns normally on any peer error; logs our own bugs.
    """
    conn = H2Server(stream, handler, info, limits)
    try:
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            nursery.start_soon(conn.writer)
            if drain is not None:
                nursery.start_soon(conn.drain_on, drain)
            try:
                await conn.run()
            except _PEER_GONE:  # inside the nursery, so it never becomes an ExceptionGroup
                pass
            nursery.cancel_scope.cancel()
    except Exception:
        log.exception("HTTP/2 connection from %s failed", info.peer)
    finally:
        with trio.move_on_after(1.0):
            await stream.aclose()


class _Stream:
    __slots__ = ("body", "head", "reset_by_peer", "scope", "sid")

    def __init__(self, sid: int, head: RequestHead, body: RequestBody) -> None:
        self.sid = sid
        self.head = head
        self.body = body
        self.scope = trio.CancelScope()
        self.reset_by_peer = False


class H2Server(H2Sender):
    """One downstream HTTP/2 connection; see the module docstring."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler, info: ConnInfo, limits: H2Limits):
        self.stream = stream
        self.handler = handler
        self.info = info
        self.limits = limits
        self.h2 = new_connection(client_side=False, settings={
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.hpack_max_decoded_bytes,
        }, max_header_list_size=limits.hpack_max_decoded_bytes)
        self.nursery: trio.Nursery | None = None
        self.streams: dict[int, _Stream] = {}
        self.resets = ResetGuard(limits.rapid_reset_min_streams, limits.rapid_reset_ratio,
                                 limits.premature_reset_seconds)
        self.control = RateGuard(limits.max_control_frames_per_second)
        self.last_sid = 0  # last stream handed to a task (GOAWAY's last_stream_id)
        self.streams_total = 0
        self.draining = False
        self.closing: tuple[ErrorCodes, str] | None = None
        self.failed = False  # h2 found a protocol error (and queued its GOAWAY)
        self._init_sender()
        self._idle = trio.Event()  # set when the last stream of a draining connection ends
        self._read_scope: trio.CancelScope | None = None
        self._read_deadline = math.inf

    # -- read side -------------------------------------------------------------------------
    async def run(self) -> None:
        lim = self.limits
        await self.initiate(lim.connection_window)
        self._read_deadline = trio.current_time() + lim.preface_timeout
        try:
            while not self.draining or self.streams:
                with trio.CancelScope(deadline=self._read_deadline) as self._read_scope:
                    data = await self.stream.receive_some(lim.max_recv)
                    if not data:
                        return
                    if not self._receive(data):
                        break
                    await self.flush()
                    self._read_deadline = math.inf if self.streams else trio.current_time() + lim.idle_timeout
                    continue
                if not self.streams:  # idle, or silent before the preface: close quietly
                    self.closing = (ErrorCodes.NO_ERROR, "idle")
                    break
        finally:
            self._read_scope = None
        if self.closing is not None:
            await self._goaway(*self.closing)
        else:
            await self.flush()
        if self.failed or (self.closing is not None and self.closing[0] != ErrorCodes.NO_ERROR):
            await self._linger()

    def _receive(self, data: bytes) -> bool:
        """Feed ``data`` to h2 and dispatch its events; False when the connection must end."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 queued a GOAWAY already
            log.info("HTTP/2 protocol error from %s: %s", self.info.peer, exc)
            self.closing, self.failed = None, True
            return False
        now = trio.current_time()
        for event in events:
            self._dispatch(event, now)
            if self.closing is not None:
                log.warning("HTTP/2 connection from %s cut off: %s", self.info.peer, self.closing[1])
                return False
        return True

    def _dispatch(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.DataReceived):
            st = self.streams.get(event.stream_id)
            if st is None:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                st.body.feed(event.data, event.flow_controlled_length)
                if event.stream_ended:
                    st.body.end()
        elif isinstance(event, h2.events.RequestReceived):
            self._open(event, now)
        elif isinstance(event, _BODY_END):
            st = self.streams.get(event.stream_id)
            if st is not None:
                st.body.end()
        elif isinstance(event, h2.events.StreamReset):
            self._peer_reset(event.stream_id, now)
        elif isinstance(event, h2.events.WindowUpdated):
            self.windows_grew()
        elif isinstance(event, _CONTROL):
            if not self.control.hit(now):
                self.closing = (ErrorCodes.ENHANCE_YOUR_CALM, "PING/SETTINGS flood")
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self.windows_grew()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.draining = True  # the client said goodbye: finish what is open

    def _open(self, event: h2.events.RequestReceived, now: float) -> None:
        sid = event.stream_id
        self.resets.opened(sid, now)
        self.last_sid = sid
        self.streams_total += 1
        lim = self.limits
        if self.draining or (lim.max_streams_per_connection
                             and self.streams_total > lim.max_streams_per_connection):
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            self.resets.closed(sid, now, reset_by_peer=False)
            return
        try:
            head = request_head(event.headers or (), max_bytes=lim.max_headers_bytes,
                                max_count=lim.max_headers_count)
        except RemoteProtocolError as exc:
            self._reject(sid, exc.status_hint, not event.stream_ended)
            self.resets.closed(sid, now, reset_by_peer=False)
            return
        length = head.header("content-length")
        body = RequestBody(self, sid, int(length) if length and length.isdigit() else None)
        if event.stream_ended:
            body.end()
            body.expected_length = 0
        st = self.streams[sid] = _Stream(sid, head, body)
        assert self.nursery is not None
        self.nursery.start_soon(self._serve_stream, st)

    def _peer_reset(self, sid: int, now: float) -> None:
        st = self.streams.get(sid)
        if st is not None:
            st.reset_by_peer = True
            st.body.end(RemoteProtocolError("stream reset by the client", 400))
            st.scope.cancel()
        if self.resets.closed(sid, now, reset_by_peer=True):
            self.closing = (ErrorCodes.ENHANCE_YOUR_CALM, "rapid reset (premature stream resets)")

    def _reject(self, sid: int, status: int, request_open: bool) -> None:
        """Answer a stream we will not serve (431/400) with a bodiless response."""
        self.h2.send_headers(sid, [(b":status", b"%d" % status), (b"content-length", b"0")], end_stream=True)
        if request_open:
            self._reset(sid, ErrorCodes.NO_ERROR)  # RFC 9113 §8.1: response complete, stop sending

    def _reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.H2Error:
            pass
        self._want.set()

    def credit(self, body: RequestBody, flow: int) -> None:
        """Return ``flow`` bytes of window for data the handler has read."""
        if flow <= 0:
            return
        body.unacked -= flow
        self.acknowledge(body.sid, flow)

    # -- stream tasks ----------------------------------------------------------------------
    async def _serve_stream(self, st: _Stream) -> None:
        resp: Response | None = None
        try:
            with st.scope:
                try:
                    resp = await self.handler(st.head, st.body, self.info)
                except Exception as exc:
                    resp = error_response(exc)
                await self._respond(st, resp)
        except (*_PEER_GONE, h2.exceptions.H2Error):
            pass
        except Exception:
            log.exception("HTTP/2 stream %d from %s failed", st.sid, self.info.peer)
            self._reset(st.sid, ErrorCodes.INTERNAL_ERROR)
        finally:
            if resp is not None and resp.aclose is not None:
                deadline = trio.current_time() + self.limits.drain_timeout
                with trio.CancelScope(shield=True, deadline=deadline):
                    try:
                        await resp.aclose()
                    except Exception:
                        log.debug("aclose of stream %d failed", st.sid, exc_info=True)
            self._finish(st)

    async def _respond(self, st: _Stream, resp: Response) -> None:
        head, body, h2c = resp.head, resp.body, self.h2
        try:
            if not 200 <= head.status <= 999:
                raise ValueError(f"handler returned status {head.status}")
            headers = response_headers(head)
        except Exception as exc:
            log.error("unsendable response on stream %d: %s", st.sid, exc)
            plain = simple_response(500)
            head, body = plain.head, plain.body
            headers = response_headers(head)
        no_body = st.head.method == "HEAD" or head.status in (204, 304)
        if no_body or (isinstance(body, _BYTES) and not body):
            h2c.send_headers(st.sid, headers, end_stream=True)
            self._want.set()
            return
        h2c.send_headers(st.sid, headers)
        if isinstance(body, _BYTES):
            await self.send_data(st.sid, bytes(body), end=True)
            return
        try:
            async for chunk in body:
                if chunk:
                    await self.send_data(st.sid, chunk if isinstance(chunk, bytes) else bytes(chunk))
        except ProtocolError as exc:  # the upstream broke mid-body: reset, never truncate
            log.info("response body of stream %d cut: %s", st.sid, exc)
            self._reset(st.sid, ErrorCodes.INTERNAL_ERROR)
            self._want.set()
            return
        trailers = body_trailers(body)
        if trailers:
            h2c.send_headers(st.sid, trailer_headers(trailers), end_stream=True)
        else:
            h2c.end_stream(st.sid)
        self._want.set()

    def _finish(self, st: _Stream) -> None:
        self.streams.pop(st.sid, None)
        if not st.reset_by_peer:
            self.resets.closed(st.sid, trio.current_time(), reset_by_peer=False)
            if not st.body.done:
                self._reset(st.sid, ErrorCodes.NO_ERROR)  # response done, request still open
        if st.body.unacked:
            self.acknowledge(st.sid, st.body.unacked)
            st.body.unacked = 0
        if not self.streams:
            self._idle.set()
            self._read_deadline = trio.current_time() + self.limits.idle_timeout
            if self._read_scope is not None:
                self._read_scope.deadline = self._read_deadline

    # -- write side ------------------------------------------------------------------------
    async def writer(self) -> None:
        """Send h2's output whenever a stream queued some, after one checkpoint so that every
        stream task woken in the same scheduler batch adds its frames to the same send. A peer
        that stops reading for ``stream_idle_timeout`` ends the connection."""
        try:
            await self.write_loop()
        except _PEER_GONE:
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()

    async def _goaway(self, code: ErrorCodes, why: str) -> None:
        """GOAWAY (``code``, last stream processed) without ending h2's state machine."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_sid
        frame.error_code = code
        frame.additional_data = why.encode()[:64]
        async with self._lock:
            data = self.h2.data_to_send() + frame.serialize()
            with trio.move_on_after(1.0):
                try:
                    await self.stream.send_all(data)
                except _PEER_GONE:
                    pass

    async def _linger(self) -> None:
        """Half-close, then read and drop for ``LINGER_TIMEOUT`` (≤ ``MAX_LINGER_BYTES``), so the
        GOAWAY is not destroyed by a TCP RST over unread bytes (nginx/Envoy delayed close)."""
        with trio.move_on_after(LINGER_TIMEOUT):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                left = MAX_LINGER_BYTES
                while left > 0:
                    data = await self.stream.receive_some(self.limits.max_recv)
                    if not data:
                        break
                    left -= len(data)
            except (*_PEER_GONE, OSError):
                pass

    async def drain_on(self, event: trio.Event) -> None:
        """On ``event``: GOAWAY(NO_ERROR), refuse new streams, let open ones finish within
        ``drain_timeout``, then end the connection."""
        await event.wait()
        self.draining = True
        await self._goaway(ErrorCodes.NO_ERROR, "draining")
        if self.streams:
            with trio.move_on_after(self.limits.drain_timeout):
                self._idle = trio.Event()
                await self._idle.wait()
        with trio.move_on_after(1.0):  # the last responses, queued for the writer
            try:
                await self.flush()
            except _PEER_GONE:
                pass
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()
