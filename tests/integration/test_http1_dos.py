"""Connection-level DoS on the sidecar's HTTP/1.1 listener: slowloris, connection cap, idle.

The listener under test is the sidecar's own inbound path, in this process so that its limits
can be made small: ``trio.serve_tcp`` -> ``gated(ConnectionGate)`` -> ``serve_http1`` with a
``ServerLimits`` -> ``proxy.inbound.Inbound`` -> ``UpstreamPool`` -> an app (``serve_http1``
answering ``ok``) on another loopback port. Normal traffic is ``curl`` (a separate process),
one new connection per request.
"""

from __future__ import annotations

import shutil
import statistics
from functools import partial

import pytest
import trio

from sidecar import bootstrap
from sidecar.http.client import UpstreamPool, UpstreamProtocolError
from sidecar.http.limits import ServerLimits
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.http.server import ConnectionGate, gated, serve_http1
from sidecar.metrics import Metrics
from sidecar.proxy.inbound import Inbound

ATTACKERS = 1000
HEADER_TIMEOUT = 3.0  # seconds, the limit under test (default HEADER_READ_TIMEOUT is 10 s)
TRICKLE = 1.0  # seconds between two header bytes of an attacker: no single read waits 3 s
SLACK = 5.0  # seconds allowed past the header timeout on a loaded, shared 2-vCPU machine


async def app(head: RequestHead, body: Body, info: ConnInfo) -> Response:
    return Response(ResponseHead(200, ()), b"ok " + head.path.encode())


class Timed(trio.abc.HalfCloseableStream):
    """A server-side socket stream that notes (trio time) its first byte received and when it
    sent a ``408``: the listener's own view of the head deadline, free of client-side lag."""

    def __init__(self, inner: trio.SocketStream, log: list[float]) -> None:
        self.inner, self.log, self.first = inner, log, 0.0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data and not self.first:
            self.first = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[:13]) == b"HTTP/1.1 408 ":
            self.log.append(trio.current_time() - self.first)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Sidecar:
    """The inbound listener of a sidecar for service ``a`` whose app is ``app``."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.gate = ConnectionGate(limits.max_connections)
        self.port = 0
        self.timeouts: list[float] = []  # server side: first head byte -> 408 sent, seconds

    async def start(self, nursery: trio.Nursery) -> None:
        app_port = await _serve(nursery, partial(serve_http1, handler=app, info=ConnInfo(None, None)))
        boot = bootstrap.parse(f'service = "a"\napp_port = {app_port}\ninstance_id = "a-1"\n', env={})
        inbound = Inbound(boot, UpstreamPool(), Metrics())

        async def conn(stream: trio.SocketStream) -> None:
            info = ConnInfo(stream.socket.getpeername()[:2], stream.socket.getsockname()[:2])
            await serve_http1(Timed(stream, self.timeouts), inbound.handle, info, limits=self.limits)

        self.port = await _serve(nursery, gated(self.gate, conn))


async def _serve(nursery: trio.Nursery, handler: object) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def get(port: int, stream: trio.abc.Stream | None = None) -> int:
    """One GET on ``stream`` (kept alive) or a new connection (closed); its status."""
    own = stream is None
    s = stream or await trio.open_tcp_stream("127.0.0.1", port)
    try:
        close = b"Connection: close\r\n" if own else b""
        await s.send_all(b"GET /n HTTP/1.1\r\nHost: a\r\n" + close + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"ok /n"):
            more = await s.receive_some(65536)
            if not more:
                break
            data += more
        return int(data.split(b" ", 2)[1]) if data else 0
    finally:
        if own:
            await s.aclose()


class Slowloris:
    """``n`` connections that each send a head start, then one more header byte every ``TRICKLE``
    seconds (one trickling task for all), and never end the head. ``results``: per connection,
    seconds from its first byte to EOF and the bytes it received."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.streams: list[trio.SocketStream] = []
        self.results: list[tuple[float, bytes]] = []
        self.peak = 0  # most connections open at once
        self.all_connected, self.all_closed = trio.Event(), trio.Event()

    async def run(self, nursery: trio.Nursery) -> None:
        for i in range(self.n):
            nursery.start_soon(self._one)
            if i % 20 == 19:
                await trio.sleep(0.01)  # arrivals spread over ~1 s (< HEADER_TIMEOUT), as attacks ramp up
        await self.all_connected.wait()
        nursery.start_soon(self._trickle)
        await self.all_closed.wait()

    async def _one(self) -> None:
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            start, data = trio.current_time(), bytearray()
            self.streams.append(stream)
            self.peak = max(self.peak, len(self.streams) - len(self.results))
            if len(self.streams) == self.n:
                self.all_connected.set()
            while True:
                try:
                    chunk = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                data += chunk
            self.results.append((trio.current_time() - start, bytes(data)))
            if len(self.results) == self.n:
                self.all_closed.set()

    async def _trickle(self) -> None:
        while not self.all_closed.is_set():
            await trio.sleep(TRICKLE)
            for stream in self.streams:
                try:
                    await stream.send_all(b"x")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass


