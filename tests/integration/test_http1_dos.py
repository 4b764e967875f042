"""Connection-level DoS on the sidecar's HTTP/1.1 listeners: slowloris, connection cap, idle.

Slowloris runs against REAL ``mesh-sidecar`` processes (``MeshHarness``: meshd, a ``client``
sidecar without app, an ``echo`` sidecar in front of the ``static`` demo app) whose bootstrap
``[limits]`` sets ``header_timeout`` to 3 s: 1000 connections trickle a head that never ends into
the echo sidecar's inbound listener (the one a hostile peer on the network reaches; PERMISSIVE,
so plain text) or into the client sidecar's outbound listener, while ``curl`` (a separate
process, a new connection per request) sends normal requests through the same listener.

The connection cap and idle tests use the same listener stack in this process, so that its
limits can be small: ``trio.serve_tcp`` -> ``gated(ConnectionGate)`` -> ``serve_http1`` with a
``ServerLimits`` -> ``proxy.inbound.Inbound`` -> ``UpstreamPool`` -> an app (``serve_http1``
answering ``ok``) on another loopback port (the cap also runs on a sidecar process in
``test_sidecar_limits.py``).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
from collections.abc import Iterator
from functools import partial

import pytest
import trio

from meshd.demo.harness import MeshHarness
from meshd.demo.harness import Sidecar as SidecarProcess
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
NOFILE = 4096  # RLIMIT_NOFILE wanted here and in the sidecars (inherited): > 1000 attackers + pools
FD_HEADROOM = 200  # file descriptors besides the attack: listeners, pools, logs, curl
LIMITS = f"\n[limits]\nheader_timeout = {HEADER_TIMEOUT}\n"


async def app(head: RequestHead, body: Body, info: ConnInfo) -> Response:
    return Response(ResponseHead(200, ()), b"ok " + head.path.encode())


class Listener:
    """In this process: the inbound listener of a sidecar for service ``a`` whose app is ``app``."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.gate = ConnectionGate(limits.max_connections)
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        app_port = await _serve(nursery, partial(serve_http1, handler=app, info=ConnInfo(None, None)))
        boot = bootstrap.parse(f'service = "a"\napp_port = {app_port}\ninstance_id = "a-1"\n', env={})
        inbound = Inbound(boot, UpstreamPool(), Metrics())

        async def conn(stream: trio.SocketStream) -> None:
            info = ConnInfo(stream.socket.getpeername()[:2], stream.socket.getsockname()[:2])
            await serve_http1(stream, inbound.handle, info, limits=self.limits)

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


