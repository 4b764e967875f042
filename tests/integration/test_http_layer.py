"""The HTTP/1.1 layer on real loopback sockets (and trio memory streams).

Server: ``serve_http1`` behind ``trio.serve_tcp`` on 127.0.0.1:0, driven by raw bytes — a
smuggling corpus where every case must get its exact status, be followed by EOF, and never reach
the handler; keep-alive, pipelining, streaming in both directions, HEAD, 100-continue, slowloris.
Client: ``UpstreamPool`` against ``serve_http1``, scripted raw upstreams and the stdlib
``http.server`` (a third-party peer): reuse, connect errors, stale keep-alive retry, mid-body
death, malformed responses, timeouts, 1 MiB streamed request body.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing

from meshd.errors import (
    LocalProtocolError,
    NoRouteFound,
    UpstreamConnectError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from sidecar.http.client import UpstreamPool, UpstreamProtocolError
from sidecar.http.limits import ClientLimits, ServerLimits
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.http.server import serve_http1

INFO = ConnInfo(peer=None, local=None)
MiB = 1024 * 1024


class Echo:
    """Handler: counts calls and answers ``"<METHOD> <path> <body>"``."""

    def __init__(self) -> None:
        self.calls = 0
        self.heads: list[RequestHead] = []

    async def __call__(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        self.calls += 1
        self.heads.append(head)
        data = b"".join([bytes(chunk) async for chunk in body])
        return Response(ResponseHead(200, ()), f"{head.method} {head.path} ".encode() + data)


async def start_server(
    nursery: trio.Nursery,
    handler: Callable[[RequestHead, Body, ConnInfo], Awaitable[Response]],
    limits: ServerLimits | None = None,
) -> int:
    async def on_conn(stream: trio.SocketStream) -> None:
        await serve_http1(stream, handler, INFO, limits=limits or ServerLimits())

    listeners = await nursery.start(partial(trio.serve_tcp, on_conn, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def start_raw(nursery: trio.Nursery, script: Callable[[trio.SocketStream], Awaitable]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, script, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def read_until_eof(stream: trio.abc.ReceiveStream, within: float = 3.0) -> bytes:
    """Everything until EOF; fails the test if the server keeps the connection open."""
    out = bytearray()
    with trio.fail_after(within):
        while data := await stream.receive_some(65536):
            out += data
    return bytes(out)


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
    return bytes(buf)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length framed responses."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {k.lower(): v.strip() for k, _, v in fields}
        size = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split(" ")[1]), headers, data[:size]))
        data = data[size:]
    return out


async def h11_request(
    stream: trio.abc.Stream, method: str, target: str, body: bytes = b"", version: bytes = b"1.1"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One exchange parsed by h11 as an independent client (any framing)."""
    h = h11.Connection(h11.CLIENT)
    headers = [("host", "t")] + ([("content-length", str(len(body)))] if body else [])
    req = h11.Request(method=method, target=target, headers=headers, http_version=version)
    await stream.send_all(h.send(req) + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
    status, resp_headers, chunks = 0, [], []
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            h.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, resp_headers = event.status_code, list(event.headers)
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, resp_headers, b"".join(chunks)


async def pattern(total: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (chunk // 256)
    sent = 0
    while sent < total:
        part = block[: min(chunk, total - sent)]
        sent += len(part)
        yield part


def expected_pattern(total: int, chunk: int = 64 * 1024) -> bytes:
    block = bytes(range(256)) * (chunk // 256)
    return (block * (total // chunk + 1))[:total]


# ---------------------------------------------------------------------------------------------
# Smuggling corpus: (id, raw request, expected status). Each case is pipelined after a good GET.

H = "POST / HTTP/1.1\r\nHost: a\r\n"
SMUGGLING = [
    ("cl-te", H + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-cl", H + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("cl-differing", H + "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("cl-identical", H + "Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("cl-list", H + "Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-plus", H + "Content-Length: +3\r\n\r\nabc", 400),
    ("te-xchunked", H + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    ("te-chunked-identity", H + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 501),
    ("te-twice", H + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ("http10-te", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("bare-lf", "GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare-cr", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    ("space-before-colon", "GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc", 400),
    ("nul-in-value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("ctl-in-value", "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400),
    ("missing-host", "GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("two-hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("request-line-spaces", "GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("http2-version", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("101-headers", "GET / HTTP/1.1\r\nHost: a\r\n" + "X-H: v\r\n" * 100 + "\r\n", 431),
    ("61k-head", "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + "a" * 61 * 1024 + "\r\n\r\n", 431),
    ("bad-chunk-footer", H + "Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n", 400),
    ("bad-chunk-size", H + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("bare-lf-chunk", H + "Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    # refused by llhttp's strict chunked parser (h11 0.16 let them through)
    ("chunk-size-space", H + "Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    ("bare-lf-trailers-end", H + "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\n", 400),
    ("obs-fold-trailer", H + "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: v\r\n c\r\n\r\n", 400),
    (
        "chunk-size-overflow",
        H + "Transfer-Encoding: chunked\r\n\r\n" + "f" * 20 + "\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    ("http10-te-gzip", "POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
]
GOOD = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(("name", "raw", "status"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
async def test_smuggling_corpus_rejected_and_closed(
    nursery: trio.Nursery, name: str, raw: str, status: int
) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(GOOD + raw.encode("latin-1"))
        responses = parse_responses(await read_until_eof(stream))
    assert [r[0] for r in responses] == [200, status]
    assert responses[1][1]["connection"] == "close"
    assert echo.calls == 1  # only the good request reached the handler


async def test_methods_unknown_to_llhttp_reach_the_handler(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    reqs = [b"%s /m HTTP/1.1\r\nHost: a\r\n\r\n" % m for m in (b"FOO", b"PROPFIND", b"get")]
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"".join(reqs) + b"GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        responses = parse_responses(await read_until_eof(stream))
    assert [r[2] for r in responses] == [b"FOO /m ", b"PROPFIND /m ", b"get /m ", b"GET /end "]


async def test_pipelined_after_chunked_body_byte_by_byte(nursery: trio.Nursery) -> None:
    """The end of a chunked body is found wherever the reads end, and the next request's bytes
    (read together with it) are served next."""
    echo = Echo()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_http1, server, echo, INFO)
    raw = (
        H + "Transfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: v\r\n\r\n"
        "GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    ).encode()
    for i in range(len(raw)):
        await client.send_all(raw[i : i + 1])
        await trio.lowlevel.checkpoint()  # let the server read each byte on its own
    responses = parse_responses(await read_until_eof(client))
    assert [r[2] for r in responses] == [b"POST / \r\n\r\nabc", b"GET /next "]


async def test_oversized_head_in_small_writes_gets_431(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    raw = ("GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + "a" * 61 * 1024 + "\r\n\r\n").encode()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        try:
            for i in range(0, len(raw), 512):
                await stream.send_all(raw[i : i + 512])
        except trio.BrokenResourceError:
            pass  # the server may answer before we finish
        responses = parse_responses(await read_until_eof(stream))
    assert [r[0] for r in responses] == [431]
    assert echo.calls == 0


async def test_error_response_survives_unread_request_bytes(nursery: trio.Nursery) -> None:
    """A rejected request followed by a flood still gets its 400 and a clean EOF (the server
    half-closes and lingers; on Linux loopback a bare close happens to pass this too)."""
    port = await start_server(nursery, Echo())
    smuggle = H + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def flood() -> None:
            try:
                await stream.send_all(smuggle.encode() + b"x" * 512 * 1024)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            await trio.sleep(0.05)
            data = await read_until_eof(stream)
    assert [r[0] for r in parse_responses(data)] == [400]


async def test_slowloris_head_deadline_is_for_the_whole_head(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo(), ServerLimits(header_timeout=0.3))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def trickle() -> None:  # a byte every 50 ms: no single read ever waits 0.3 s
            try:
                for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 1000:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                pass

        start = trio.current_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(trickle)
            data = await read_until_eof(stream, within=2)
            inner.cancel_scope.cancel()
    assert [r[0] for r in parse_responses(data)] == [408]
    assert trio.current_time() - start < 1.0


async def test_stalled_request_body_gets_408(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo, ServerLimits(stream_idle_timeout=0.2))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all((H + "Content-Length: 10\r\n\r\nabc").encode())
        responses = parse_responses(await read_until_eof(stream, within=2))
    assert [(r[0], r[1].get("connection")) for r in responses] == [(408, "close")]
    assert echo.calls == 1  # the handler was reading the body when the timer fired


async def test_max_requests_per_connection(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo(), ServerLimits(max_requests_per_connection=2))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(GOOD * 3)
        responses = parse_responses(await read_until_eof(stream))
    assert [(r[0], r[1].get("connection")) for r in responses] == [(200, None), (200, "close")]


async def test_idle_connection_closed_without_response(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo(), ServerLimits(idle_timeout=0.1))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(GOOD)
        responses = parse_responses(await read_until_eof(stream, within=1))
    assert [r[0] for r in responses] == [200]


async def test_keep_alive_three_requests_one_connection(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        for i in range(3):
            status, _, body = await h11_request(stream, "POST", f"/k{i}", b"x" * i)
            assert (status, body) == (200, f"POST /k{i} ".encode() + b"x" * i)
    assert echo.calls == 3


async def test_pipelined_requests_answered_in_order(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    last = b"GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\r\n" + reqs + last)  # a leading empty line is tolerated
        responses = parse_responses(await read_until_eof(stream))
    assert [r[2] for r in responses] == [b"GET /p0 ", b"GET /p1 ", b"GET /p2 ", b"GET /end "]
    assert echo.calls == 4


async def test_chunked_request_body_streams_to_handler(nursery: trio.Nursery) -> None:
    first_chunk_seen = trio.Event()
    seen: list[bytes] = []

    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        async for chunk in body:
            seen.append(bytes(chunk))
            first_chunk_seen.set()
        return Response(ResponseHead(200, ()), b"%d" % sum(map(len, seen)))

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(H.encode() + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        with trio.fail_after(2):
            await first_chunk_seen.wait()  # the handler runs before the body is complete
        await stream.send_all(b"6\r\n world\r\n0\r\n\r\n")
        status, _, body = parse_responses(await read_head(stream))[0]
    assert (status, body, seen) == (200, b"11", [b"hello", b" world"])


async def test_large_streaming_response_arrives_intact(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, ()), pattern(5 * MiB))

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        status, headers, body = await h11_request(stream, "GET", "/big")
        assert (b"transfer-encoding", b"chunked") in headers
        assert body == expected_pattern(5 * MiB)
        status, _, body = await h11_request(stream, "GET", "/again")  # still usable
    assert status == 200


async def test_http10_streamed_response_is_close_delimited(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, ()), pattern(100_000, 4096))

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        data = await read_until_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == expected_pattern(100_000, 4096)


async def test_head_response_has_no_body(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, (("content-length", "5"),)), b"hello")

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GOOD)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await read_until_eof(stream)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"content-length: 5" in head
    assert rest.startswith(b"HTTP/1.1 200")  # the next response follows directly: no body sent


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    expect = H + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(expect.encode())
        with trio.fail_after(2):
            assert (await read_head(stream)).startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"hello")
        assert parse_responses(await read_head(stream))[0][2] == b"POST / hello"


async def test_expect_100_not_read_by_handler_answers_and_closes(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(417, ()), b"no")

    port = await start_server(nursery, handler)
    expect = H + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(expect.encode())
        responses = parse_responses(await read_until_eof(stream))
    assert [(r[0], r[1].get("connection")) for r in responses] == [(417, "close")]


async def test_unread_body_is_drained_for_keep_alive(nursery: trio.Nursery) -> None:
    calls = []

    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        calls.append(head.path)
        return Response(ResponseHead(200, ()), b"ok")  # never reads the body

    port = await start_server(nursery, handler, ServerLimits(max_drain_bytes=4096))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all((H + "Content-Length: 3000\r\n\r\n").encode())
        assert parse_responses(await read_head(stream))[0][1].get("connection") is None
        await stream.send_all(b"a" * 3000 + GOOD)  # the body arrives after the response
        assert parse_responses(await read_head(stream))[0][0] == 200
        # over the drain budget: the response says close, and the connection closes
        await stream.send_all((H + "Content-Length: 100000\r\n\r\n" + "a" * 10).encode())
        responses = parse_responses(await read_until_eof(stream))
    assert [(r[0], r[1].get("connection")) for r in responses] == [(200, "close")]
    assert calls == ["/", "/first", "/"]


async def test_handler_errors(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        if head.path == "/missing":
            raise NoRouteFound("no route")
        if head.path == "/bug":
            raise RuntimeError("boom")
        return Response(ResponseHead(200, ()), b"ok")

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        reqs = [b"GET /%s HTTP/1.1\r\nHost: a\r\n\r\n" % p for p in (b"missing", b"ok", b"bug", b"x")]
        await stream.send_all(b"".join(reqs))
        responses = parse_responses(await read_until_eof(stream))
    assert [(r[0], r[1].get("connection")) for r in responses] == [
        (404, None),
        (200, None),
        (500, "close"),
    ]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ((("x-a", "b\r\nset-cookie: injected"),), b"ok"),  # response splitting
        ((("content-length", "5"),), b"too long"),  # declared length does not match
        ((("content-length", "x"),), b"ok"),
    ],
    ids=["crlf-injection", "length-mismatch", "bad-length"],
)
async def test_invalid_handler_response_becomes_500(
    nursery: trio.Nursery, headers: tuple[tuple[str, str], ...], body: bytes
) -> None:
    async def handler(head: RequestHead, req: Body, info: ConnInfo) -> Response:
        return Response(ResponseHead(200, headers), body)

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(GOOD)
        data = await read_until_eof(stream)
    assert b"injected" not in data
    assert [(r[0], r[1].get("connection")) for r in parse_responses(data)] == [(500, "close")]


async def test_streamed_response_with_content_length(nursery: trio.Nursery) -> None:
    async def handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        size = 10_000 if head.path == "/ok" else 20_000  # /short declares more than it sends
        return Response(ResponseHead(200, (("content-length", str(size)),)), pattern(10_000, 4096))

    port = await start_server(nursery, handler)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        _, headers, body = await h11_request(stream, "GET", "/ok")
        assert (b"content-length", b"10000") in headers and body == expected_pattern(10_000, 4096)
        await stream.send_all(b"GET /short HTTP/1.1\r\nHost: a\r\n\r\n")
        data = await read_until_eof(stream)  # cut short: the connection closes
    assert len(data.partition(b"\r\n\r\n")[2]) == 10_000


async def test_transport_agnostic_over_memory_streams(nursery: trio.Nursery) -> None:
    echo = Echo()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_http1, server, echo, INFO)
    status, _, body = await h11_request(client, "POST", "/mem", b"abc")
    assert (status, body) == (200, b"POST /mem abc")
    smuggle = H + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    await client.send_all(smuggle.encode())
    assert [r[0] for r in parse_responses(await read_until_eof(client))] == [400]
    assert echo.calls == 1


async def test_hop_by_hop_removed_and_absolute_form(nursery: trio.Nursery) -> None:
    echo = Echo()
    port = await start_server(nursery, echo)
    req = (
        "GET http://svcb:8080/notify?x=1 HTTP/1.1\r\nHost: svcb:8080\r\n"
        "Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 5\r\nX-Keep: 2\r\n\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(req.encode())
        await read_head(stream)
    head = echo.heads[0]
    assert head.headers == (("host", "svcb:8080"), ("x-keep", "2"))
    assert (head.authority, head.path) == ("svcb:8080", "/notify?x=1")


# ---------------------------------------------------------------------------------------------
# UpstreamPool


def get(path: str = "/") -> RequestHead:
    return RequestHead("GET", path, (("host", "up"),))


async def body_of(resp: Response) -> bytes:
    try:
        if isinstance(resp.body, bytes):
            return resp.body
        return b"".join([bytes(chunk) async for chunk in resp.body])
    finally:
        if resp.aclose is not None:
            await resp.aclose()


async def test_pool_reuses_one_connection(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo())
    pool = UpstreamPool()
    for i in range(10):
        resp = await pool.request("127.0.0.1", port, get(f"/r{i}"))
        assert await body_of(resp) == f"GET /r{i} ".encode()
    stats = pool.statistics()
    assert (stats.opened, stats.reused, stats.active) == (1, 9, 0)
    assert stats.idle == {("127.0.0.1", port): 1}
    await pool.aclose()
    assert pool.statistics().idle == {}


async def test_pool_max_age_and_idle_timeout_per_call(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo())
    pool = UpstreamPool()
    await body_of(await pool.request("127.0.0.1", port, get("/a"), max_age=0.2))
    await body_of(await pool.request("127.0.0.1", port, get("/b"), max_age=0.2))
    assert pool.statistics().opened == 1  # young enough: reused
    await trio.sleep(0.25)
    await body_of(await pool.request("127.0.0.1", port, get("/c"), max_age=0.2))
    assert pool.statistics().opened == 2  # older than max_age: closed, a new one opened
    await trio.sleep(0.15)
    await body_of(await pool.request("127.0.0.1", port, get("/d"), idle_timeout=0.1))
    assert pool.statistics().opened == 3  # idle longer than the per-call idle timeout
    await pool.aclose()


async def test_pool_connect_refused_and_timeout() -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens here now
    with pytest.raises(UpstreamConnectError):
        await UpstreamPool().request("127.0.0.1", port, get())

    async def black_hole(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    pool = UpstreamPool(limits=ClientLimits(connect_timeout=0.1), connect=black_hole)
    with pytest.raises(UpstreamConnectError, match="timeout"):
        await pool.request("10.0.0.1", 80, get())
    assert pool.statistics().active == 0


async def test_pool_retries_idle_connection_closed_by_server(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, Echo(), ServerLimits(idle_timeout=0.05))
    pool = UpstreamPool()
    assert await body_of(await pool.request("127.0.0.1", port, get("/1"))) == b"GET /1 "
    await trio.sleep(0.2)  # the server closes the pooled connection meanwhile
    post = RequestHead("POST", "/2", (("host", "up"),))
    resp = await pool.request("127.0.0.1", port, post, pattern(20_000, 4096))  # streamed body
    assert await body_of(resp) == b"POST /2 " + expected_pattern(20_000, 4096)
    stats = pool.statistics()
    assert (stats.opened, stats.stale_retries) == (2, 1)


async def test_pool_stdlib_http_server_peer() -> None:
    class Hello(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.2  # closes idle keep-alive connections, like any server's keep-alive timer

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        pool = UpstreamPool()
        port = httpd.server_address[1]
        for _ in range(5):
            assert await body_of(await pool.request("127.0.0.1", port, get())) == b"hello"
        assert pool.statistics().opened == 1
        await trio.sleep(0.5)  # http.server times the idle connection out
        assert await body_of(await pool.request("127.0.0.1", port, get())) == b"hello"
        assert (pool.statistics().opened, pool.statistics().stale_retries) == (2, 1)
        await pool.aclose()
    finally:
        await trio.to_thread.run_sync(httpd.shutdown)
        httpd.server_close()
        thread.join()


async def test_pool_upstream_dies_mid_body(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 10)
        await stream.aclose()

    port = await start_raw(nursery, script)
    pool = UpstreamPool()
    resp = await pool.request("127.0.0.1", port, get())
    assert resp.head.status == 200  # the head arrived: the failure surfaces from the body
    with pytest.raises(UpstreamResetError) as info:
        await body_of(resp)
    assert type(info.value) is UpstreamResetError and info.value.request_sent
    assert pool.statistics().active == 0 and pool.statistics().idle == {}


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
    ids=["no-colon", "obs-fold", "cl-te", "bare-lf", "not-http"],
)
async def test_pool_malformed_response(nursery: trio.Nursery, reply: bytes) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(reply)
        await trio.sleep(1)

    port = await start_raw(nursery, script)
    with pytest.raises(UpstreamProtocolError) as info:
        await UpstreamPool().request("127.0.0.1", port, get())
    assert info.value.status == 502 and info.value.response_flag == "UPE"


async def test_pool_fresh_connection_closed_without_answer_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.aclose()

    port = await start_raw(nursery, script)
    pool = UpstreamPool()
    with pytest.raises(UpstreamResetError) as info:
        await pool.request("127.0.0.1", port, get())
    assert info.value.request_sent and pool.statistics().stale_retries == 0


async def test_pool_response_timeout(nursery: trio.Nursery) -> None:
    async def script(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    port = await start_raw(nursery, script)
    pool = UpstreamPool(limits=ClientLimits(response_timeout=0.2))
    with pytest.raises(UpstreamTimeoutError):
        await pool.request("127.0.0.1", port, get())
    assert pool.statistics().active == 0


async def test_pool_stream_idle_timeouts(nursery: trio.Nursery) -> None:
    async def never_reads(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def stalls_mid_body(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
        await trio.sleep_forever()

    pool = UpstreamPool(limits=ClientLimits(stream_idle_timeout=0.2))
    post = RequestHead("POST", "/", (("host", "up"),))
    never = await start_raw(nursery, never_reads)
    with pytest.raises(UpstreamTimeoutError, match="sending stalled"), trio.fail_after(5):
        await pool.request("127.0.0.1", never, post, pattern(64 * MiB))
    resp = await pool.request("127.0.0.1", await start_raw(nursery, stalls_mid_body), get())
    with pytest.raises(UpstreamTimeoutError):
        await body_of(resp)
    assert pool.statistics().active == 0


async def hash_handler(head: RequestHead, body: Body, info: ConnInfo) -> Response:
    if head.path == "/big":
        return Response(ResponseHead(200, ()), pattern(5 * MiB))
    digest, size = hashlib.sha256(), 0
    async for chunk in body:
        digest.update(chunk)
        size += len(chunk)
    return Response(ResponseHead(200, ()), f"{size} {digest.hexdigest()}".encode())


async def test_pool_streams_1mib_request_body(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, hash_handler)
    post = RequestHead("POST", "/upload", (("host", "up"),))
    resp = await UpstreamPool().request("127.0.0.1", port, post, pattern(MiB, 16 * 1024))
    expected = hashlib.sha256(expected_pattern(MiB, 16 * 1024)).hexdigest()
    assert await body_of(resp) == f"{MiB} {expected}".encode()


async def test_proxy_chain_downstream_pool_upstream(nursery: trio.Nursery) -> None:
    """raw client -> serve_http1 -> UpstreamPool -> serve_http1, both directions streamed."""
    up = await start_server(nursery, hash_handler)
    pool = UpstreamPool()

    async def proxy(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        return await pool.request("127.0.0.1", up, head, body)

    port = await start_server(nursery, proxy)
    payload = expected_pattern(MiB)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        status, _, body = await h11_request(stream, "POST", "/upload", payload)
        assert body == f"{MiB} {hashlib.sha256(payload).hexdigest()}".encode()
        status, _, body = await h11_request(stream, "GET", "/big")
        assert (status, body == expected_pattern(5 * MiB)) == (200, True)
    assert pool.statistics().opened == 1


async def serve_script(nursery: trio.Nursery, replies: list[bytes], *, trickle: bool = False) -> int:
    """A raw upstream: answers the requests of one connection with ``replies`` in order (a reply
    ending in ``<EOF>`` closes), ``trickle``: one byte at a time."""

    async def script(stream: trio.SocketStream) -> None:
        for reply in replies:
            if not await read_head(stream):
                return
            data = reply.removesuffix(b"<EOF>")
            for i in range(0, len(data), 1 if trickle else len(data) or 1):
                await stream.send_all(data[i : i + 1] if trickle else data)
                await trio.sleep(0.001 if trickle else 0)
            if reply.endswith(b"<EOF>"):
                await stream.aclose()
                return
        await trio.sleep(1)

    return await start_raw(nursery, script)


async def test_pool_chunked_response_in_one_byte_writes_then_reuse(nursery: trio.Nursery) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    port = await serve_script(nursery, [chunked, b"HTTP/1.1 204 No Content\r\n\r\n"], trickle=True)
    pool = UpstreamPool()
    resp = await pool.request("127.0.0.1", port, get())
    assert ("transfer-encoding", "chunked") not in resp.head.headers
    assert await body_of(resp) == b"\r\n\r\nabc"
    assert (await pool.request("127.0.0.1", port, get())).head.status == 204
    assert (pool.statistics().opened, pool.statistics().reused) == (1, 1)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\n\r\nuntil EOF<EOF>",
        b"HTTP/1.0 200 OK\r\ncontent-length: 9\r\n\r\nuntil EOF",
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nuntil EOF",
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nuntil EOFHTTP/1.1 200 OK",
    ],
    ids=["close-delimited", "http10", "connection-close", "bytes-after-response"],
)
async def test_pool_does_not_reuse_after(nursery: trio.Nursery, reply: bytes) -> None:
    pool = UpstreamPool()
    resp = await pool.request("127.0.0.1", await serve_script(nursery, [reply]), get())
    assert await body_of(resp) == b"until EOF"
    assert (pool.statistics().idle, pool.statistics().active) == ({}, 0)


async def test_pool_skips_1xx_and_reads_no_body_after_head(nursery: trio.Nursery) -> None:
    replies = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",  # to HEAD: no body follows
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    ]
    port = await serve_script(nursery, replies)
    pool = UpstreamPool()
    resp = await pool.request("127.0.0.1", port, RequestHead("HEAD", "/", (("host", "up"),)))
    assert (resp.head.status, resp.head.header("content-length"), await body_of(resp)) == (200, "5", b"")
    resp = await pool.request("127.0.0.1", port, get())
    assert (resp.head.status, await body_of(resp)) == (201, b"ok")
    assert (pool.statistics().opened, pool.statistics().reused) == (1, 1)


async def test_pool_streamed_body_must_match_its_length(nursery: trio.Nursery) -> None:
    """A streamed body shorter or longer than the Content-Length sent upstream is our bug: the
    request fails with 500 and the connection (whose framing is now wrong) is closed."""

    class Sized:
        def __init__(self, chunks: list[bytes], length: int):
            self.expected_length = length
            self._chunks = iter(chunks)

        def __aiter__(self) -> Sized:
            return self

        async def __anext__(self) -> bytes:
            for chunk in self._chunks:
                return chunk
            raise StopAsyncIteration

    port = await start_server(nursery, Echo())
    pool = UpstreamPool()
    put = RequestHead("PUT", "/", (("host", "up"),))
    for chunks in ([b"ab"], [b"ab", b"cdefgh"]):
        with pytest.raises(LocalProtocolError) as info:
            await pool.request("127.0.0.1", port, put, Sized(chunks, 4))
        assert info.value.status_hint == 500
        assert (pool.statistics().idle, pool.statistics().active) == ({}, 0)
    resp = await pool.request("127.0.0.1", port, put, Sized([b"ab", b"cd"], 4))
    assert await body_of(resp) == b"PUT / abcd"
