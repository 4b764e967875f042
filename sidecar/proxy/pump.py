"""Bidirectional byte pump between two ``trio.abc.Stream``s (Envoy ``tcp_proxy`` semantics).

``pump(a, b, idle_timeout=…)`` copies ``a -> b`` and ``b -> a`` at once and returns how it ended:

* **half-close**: when one side ends its direction (EOF), the pump half-closes the other side's
  write direction (``send_eof``; under TLS a TCP FIN below the records, read as EOF because the
  mesh contexts set ``OP_IGNORE_UNEXPECTED_EOF``) and keeps the other direction flowing until
  it ends too; then both streams are closed;
* **reset**: a read or write failing (RST, broken pipe, TLS error) aborts both streams at once
  (``SO_LINGER`` 0: the other peer sees a reset, Envoy's reset propagation) — nothing lingers;
* **idle**: no byte in either direction for ``idle_timeout`` s (Envoy/Istio ``idleTimeout``,
  default 1 h) closes both.

Both streams are always closed when ``pump`` returns; ``trio.Cancelled`` aborts them too.
``on_bytes(a_to_b, n)`` (optional) is called after each chunk of ``n`` bytes is written, so
byte counters (``istio_tcp_*_bytes_total``) follow long connections while they run.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

from sidecar.lifecycle import DrainStream

TCP_READ_BYTES = 256 * 1024   # per receive; large reads keep per-chunk Python work small
DEFAULT_IDLE_TIMEOUT = 3600.0  # seconds; Envoy tcp_proxy idle_timeout default (Istio tcp.idleTimeout)
CLOSE_TIMEOUT = 1.0  # seconds a graceful close may take before the socket is dropped
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_LINGER_RESET = struct.pack("ii", 1, 0)
OnBytes = Callable[[bool, int], None]  # (a_to_b, bytes written)


@dataclass
class PumpResult:
    """``a_to_b``/``b_to_a``: bytes copied; ``end``: how the pump finished."""

    a_to_b: int = 0
    b_to_a: int = 0
    end: Literal["closed", "reset", "idle"] = "closed"


def _socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    """The TCP stream under wrappers (SSLStream, PrefixedStream, drain wrappers)."""
    for _ in range(8):
        if isinstance(stream, trio.SocketStream):
            return stream
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "inner", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner
    return None


def tunnel_stream(stream: trio.abc.Stream) -> trio.abc.Stream:
    """The connection under the listener's drain wrapper (``lifecycle.DrainStream``): once an
    HTTP/1.1 connection becomes a tunnel it is no longer an idle keep-alive connection."""
    return stream.inner if isinstance(stream, DrainStream) else stream


async def send_eof(stream: trio.abc.Stream) -> None:
    """Half-close ``stream``'s write direction (for TLS: a FIN under the last record)."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
        return
    tcp = _socket_stream(stream)
    if tcp is not None:
        await tcp.send_eof()


async def abort(stream: trio.abc.Stream) -> None:
    """Close ``stream`` with a TCP reset (SO_LINGER 0) when it has a socket, else forcefully."""
    tcp = _socket_stream(stream)
    if tcp is not None:
        try:
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    await trio.aclose_forcefully(stream)


def _decrypts(stream: trio.abc.Stream) -> bool:
    return isinstance(stream, trio.SSLStream) and hasattr(stream, "_ssl_object") \
        and hasattr(stream, "_incoming")


def _more_records(tls: trio.abc.Stream, data: bytes) -> bytes:
    """``data`` plus the plaintext of the TLS records already received and not yet decrypted.

    ``SSLStream.receive_some`` returns one record (<= 16 KiB) per call, each a pass through
    trio's scheduler and then one write downstream; decrypting the records that already sit
    in the stream's buffer here (no I/O, up to TCP_READ_BYTES) makes writes 16x larger. Uses
    trio's SSLStream internals defensively: any surprise just ends the batch."""
    obj, incoming = tls._ssl_object, tls._incoming  # type: ignore[attr-defined]
    parts, size = [data], len(data)
    while size < TCP_READ_BYTES and incoming.pending:
        try:
            more = obj.read(TCP_READ_BYTES - size)
        except ssl.SSLError:  # want-read (a partial record), EOF, alert: receive_some handles it
            break
        if not more:
            break
        parts.append(more)
        size += len(more)
    return data if len(parts) == 1 else b"".join(parts)


class _Pump:
    def __init__(self, idle_timeout: float, a: trio.abc.Stream, b: trio.abc.Stream,
                 on_bytes: OnBytes | None) -> None:
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.tls_src = {True: _decrypts(a), False: _decrypts(b)}
        self.scope = trio.CancelScope()
        self.result = PumpResult()

    def _touch(self) -> None:
        self.scope.deadline = trio.current_time() + self.idle_timeout

    async def copy(self, src: trio.abc.Stream, dst: trio.abc.Stream, forward: bool) -> None:
        try:
            while True:
                data = await src.receive_some(TCP_READ_BYTES)
                if not data:
                    break
                if self.tls_src[forward]:
                    data = _more_records(src, data)
                self._touch()
                await dst.send_all(data)
                if forward:
                    self.result.a_to_b += len(data)
                else:
                    self.result.b_to_a += len(data)
                if self.on_bytes is not None:
                    self.on_bytes(forward, len(data))
            await send_eof(dst)
        except _IO_ERRORS:
            self.result.end = "reset"
            self.scope.cancel()


async def pump(a: trio.abc.Stream, b: trio.abc.Stream, *,
               idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
               on_bytes: OnBytes | None = None) -> PumpResult:
    """Copy both ways until both directions ended, one side reset, or ``idle_timeout`` s of
    silence; closes (or aborts) both streams. See the module docstring."""
    p = _Pump(idle_timeout, a, b, on_bytes)
    p._touch()
    graceful = False
    try:
        with p.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.copy, a, b, True)
                nursery.start_soon(p.copy, b, a, False)
        if p.scope.cancelled_caught and p.result.end == "closed":
            p.result.end = "idle"
        graceful = p.result.end != "reset"
    finally:
        for stream in (a, b):
            await (_close(stream) if graceful else abort(stream))
    return p.result


async def _close(stream: trio.abc.Stream) -> None:
    """Close after both directions ended (mesh TLS streams close their socket without waiting
    for the peer: ``https_compatible``)."""
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        try:
            await stream.aclose()
            return
        except _IO_ERRORS:
            pass
    await trio.aclose_forcefully(stream)