class SlowlorisMesh(MeshHarness):
    """``MeshHarness`` whose sidecar bootstraps end with a ``[limits]`` table."""

    def _bootstrap(self, sc: SidecarProcess) -> str:
        return super()._bootstrap(sc) + LIMITS


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowlorisMesh]:
    """meshd + ``client-1`` (no app) + ``echo-1`` (static app), all with ``[limits]``; started
    after raising this process's RLIMIT_NOFILE soft limit, which the processes inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if max(soft, want) < ATTACKERS + FD_HEADROOM:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {ATTACKERS} connections")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    h = SlowlorisMesh(tmp_path_factory.mktemp("slowloris"), ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.add_service("echo-1", "echo", "static", {"version": "v1"})
        h.wait_ready()
        h.wait_synced()
        h.wait_certs("client-1", "echo-1")
        yield h
    finally:
        h.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds(pid: int) -> int:
    """File descriptors the process ``pid`` holds open (its sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of process ``pid`` (``/proc/<pid>/limits``)."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft = line.split()[3]
    return 1 << 62 if soft == "unlimited" else int(soft)


class Slowloris:
    """``n`` connections that each send a head start, then one more header byte every ``TRICKLE``
    seconds (one trickling task for all), and never end the head. ``results``: per connection,
    seconds from its connect to EOF (>= the listener's own head time) and the bytes it received."""

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
        start, data = trio.current_time(), bytearray()  # from before connect
        async with await trio.open_tcp_stream("127.0.0.1", self.port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
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


async def curl_loop(ports: list[int], stop: trio.Event, counts: dict[str, int]) -> None:
    """Normal traffic to the ``echo`` service while ``stop`` is unset: curl, 10 requests per run
    spread over ``ports`` (sidecar listeners), a new connection each."""
    urls = [a for i in range(10) for a in ("-o", "/dev/null",
                                           f"http://127.0.0.1:{ports[i % len(ports)]}/n?i={i}")]
    while not stop.is_set():
        proc = await trio.run_process(
            ["curl", "-s", "--noproxy", "*", "-w", "%{http_code}\\n", "--max-time", "10",
             "-H", "Host: echo", "-H", "Connection: close", *urls], capture_stdout=True, check=False)
        codes = proc.stdout.decode().split()
        counts["ok"] += codes.count("200")
        counts["failed"] += 10 - codes.count("200")


async def sample_fds(pid: int, stop: trio.Event, seen: list[int]) -> None:
    """``seen`` gains the open-descriptor count of ``pid`` every 0.1 s until ``stop``."""
    while not stop.is_set():
        seen.append(open_fds(pid))
        await trio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_slowloris_1000_connections_closed_in_time_while_traffic_flows(
        mesh: SlowlorisMesh, listener: str) -> None:
    """``inbound``: the echo sidecar's inbound listener, normal traffic both plain to it and
    through the client sidecar (mTLS to that listener); ``outbound``: the client sidecar's
    outbound listener, normal traffic through it."""
    target = mesh.sidecars["echo-1" if listener == "inbound" else "client-1"]
    port, pid = getattr(target, listener), target.procs[-1].pid
    assert nofile_limit(pid) >= ATTACKERS + FD_HEADROOM  # raised here, inherited by the sidecar
    normal = [mesh.sidecars["client-1"].outbound] + ([port] if listener == "inbound" else [])
    baseline = open_fds(pid)
    attack = Slowloris(port, ATTACKERS)
    counts, fds = {"ok": 0, "failed": 0}, [baseline]
    stop = trio.Event()
    start = trio.current_time()
    with trio.fail_after(HEADER_TIMEOUT + SLACK + 15):
        async with trio.open_nursery() as inner:
            inner.start_soon(attack.run, inner)
            inner.start_soon(curl_loop, normal, stop, counts)
            inner.start_soon(sample_fds, pid, stop, fds)
            await attack.all_connected.wait()
            ramp = trio.current_time() - start  # all ATTACKERS open at once from here
            await attack.all_closed.wait()
            stop.set()
    lasted = trio.current_time() - start
    with trio.fail_after(5):  # the sidecar released every attack socket
        while open_fds(pid) > baseline + 50:  # noqa: ASYNC110 (the server-side count, polled)
            await trio.sleep(0.05)
    times = sorted(t for t, _ in attack.results)
    answered = sum(data.startswith(b"HTTP/1.1 408 ") for _, data in attack.results)
    print(f"slowloris on the {listener} listener of a sidecar process: {answered}/{ATTACKERS} got "
          f"408 + close; time to close min {times[0]:.2f} s, p50 {statistics.median(times):.2f} s, "
          f"max {times[-1]:.2f} s (header_timeout {HEADER_TIMEOUT} s); sidecar fds {baseline} -> "
          f"peak {max(fds)} -> {open_fds(pid)} (RLIMIT_NOFILE {nofile_limit(pid)}); curl during the "
          f"attack: {counts['ok']} ok, {counts['failed']} failed; {attack.peak} open at once "
          f"({ramp:.1f} s in), attack lasted {lasted:.1f} s")
    assert answered == ATTACKERS == attack.peak
    assert max(fds) - baseline >= ATTACKERS  # the sidecar held all of them open at once
    assert HEADER_TIMEOUT <= times[0] and times[-1] <= HEADER_TIMEOUT + SLACK
    assert counts["ok"] >= 10 and counts["failed"] == 0


async def test_connection_cap_refuses_new_and_keeps_served(nursery: trio.Nursery) -> None:
    sidecar = Listener(ServerLimits(max_connections=20))
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
    sidecar = Listener(ServerLimits(idle_timeout=0.5))
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
