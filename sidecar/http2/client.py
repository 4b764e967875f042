"""Upstream HTTP/2: one multiplexed connection per endpoint (more when one is full or going away).

``H2Pool.request(host, port, head, body)`` has ``UpstreamPool.request``'s shape and errors::

    live connection with a free stream slot, else connect (connect_timeout; TLS must choose
    ALPN "h2", else ``NotH2`` and the endpoint is remembered in ``not_h2``)
    HEADERS (+ END_STREAM for an empty body) queued for the connection's writer task, which
    sends the frames of every stream queued in one scheduler batch together; a body is sent
    by a task within the peer's windows (waiting above WRITE_HIGH_WATER queued bytes),
    concurrently with the response (gRPC bidi streams)
    wait for the response HEADERS          response_timeout -> UpstreamTimeoutError
    Response.body streams DATA as read (WINDOW_UPDATE when the caller reads: backpressure);
    its ``trailers`` attribute holds the response trailers at the end (gRPC status)
    Response.aclose before the end         RST_STREAM(CANCEL); the body task is cancelled

Errors, mapped once here: connect failures, a GOAWAY that excludes the stream and
RST_STREAM(REFUSED_STREAM) are ``UpstreamConnectError`` (not processed: safe to retry); other
resets and a lost connection are ``UpstreamResetError`` (``request_sent=True``), raised by
``request`` before the head or by the body iterator after it. The pool's reader tasks run in
``H2Pool.run`` (start it in the sidecar's nursery).
"""

from __future__ import annotations

import logging

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from meshd.errors import (
    MeshError,
    RemoteProtocolError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)
from sidecar.http.client import Connect
from sidecar.http.messages import Body, RequestHead, Response, buffered_body
from sidecar.http2.bodies import ResponseStream, reset_error
from sidecar.http2.convert import request_headers, response_head, trailers_of
from sidecar.http2.h2conn import new_connection
from sidecar.http2.limits import DEFAULT_H2_CLIENT_LIMITS, H2ClientLimits
from sidecar.http2.sender import H2Sender

log = logging.getLogger(__name__)
Key = tuple[str, int]
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError)


class NotH2(UpstreamConnectError):
    """The endpoint's TLS handshake did not choose ``h2`` (an HTTP/1.1-only peer)."""


