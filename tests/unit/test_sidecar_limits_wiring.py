"""The bootstrap's ``[limits]`` table, the drain wrapper's half-close and the gate in front of a
``ConnectionGroup`` (the pieces ``mesh-sidecar`` wires together; the process is tested in
``integration/test_sidecar_limits.py``)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshd.errors import ConfigError
from sidecar import bootstrap, lifecycle
from sidecar.http.limits import DEFAULT_SERVER_LIMITS
from sidecar.http.messages import ConnInfo, RequestHead, Response
from sidecar.http.server import ConnectionGate, gated, serve_http1, simple_response
from sidecar.lifecycle import ConnectionGroup, DrainStream, HalfCloseDrainStream, drainable

BASE = 'service = "s"\napp_port = 1\n'


def test_limits_table_builds_server_limits() -> None:
    boot = bootstrap.parse(BASE + "[limits]\nheader_timeout = 2\nmax_connections = 50\n", env={})
    assert boot.limits == {"header_timeout": 2, "max_connections": 50}
    lim = boot.server_limits()
    assert (lim.header_timeout, lim.max_connections) == (2, 50)
    assert lim.idle_timeout == DEFAULT_SERVER_LIMITS.idle_timeout
    assert bootstrap.parse(BASE, env={}).server_limits() == DEFAULT_SERVER_LIMITS


@pytest.mark.parametrize(("table", "field", "reason"), [
    ("header_timeot = 2", "limits.header_timeot", "unknown limit"),
    ("max_connections = 2.5", "limits.max_connections", "must be a number of type int"),
    ("max_connections = true", "limits.max_connections", "must be a number of type int"),
    ("header_timeout = 0", "limits.header_timeout", "must be > 0"),
    ('idle_timeout = "75s"', "limits.idle_timeout", "must be a number of type float"),
])
def test_bad_limit_is_a_config_error_naming_the_field_and_line(table: str, field: str,
                                                               reason: str) -> None:
    text = BASE + "\n[limits]\nmax_requests_per_connection = 10\n" + table + "\n"
    with pytest.raises(ConfigError) as exc:
        bootstrap.parse(text, "b.toml", env={})
    assert (exc.value.file, exc.value.line, exc.value.field) == ("b.toml", 6, field)
    assert reason in exc.value.reason


def test_limits_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as exc:
        bootstrap.parse(BASE + "limits = 5\n", "b.toml", env={})
    assert exc.value.field == "limits" and exc.value.line == 3


async def _hello(head: RequestHead, body: object, info: ConnInfo) -> Response:
    return simple_response(200, "hi")


async def _serve(group: ConnectionGroup, gate: ConnectionGate, held: list[trio.abc.Stream],
                 nursery: trio.Nursery) -> int:
    async def conn(stream: trio.SocketStream) -> None:
        wrapped = drainable(stream)
        held.append(wrapped)
        await serve_http1(wrapped, _hello, ConnInfo(peer=None, local=None))

    listeners = await nursery.start(group.serve, gated(gate, conn), "127.0.0.1", 0)
    return int(listeners[0].socket.getsockname()[1])


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_closing_response_reaches_eof_before_the_linger_and_gate_refuses_extra() -> None:
    """``Connection: close`` over a drainable TCP stream: the client reads the response and EOF
    long before ``linger_timeout`` (1 s) although it never closes its side; a connection over
    the gate's cap is closed unread while the admitted one is served."""
    group, gate, held = ConnectionGroup("t"), ConnectionGate(1), []
    async with trio.open_nursery() as nursery:
        port = await _serve(group, gate, held, nursery)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        first = b""
        with trio.fail_after(5):
            while not first.endswith(b"hi\n"):  # served: it holds the only slot
                first += await client.receive_some(65536)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await _read_all(extra) == b""  # closed at once, nothing read or sent
        assert gate.refused == 1
        await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        start = trio.current_time()
        with trio.fail_after(5):
            data = await _read_all(client)
        assert first.startswith(b"HTTP/1.1 200 ") and data.startswith(b"HTTP/1.1 200 ")
        assert data.endswith(b"hi\n") and gate.open == 1
        assert trio.current_time() - start < DEFAULT_SERVER_LIMITS.linger_timeout
        assert isinstance(held[0], HalfCloseDrainStream)
        await client.aclose()
        await extra.aclose()
        nursery.cancel_scope.cancel()


async def test_drain_wrapper_is_half_closeable_only_over_half_closeable_streams() -> None:
    a, b = trio.testing.memory_stream_pair()
    token = lifecycle._GROUP.set(ConnectionGroup("t"))
    try:
        half = drainable(a)
        one_way = drainable(_OneWay(a))
    finally:
        lifecycle._GROUP.reset(token)
    assert isinstance(half, HalfCloseDrainStream)
    await half.send_eof()
    assert await b.receive_some(10) == b""
    assert type(one_way) is DrainStream and not isinstance(one_way, trio.abc.HalfCloseableStream)


class _OneWay(trio.abc.Stream):
    """A stream without ``send_eof`` (like ``trio.SSLStream``)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
