"""``serve_http``'s protocol sniff on real loopback sockets (``MSG_PEEK`` path) and on memory
streams: a connection that starts the HTTP/2 preface and trickles it is closed at the header
timeout, not at the idle timeout; a silent connection waits for the idle timeout."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from sidecar.http.limits import ServerLimits
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.http2.dispatch import serve_http, sniff_h2
from sidecar.http2.server import H2_PREFACE

INFO = ConnInfo(None, None)
HEADER_TIMEOUT = 0.5  # the idle timeout stays 75 s: a close within seconds is the header timeout's
LIMITS = ServerLimits(header_timeout=HEADER_TIMEOUT)


async def ok(head: RequestHead, body: Body, info: ConnInfo) -> Response:
    return Response(ResponseHead(200, (("content-length", "2"),)), b"ok")


async def listen(nursery: trio.Nursery) -> int:
    serve = partial(serve_http, handler=ok, info=INFO, h1_limits=LIMITS)
    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_trickled_preface_is_closed_at_the_header_timeout(nursery: trio.Nursery) -> None:
    port = await listen(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        closed = trio.Event()

        async def trickle() -> None:  # one preface byte every 0.2 s: 24 bytes would take 4.8 s
            for i in range(len(H2_PREFACE) - 1):
                if closed.is_set():
                    return
                try:
                    await s.send_all(H2_PREFACE[i:i + 1])
                except trio.BrokenResourceError:
                    return
                await trio.sleep(0.2)

        async with trio.open_nursery() as inner:
            inner.start_soon(trickle)
            start = trio.current_time()
            with trio.fail_after(30):  # far below the 75 s idle timeout
                try:
                    assert await read_all(s) == b""  # closed without an answer
                except trio.BrokenResourceError:
                    pass  # closed with unread bytes: a TCP RST
            elapsed = trio.current_time() - start
            closed.set()
        assert elapsed >= HEADER_TIMEOUT


async def test_silent_connection_outlives_the_header_timeout(nursery: trio.Nursery) -> None:
    port = await listen(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await trio.sleep(HEADER_TIMEOUT * 3)  # no byte yet: only the idle timeout applies
        await s.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        with trio.fail_after(10):
            data = await read_all(s)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")


async def test_sniff_on_a_stream_bounds_an_incomplete_preface(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(H2_PREFACE[:5])
    with trio.fail_after(10):
        is_h2, stream = await sniff_h2(server, header_timeout=0.2)
    assert is_h2 is None  # neither protocol: the caller closes it
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(H2_PREFACE[:5])
    nursery.start_soon(client.send_all, H2_PREFACE[5:] + b"x")
    with trio.fail_after(10):
        is_h2, stream = await sniff_h2(server, header_timeout=5.0)
    assert is_h2 is True
    got = b""
    while len(got) < len(H2_PREFACE) + 1:
        got += await stream.receive_some()
    assert got == H2_PREFACE + b"x"  # every byte delivered again to the server that takes over