class H2Conn(H2Sender):
    """One upstream HTTP/2 connection and its reader."""

    def __init__(self, key: Key, stream: trio.abc.Stream, limits: H2ClientLimits, scheme: str) -> None:
        self.key = key
        self.name = f"{key[0]}:{key[1]}"
        self.stream = stream
        self.limits = limits
        self.scheme = scheme
        self.h2 = new_connection(client_side=True, settings={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.hpack_max_decoded_bytes,
        }, max_header_list_size=limits.hpack_max_decoded_bytes)
        self.streams: dict[int, ResponseStream] = {}
        self.closed = False
        self.going_away = False
        self.idle_since = trio.current_time()
        self._init_sender()

    @property
    def usable(self) -> bool:
        if self.closed or self.going_away:
            return False
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    async def start(self) -> None:
        await self.initiate(self.limits.connection_window)

    async def flush_quietly(self) -> None:
        try:
            await self.flush()
        except _IO_ERRORS:
            self.closed = True

    async def writer(self) -> None:
        """Send h2's output whenever a stream queued some, one checkpoint later so that the
        frames of all streams queued in the same scheduler batch share one send (one TLS
        record). An upstream that stops reading for ``stream_idle_timeout`` fails the connection."""
        try:
            await self.write_loop()
        except _IO_ERRORS as exc:
            self._lost(reset_error(f"sending to {self.name}: {exc!r}"))
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)  # ends the read loop too

    credit = H2Sender.acknowledge  # what a ResponseStream calls (bodies.UpstreamConn)

    def reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.H2Error:
            pass
        self._want.set()

    def _lost(self, error: MeshError) -> None:
        """The connection is unusable: fail its streams, wake the writer and the waiters."""
        self.closed = True
        self._want.set()
        self._sent.set()
        for ex in list(self.streams.values()):
            ex.fail(error)
        self.streams.clear()

    # -- one request -------------------------------------------------------------------------
    async def request(self, head: RequestHead, body: Body | bytes, nursery: trio.Nursery) -> ResponseStream:
        """Open a stream, send the head (and start the body task); returns before the response."""
        sid = self.h2.get_next_available_stream_id()
        ex = self.streams[sid] = ResponseStream(self, sid)
        data = buffered_body(body)
        empty = data is not None and not data
        try:
            self.h2.send_headers(sid, request_headers(head, self.scheme, self.name), end_stream=empty)
        except BaseException:
            self.streams.pop(sid, None)
            raise
        self._want.set()
        if not empty:
            ex.sending = True
            nursery.start_soon(self._send_body, ex, data if data is not None else body)
        return ex

    async def _send_body(self, ex: ResponseStream, body: Body | bytes) -> None:
        ex.sending = True
        with ex.send_scope:
            try:
                if isinstance(body, bytes | bytearray):
                    await self.send_data(ex.sid, bytes(body), end=True)
                else:
                    async for chunk in body:
                        if chunk:
                            await self.send_data(ex.sid, bytes(chunk))
                    self.h2.end_stream(ex.sid)
                    self._want.set()
                ex.sending = False
            except h2.exceptions.H2Error:
                pass  # the stream ended (the response came, or a reset)
            except _IO_ERRORS as exc:
                ex.fail(reset_error(f"sending to {self.name}: {exc!r}"))
            except MeshError as exc:  # the downstream body broke: abandon the upstream stream
                log.debug("request body to %s cut: %s", self.name, exc)
                self.reset(ex.sid, ErrorCodes.CANCEL)
                ex.fail(reset_error(f"request body cut: {exc}"))

    # -- reader ------------------------------------------------------------------------------
    async def read_loop(self) -> None:
        error: MeshError = reset_error(f"connection to {self.name} closed")
        try:
            while True:
                data = await self.stream.receive_some(self.limits.max_recv)
                if not data:
                    break
                for event in self.h2.receive_data(data):
                    self._dispatch(event)
                await self.flush()
        except h2.exceptions.ProtocolError as exc:
            error = reset_error(f"HTTP/2 protocol error from {self.name}: {exc}")
            await self.flush_quietly()
        except _IO_ERRORS as exc:
            error = reset_error(f"connection to {self.name} lost: {exc!r}")
        finally:
            self._lost(error)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    def _dispatch(self, event: h2.events.Event) -> None:
        ex = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            if ex is None:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                ex.feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.ResponseReceived):
            if ex is not None:
                try:
                    ex.head = response_head(event.headers or ())
                except RemoteProtocolError as exc:
                    self.reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
                    ex.fail(reset_error(f"malformed response from {self.name}: {exc}"))
                ex.got_head.set()
        elif isinstance(event, h2.events.TrailersReceived):
            if ex is not None:
                ex.trailers = trailers_of(event.headers or ())
        elif isinstance(event, h2.events.StreamEnded):
            if ex is not None:
                ex.end()
        elif isinstance(event, h2.events.StreamReset):
            if ex is not None:
                self.streams.pop(event.stream_id, None)
                ex.fail(self._reset_of(event.error_code))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.windows_grew()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event.last_stream_id or 0)

    def _reset_of(self, code: int | None) -> MeshError:
        if code == ErrorCodes.REFUSED_STREAM:
            return UpstreamConnectError(f"{self.name} refused the stream (REFUSED_STREAM)")
        return reset_error(f"{self.name} reset the stream (error code {code})")

    def _goaway(self, last_sid: int) -> None:
        self.going_away = True
        for sid in [s for s in self.streams if s > last_sid]:
            self.streams.pop(sid).fail(UpstreamConnectError(f"{self.name} went away (GOAWAY)"))