async def curl_loop(port: int, stop: trio.Event, counts: dict[str, int]) -> None:
    """Normal traffic while ``stop`` is unset: curl, 10 requests per run, a new connection each."""
    urls = [a for i in range(10) for a in ("-o", "/dev/null", f"http://127.0.0.1:{port}/n?i={i}")]
    while not stop.is_set():
        proc = await trio.run_process(
            ["curl", "-s", "-w", "%{http_code}\\n", "--max-time", "10", "-H", "Connection: close", *urls],
            capture_stdout=True, check=False)
        codes = proc.stdout.decode().split()
        counts["ok"] += codes.count("200")
        counts["failed"] += 10 - codes.count("200")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_slowloris_1000_connections_closed_in_time_while_traffic_flows(nursery: trio.Nursery) -> None:
    sidecar = Sidecar(ServerLimits(header_timeout=HEADER_TIMEOUT, max_connections=ATTACKERS + 100))
    await sidecar.start(nursery)
    attack = Slowloris(sidecar.port, ATTACKERS)
    counts = {"ok": 0, "failed": 0}
    stop = trio.Event()
    start = trio.current_time()
    with trio.fail_after(HEADER_TIMEOUT + SLACK + 30):
        async with trio.open_nursery() as inner:
            inner.start_soon(attack.run, inner)
            inner.start_soon(curl_loop, sidecar.port, stop, counts)
            await attack.all_connected.wait()
            peak = trio.current_time() - start  # all ATTACKERS open at once from here
            await attack.all_closed.wait()
            stop.set()
    results = attack.results
    times = sorted(t for t, _ in results)
    server = sorted(sidecar.timeouts)
    answered = sum(data.startswith(b"HTTP/1.1 408 ") for _, data in results)
    print(f"slowloris: {answered}/{ATTACKERS} got 408 + close; time to close min {times[0]:.2f} s, "
          f"p50 {statistics.median(times):.2f} s, max {times[-1]:.2f} s (header timeout {HEADER_TIMEOUT} s; "
          f"server side: 408 sent after p50 {statistics.median(server):.2f} s, max {server[-1]:.2f} s); "
          f"curl during the attack: {counts['ok']} ok, {counts['failed']} failed; "
          f"{attack.peak} open at once ({peak:.1f} s in), attack lasted {trio.current_time() - start:.1f} s")
    assert answered == ATTACKERS == len(server) == attack.peak
    assert HEADER_TIMEOUT - 0.1 <= times[0] and times[-1] <= HEADER_TIMEOUT + SLACK
    assert counts["ok"] >= 10 and counts["failed"] == 0
    with trio.fail_after(5):
        while sidecar.gate.open:  # noqa: ASYNC110 (the server-side count, polled)
            await trio.sleep(0.05)


async def test_connection_cap_refuses_new_and_keeps_served(nursery: trio.Nursery) -> None:
    sidecar = Sidecar(ServerLimits(max_connections=20))
    await sidecar.start(nursery)
    served = [await trio.open_tcp_stream("127.0.0.1", sidecar.port) for _ in range(20)]
    assert [await get(sidecar.port, s) for s in served] == [200] * 20
    refused = 0
    for _ in range(10):  # over the cap: closed unanswered
        async with await trio.open_tcp_stream("127.0.0.1", sidecar.port) as extra:
            try:
                with trio.fail_after(5):
                    refused += await get(sidecar.port, extra) == 0
            except trio.BrokenResourceError:
                refused += 1
    assert (refused, sidecar.gate.refused, sidecar.gate.open) == (10, 10, 20)
    assert [await get(sidecar.port, s) for s in served] == [200] * 20  # still served
    for s in served[:5]:
        await s.aclose()
    with trio.fail_after(5):
        while sidecar.gate.open > 15:  # noqa: ASYNC110 (the server-side count, polled)
            await trio.sleep(0.02)
    assert [await get(sidecar.port) for _ in range(3)] == [200] * 3  # room again
    for s in served[5:]:
        await s.aclose()


async def test_idle_keep_alive_and_silent_connections_closed(nursery: trio.Nursery) -> None:
    sidecar = Sidecar(ServerLimits(idle_timeout=0.5))
    await sidecar.start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", sidecar.port) as used, \
            await trio.open_tcp_stream("127.0.0.1", sidecar.port) as silent:
        assert await get(sidecar.port, used) == 200
        start = trio.current_time()
        with trio.fail_after(5):
            assert await used.receive_some(100) == b""  # closed quietly: no 408 when idle
            assert await silent.receive_some(100) == b""
        waited = trio.current_time() - start
    print(f"idle keep-alive connections closed after {waited:.2f} s (idle_timeout 0.5 s)")
    assert 0.4 <= waited <= 3.0


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 61 * 1024 + b"\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 101 + b"content-length: 0\r\n\r\n",
], ids=["61k-head", "102-headers"])
async def test_oversized_upstream_response_head_is_502(nursery: trio.Nursery, head: bytes) -> None:
    """The same head limits apply to what an upstream sends back (Envoy's codec limits)."""

    async def upstream(stream: trio.SocketStream) -> None:
        while b"\r\n\r\n" not in await stream.receive_some(65536):
            pass
        await stream.send_all(head)
        await trio.sleep(1)

    port = await _serve(nursery, upstream)
    with pytest.raises(UpstreamProtocolError) as info:
        await UpstreamPool().request("127.0.0.1", port, RequestHead("GET", "/", (("host", "up"),)))
    assert info.value.status == 502
