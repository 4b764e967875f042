"""The byte pump (sidecar.proxy.pump) on trio memory streams: half-close each way keeps the
other direction flowing, a reset on either side ends both, silence ends it at the idle timeout."""

from __future__ import annotations

import trio
import trio.testing

from sidecar.proxy.pump import pump


class Resetting(trio.abc.HalfCloseableStream):
    """A stream whose peer resets after ``after`` reads."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, after: int) -> None:
        self.inner, self.after, self.closed = inner, after, False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.after <= 0:
            raise trio.BrokenResourceError("connection reset by peer")
        self.after -= 1
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while data := await stream.receive_some():
        out += data
    return out


async def test_client_fin_first_then_server_answers() -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, server = trio.testing.memory_stream_pair()
    result = None

    async def run() -> None:
        nonlocal result
        result = await pump(proxy_a, proxy_b)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.send_all(b"ping")
        await client.send_eof()
        assert await _read_all(server) == b"ping"  # EOF arrives while the other way is open
        await server.send_all(b"pong")
        await server.send_eof()
        assert await _read_all(client) == b"pong"
    assert result is not None and (result.a_to_b, result.b_to_a, result.end) == (4, 4, "closed")


async def test_server_fin_first_keeps_client_direction() -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, proxy_a, proxy_b)
        await server.send_all(b"hello")
        await server.send_eof()
        assert await _read_all(client) == b"hello"
        await client.send_all(b"still talking")
        await client.send_eof()
        assert await _read_all(server) == b"still talking"


async def test_reset_on_one_side_closes_both() -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, server = trio.testing.memory_stream_pair()
    resetting = Resetting(proxy_a, after=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, resetting, proxy_b)
        await client.send_all(b"first")
        assert await server.receive_some() == b"first"
        await client.send_all(b"then a reset")
        with trio.fail_after(5):
            assert await _read_all(server) == b""  # the server side is closed, not left hanging
    assert resetting.closed


async def test_idle_timeout_closes_both(autojump_clock: trio.abc.Clock) -> None:
    client, proxy_a = trio.testing.memory_stream_pair()
    proxy_b, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result = await pump(proxy_a, proxy_b, idle_timeout=30.0)
    assert result.end == "idle" and 30.0 <= trio.current_time() - start < 31.0
    assert await _read_all(server) == b"" and await _read_all(client) == b""
