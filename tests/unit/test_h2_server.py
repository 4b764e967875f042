"""``serve_h2``, ``H2Pool`` and the ``Transport`` seam on loopback sockets: bounded flow-control
windows, 100 concurrent streams, GOAWAY on drain, trailers, multiplexing upstream, HTTP/1.1
callers reaching HTTP/2 servers and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import h2.events
import trio
import trio.testing
from h2.errors import ErrorCodes

from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead, body_trailers
from sidecar.http.server import serve_http1
from sidecar.http2.client import H2Pool
from sidecar.http2.dispatch import serve_http, sniff_h2
from sidecar.http2.h2conn import new_connection
from sidecar.http2.limits import INITIAL_STREAM_WINDOW, MAX_CONCURRENT_STREAMS
from sidecar.http2.server import H2_PREFACE, serve_h2
from sidecar.http2.transport import Transport

INFO = ConnInfo(None, None)


class Trailing:
    """A response body of ``chunks`` whose ``trailers`` appear once it is exhausted."""

    def __init__(self, chunks: list[bytes], trailers: tuple[tuple[str, str], ...]) -> None:
        self._chunks = list(chunks)
        self._final = trailers
        self.trailers: tuple[tuple[str, str], ...] | None = None

    def __aiter__(self) -> Trailing:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._chunks:
            self.trailers = self._final
            raise StopAsyncIteration
        return self._chunks.pop(0)


async def echo(head: RequestHead, body: Body, info: ConnInfo) -> Response:
    data = b"".join([bytes(c) async for c in body])
    text = f"{head.http_version} {head.method} {head.path} {len(data)}".encode()
    return Response(ResponseHead(200, (("content-type", "text/plain"),)),
                    Trailing([text], (("x-sum", str(len(data))),)))


async def listen(nursery: trio.Nursery, serve: object) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


class RawClient:
    """A raw HTTP/2 client (h2 library) on a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = new_connection(client_side=True, settings={}, max_header_list_size=65536)
        self.events: list[h2.events.Event] = []

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def pump(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.events += self.h2.receive_data(data)
        await self.flush()
        return True

    async def until(self, predicate: object, seconds: float = 5.0) -> None:
        with trio.fail_after(seconds):
            while not predicate():  # type: ignore[operator]
                if not await self.pump():
                    return


async def test_request_body_buffering_is_bounded_by_the_stream_window(nursery: trio.Nursery) -> None:
    release, received = trio.Event(), []

    async def slow_reader(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        await release.wait()
        received.append(sum([len(c) async for c in body]))
        return Response(ResponseHead(200, ()), b"done")

    port = await listen(nursery, lambda s: serve_h2(s, slow_reader, INFO))
    client = await RawClient.connect(port)
    await client.until(lambda: client.h2.remote_settings.initial_window_size == INITIAL_STREAM_WINDOW)
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                                 (":path", "/")])
    total, sent = 1024 * 1024, 0
    with trio.move_on_after(1.0):  # the handler reads nothing: the window must close
        while sent < total:
            room = min(client.h2.local_flow_control_window(sid), 16384, total - sent)
            if room:
                client.h2.send_data(sid, b"z" * room)
                sent += room
                await client.flush()
            else:
                await client.pump()
    assert sent == INITIAL_STREAM_WINDOW  # the server buffered one stream window, no more
    release.set()
    while sent < total:
        room = min(client.h2.local_flow_control_window(sid), 16384, total - sent)
        if room:
            client.h2.send_data(sid, b"z" * room)
            sent += room
            await client.flush()
        else:
            with trio.fail_after(5):
                await client.pump()
    client.h2.end_stream(sid)
    await client.flush()
    await client.until(lambda: any(isinstance(e, h2.events.StreamEnded) for e in client.events))
    assert received == [total]


async def test_100_concurrent_streams_and_trailers(nursery: trio.Nursery) -> None:
    inside, all_in = 0, trio.Event()

    async def barrier(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        nonlocal inside
        inside += 1
        if inside == MAX_CONCURRENT_STREAMS:
            all_in.set()
        await all_in.wait()  # only returns once 100 handlers run at the same time
        return await echo(head, body, info)

    port = await listen(nursery, lambda s: serve_h2(s, barrier, INFO))
    client = await RawClient.connect(port)
    await client.until(lambda: client.h2.remote_settings.max_concurrent_streams == 100)
    for _ in range(MAX_CONCURRENT_STREAMS):
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                                     (":path", f"/{sid}")], end_stream=True)
    await client.flush()
    await client.until(lambda: sum(isinstance(e, h2.events.StreamEnded) for e in client.events) == 100)
    trailers = [e for e in client.events if isinstance(e, h2.events.TrailersReceived)]
    assert len(trailers) == 100 and all((b"x-sum", b"0") in e.headers for e in trailers)