class H2Pool:
    """HTTP/2 connections to upstream endpoints; see the module docstring."""

    def __init__(self, *, limits: H2ClientLimits = DEFAULT_H2_CLIENT_LIMITS,
                 connect: Connect | None = None, scheme: str = "http") -> None:
        self.limits = limits
        self._connect: Connect = connect or trio.open_tcp_stream
        self._scheme = scheme
        self._conns: dict[Key, list[H2Conn]] = {}
        self._opening: dict[Key, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.not_h2: set[Key] = set()
        self.opened = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the connections' reader and body tasks until cancelled; then close them."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:  # close connections idle longer than idle_timeout
                    await trio.sleep(self.limits.idle_timeout / 4)
                    for key, stack in list(self._conns.items()):
                        self._pick(key, stack, reap_only=True)
        finally:
            self._nursery = None
            await self.aclose()

    async def aclose(self) -> None:
        conns = [c for stack in self._conns.values() for c in stack]
        self._conns.clear()
        for conn in conns:
            conn.closed = True
            await trio.aclose_forcefully(conn.stream)

    async def request(self, host: str, port: int, head: RequestHead, body: Body | bytes = b"", *,
                      connect_timeout: float | None = None, idle_timeout: float | None = None,
                      max_age: float | None = None, response_timeout: float | None = None) -> Response:
        """Send ``head`` + ``body`` on a stream to ``host:port``; the response streams (see the
        module docstring). ``idle_timeout``/``max_age`` are accepted for ``UpstreamPool``
        compatibility (idle connections are closed after ``limits.idle_timeout``)."""
        if self._nursery is None:
            raise UpstreamConnectError("HTTP/2 upstream pool is not running")
        conn = await self._checkout((host, port), connect_timeout)
        ex = await conn.request(head, body, self._nursery)
        timeout = response_timeout or self.limits.response_timeout
        with trio.move_on_after(timeout) as scope:
            await ex.got_head.wait()
        if scope.cancelled_caught:
            await ex.aclose()
            raise UpstreamTimeoutError(f"no response head in {timeout:g} s from {conn.name}")
        if ex.head is None:
            await ex.aclose()
            raise ex.error or reset_error(f"no response from {conn.name}")
        if ex.done and ex.trailers is None and ex.error is None:  # the whole body came with the head
            data = b"".join([chunk for chunk, _ in ex._chunks])  # (small answers; ≤ one stream window)
            await ex.aclose()
            return Response(ex.head, data, _noop)
        return Response(ex.head, ex, ex.aclose)

    async def _checkout(self, key: Key, connect_timeout: float | None) -> H2Conn:
        stack = self._conns.setdefault(key, [])
        conn = self._pick(key, stack)
        if conn is not None:
            return conn
        lock = self._opening.setdefault(key, trio.Lock())
        async with lock:
            conn = self._pick(key, stack)
            if conn is None:
                conn = await self._open(key, connect_timeout)
                stack.append(conn)
        return conn

    def _pick(self, key: Key, stack: list[H2Conn], reap_only: bool = False) -> H2Conn | None:
        now = trio.current_time()
        for conn in list(stack):
            idle = not conn.streams and now - conn.idle_since > self.limits.idle_timeout
            if conn.closed or idle or (conn.going_away and not conn.streams):
                stack.remove(conn)
                conn.closed = True
                if self._nursery is not None:
                    self._nursery.start_soon(trio.aclose_forcefully, conn.stream)
                continue
            if conn.usable and not reap_only:
                conn.idle_since = now
                return conn
        return None

    async def _open(self, key: Key, connect_timeout: float | None) -> H2Conn:
        host, port = key
        timeout = connect_timeout or self.limits.connect_timeout
        try:
            with trio.fail_after(timeout):
                stream = await self._connect(host, port)
        except trio.TooSlowError:
            raise UpstreamConnectError(f"connect {host}:{port}: timeout after {timeout} s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"connect {host}:{port}: {exc}") from exc
        if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() != "h2":
            self.not_h2.add(key)
            await trio.aclose_forcefully(stream)
            raise NotH2(f"{host}:{port} did not choose ALPN h2")
        conn = H2Conn(key, stream, self.limits, self._scheme)
        try:
            await conn.start()
        except _IO_ERRORS as exc:
            await trio.aclose_forcefully(stream)
            raise UpstreamConnectError(f"connect {host}:{port}: {exc!r}") from exc
        assert self._nursery is not None
        self._nursery.start_soon(conn.read_loop)
        self._nursery.start_soon(conn.writer)
        self.opened += 1
        return conn


async def _noop() -> None:
    return None
