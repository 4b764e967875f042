"""The write side shared by the HTTP/2 server and client connections (trio shell).

Stream tasks never write to the socket: they queue frames in ``h2`` (``send_data`` within the
peer's windows, headers, resets, WINDOW_UPDATEs via ``credit``) and ``wake()`` the connection's
writer task, which sends h2's output once per scheduler batch (one ``send_all``, one TLS record
for every stream that queued in that batch). Backpressure: a stream waits while more than
``WRITE_HIGH_WATER`` DATA bytes are queued (asyncio's default high-water mark) and while the
peer's flow-control windows are closed; both waits are bounded by ``stream_idle_timeout``
(Envoy) and raise ``trio.TooSlowError``. Socket errors propagate to the owner's writer loop.
"""

from __future__ import annotations

import h2.connection
import h2.exceptions
import trio

from sidecar.http2.limits import WRITE_HIGH_WATER


class H2Sender:
    """Mixin: needs ``self.h2`` (H2Connection), ``self.stream`` (trio.abc.Stream) and
    ``self.limits.stream_idle_timeout`` (seconds); call ``_init_sender()`` in ``__init__``."""

    h2: h2.connection.H2Connection
    stream: trio.abc.Stream
    closed: bool = False  # set by the owner when the connection is gone: senders stop waiting

    def _init_sender(self) -> None:
        self._lock = trio.StrictFIFOLock()
        self._window = trio.Event()  # set (and replaced) when send windows may have grown
        self._want = trio.Event()  # wakes the writer
        self._sent = trio.Event()  # set (and replaced) after each write
        self._queued = 0  # DATA bytes queued in h2 since the writer last took its output

    def _idle_timeout(self) -> float:
        return self.limits.stream_idle_timeout  # type: ignore[attr-defined,no-any-return]

    async def initiate(self, connection_window: int) -> None:
        """Send the connection preface/SETTINGS and grow the connection receive window from
        RFC 9113's 65 535 bytes to ``connection_window``."""
        self.h2.initiate_connection()
        extra = connection_window - 65_535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        await self.flush()

    def wake(self) -> None:
        """Tell the writer that h2 has output queued."""
        self._want.set()

    def windows_grew(self) -> None:
        """A WINDOW_UPDATE or SETTINGS arrived: wake the streams waiting for send window."""
        self._window.set()
        self._window = trio.Event()

    def acknowledge(self, sid: int, flow: int) -> None:
        """Return ``flow`` bytes of receive window on stream ``sid`` (and the connection)."""
        if flow > 0 and not self.closed:
            try:
                self.h2.acknowledge_received_data(flow, sid)
            except h2.exceptions.H2Error:  # the stream is already closed
                pass
            self._want.set()

    async def flush(self) -> None:
        """Send everything h2 has queued now (one writer at a time)."""
        async with self._lock:
            self._queued = 0
            data = self.h2.data_to_send()
            if data:
                with trio.fail_after(self._idle_timeout()):
                    await self.stream.send_all(data)
            self._sent.set()
            self._sent = trio.Event()

    async def write_loop(self) -> None:
        """Flush whenever woken, one checkpoint later so that every stream woken in the same
        scheduler batch adds its frames to the same send. Runs until cancelled or ``closed``;
        socket errors propagate."""
        while not self.closed:
            await self._want.wait()
            self._want = trio.Event()
            await trio.lowlevel.checkpoint()
            await self.flush()

    async def send_data(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Queue ``data`` as DATA frames within the peer's windows; ``end``: END_STREAM on the
        last frame."""
        h2c, view, sent = self.h2, memoryview(data), 0
        while sent < len(data):
            room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size, len(data) - sent)
            if room <= 0:
                with trio.fail_after(self._idle_timeout()):
                    await self._window.wait()
                continue
            sent += room
            h2c.send_data(sid, data if room == len(data) else bytes(view[sent - room:sent]),
                          end_stream=end and sent == len(data))
            self._queued += room
            self._want.set()
            while self._queued >= WRITE_HIGH_WATER and not self.closed:
                with trio.fail_after(self._idle_timeout()):
                    await self._sent.wait()