async def test_drain_sends_goaway_and_lets_open_streams_finish(nursery: trio.Nursery) -> None:
    drain, go = trio.Event(), trio.Event()

    async def slow(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        await go.wait()
        return Response(ResponseHead(200, ()), b"finished")

    port = await listen(nursery, lambda s: serve_h2(s, slow, INFO, drain=drain))
    client = await RawClient.connect(port)
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                                 (":path", "/")], end_stream=True)
    await client.flush()
    await trio.sleep(0.2)
    drain.set()
    await client.until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events))
    goaway = next(e for e in client.events if isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == sid
    go.set()
    await client.until(lambda: any(isinstance(e, h2.events.DataReceived) for e in client.events))
    data = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived))
    assert data == b"finished"
    with trio.fail_after(5):  # then the server closes the connection
        while await client.pump():
            pass


async def _stream(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 10_000):
        await trio.lowlevel.checkpoint()
        yield b"q" * 10_000


async def test_pool_multiplexes_and_transport_bridges_h1_and_h2(nursery: trio.Nursery) -> None:
    h2_port = await listen(nursery, lambda s: serve_http(s, echo, INFO))  # sniffs h2c or HTTP/1.1
    h1_port = await listen(nursery, lambda s: serve_http1(s, echo, INFO))
    pool = H2Pool()
    await nursery.start(pool.run)
    transport = Transport(UpstreamPool(), pool, lambda head, host, port: port == h2_port)
    results: list[tuple[bytes, tuple[tuple[str, str], ...]]] = []

    async def one(i: int) -> None:
        head = RequestHead("POST", f"/r{i}", (("host", "svc"),), "1.1")
        resp = await transport.request("127.0.0.1", h2_port, head, _stream(300_000))
        body = b"".join([c async for c in resp.body])  # type: ignore[union-attr]
        results.append((body, body_trailers(resp.body)))
        await resp.aclose()  # type: ignore[misc]

    async with trio.open_nursery() as calls:
        for i in range(50):
            calls.start_soon(one, i)
    assert pool.opened == 1  # 50 concurrent requests, one multiplexed connection
    assert sorted(b for b, _ in results) == sorted(b"2 POST /r%d 300000" % i for i in range(50))
    assert all(t == (("x-sum", "300000"),) for _, t in results)
    head = RequestHead("GET", "/plain", (("host", "svc"),), "2")  # an HTTP/2 caller, HTTP/1.1 server
    resp = await transport.request("127.0.0.1", h1_port, head)
    body = resp.body if isinstance(resp.body, bytes) else b"".join([c async for c in resp.body])
    assert resp.head.status == 200 and body == b"1.1 GET /plain 0"
    await transport.aclose()


async def test_sniff_reads_the_preface_in_pieces_and_keeps_every_byte(nursery: trio.Nursery) -> None:
    cases = [(H2_PREFACE + b"frames", True), (b"GET / HTTP/1.1\r\n\r\n", False),
             (b"PRI * HTTP/1.1\r\n\r\n", False), (b"PR", False)]  # partial then EOF: HTTP/1.1 answers
    for data, expected in cases:
        for split in (1, 5, len(data)):
            client, server = trio.testing.memory_stream_pair()

            async def send(client: trio.abc.Stream = client, data: bytes = data, split: int = split) -> None:
                await client.send_all(data[:split])
                await trio.sleep(0.01)
                await client.send_all(data[split:])
                await client.send_eof()  # type: ignore[attr-defined]

            nursery.start_soon(send)
            is_h2, stream = await sniff_h2(server)
            assert is_h2 is expected
            got = b""
            while chunk := await stream.receive_some():
                got += chunk
            assert got == data  # nothing lost for the server that takes over
    sock_port = await listen(nursery, lambda s: serve_http(s, echo, INFO))  # MSG_PEEK path
    async with await trio.open_tcp_stream("127.0.0.1", sock_port) as s:
        await s.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await s.receive_some():
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"1.1 GET /x 0" in data


async def test_pool_reads_a_body_larger_than_every_window(nursery: trio.Nursery) -> None:
    async def big(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, ()), Trailing([b"w" * 100_000] * 30, (("x-end", "1"),)))

    port = await listen(nursery, lambda s: serve_h2(s, big, INFO))
    pool = H2Pool()
    await nursery.start(pool.run)
    with trio.fail_after(20):  # 3 MB > 64 KiB stream and 1 MiB connection windows
        resp = await pool.request("127.0.0.1", port, RequestHead("GET", "/", (("host", "a"),)))
        await trio.sleep(0.3)  # a slow reader: the windows fill up, only its credit reopens them
        size = sum([len(c) async for c in resp.body])  # type: ignore[union-attr]
    assert size == 3_000_000 and body_trailers(resp.body) == (("x-end", "1"),)
    await pool.aclose()
