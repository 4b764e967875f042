"""HTTP/2 attacks against a real sidecar's listener, from a raw client written with the ``h2``
library (and ``hyperframe`` for frames h2 will not send): rapid reset (CVE-2023-44487), PING and
SETTINGS floods, CONTINUATION flood, HPACK bomb, and the per-stream header limits. Each attack
must end with a GOAWAY and a closed connection (or a 431 for one stream), and the sidecar must
keep serving other clients."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from meshd.demo.harness import MeshHarness
from sidecar.http2.h2conn import new_connection

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench"
REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "app"), (":path", "/")]


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    h = MeshHarness(tmp_path_factory.mktemp("h2attack"), ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        sc = h.add_service("app-1", "app", None, {"version": "v1"})
        origin = subprocess.Popen([sys.executable, str(BENCH / "tiny_origin.py"), "--port",
                                   str(sc.app_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.procs.insert(0, origin)
        h.wait_ready()
        h.wait_app("app-1")
        yield sc.inbound
    finally:
        h.close()


class Client:
    """A raw HTTP/2 (h2c prior knowledge) client on a blocking socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # GOAWAY does not end the h2 state machine, so frames after it are still read
        self.h2 = new_connection(client_side=True, settings={}, max_header_list_size=1 << 20)
        self.h2.initiate_connection()
        self.flush()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.responses: dict[int, int] = {}
        self.closed = False

    def flush(self, extra: bytes = b"") -> bool:
        try:
            self.sock.sendall(self.h2.data_to_send() + extra)
            return True
        except OSError:
            self.closed = True
            return False

    def pump(self, timeout: float) -> None:
        """Read and handle what arrives within ``timeout`` seconds (until EOF)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        except OSError:
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            return
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.ResponseReceived):
                self.responses[event.stream_id] = int(dict(event.headers)[b":status"])
        self.flush()

    def wait_closed(self, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.pump(0.5)

    def request(self, headers: list[tuple[str, str]] = REQUEST) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=True)
        self.flush()
        deadline = time.monotonic() + 10
        while sid not in self.responses and not self.closed and time.monotonic() < deadline:
            self.pump(0.5)
        return self.responses.get(sid, 0)

    def close(self) -> None:
        self.sock.close()


def _healthy(port: int) -> None:
    client = Client(port)
    try:
        assert client.request() == 200
    finally:
        client.close()


def test_rapid_reset_is_cut_off_within_1000_streams(port: int) -> None:
    client = Client(port)
    sent = 0
    while sent < 50_000 and client.goaway is None and not client.closed:
        for _ in range(100):
            sid = client.h2.get_next_available_stream_id()
            client.h2.send_headers(sid, REQUEST, end_stream=True)
            client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        if not client.flush():
            break
        sent += 100
        client.pump(0.001)
    client.wait_closed()
    assert client.goaway is not None, f"no GOAWAY after {sent} streams"
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.goaway.last_stream_id < 2 * 1000  # at most 1000 streams were processed
    assert client.closed and sent < 50_000
    client.close()
    _healthy(port)


@pytest.mark.parametrize("frame", ["ping", "settings"])
def test_ping_and_settings_floods_close_the_connection(port: int, frame: str) -> None:
    client = Client(port)
    for _ in range(5000):
        if frame == "ping":
            client.h2.ping(b"12345678")
        else:
            client.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    client.flush()
    client.wait_closed()
    assert client.goaway is not None and client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    client.close()
    _healthy(port)


def test_continuation_flood_closes_the_connection(port: int) -> None:
    client = Client(port)
    block = hpack.Encoder().encode(REQUEST)
    frames = [HeadersFrame(1, data=block)]  # no END_HEADERS: CONTINUATION must follow
    frames += [ContinuationFrame(1, data=b"") for _ in range(10_000)]
    client.flush(b"".join(f.serialize() for f in frames))
    client.wait_closed()
    assert client.closed and client.goaway is not None
    assert client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    client.close()
    _healthy(port)


def test_hpack_bomb_closes_the_connection(port: int) -> None:
    client = Client(port)
    big = ("x-big", "a" * 4000)  # enters the 4 KiB dynamic table, then costs 1 byte per copy
    assert client.request([*REQUEST, big]) == 200
    encoded = len(client.h2.encoder.encode([*REQUEST, *[big] * 40]))
    assert encoded < 100  # 40 x 4 KB = 160 KB decoded from < 100 bytes on the wire
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, [*REQUEST, *[big] * 40], end_stream=True)
    client.flush()
    client.wait_closed()
    assert client.goaway is not None and client.goaway.error_code in (
        ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.COMPRESSION_ERROR)
    client.close()
    _healthy(port)


def test_header_limits_answer_431_and_keep_the_connection(port: int) -> None:
    client = Client(port)
    many = [*REQUEST, *[(f"x-h{i}", "v") for i in range(101)]]
    assert client.request(many) == 431
    large = [*REQUEST, ("x-large", "b" * (61 * 1024))]  # over 60 KiB, under the 64 KiB HPACK cap
    assert client.request(large) == 431
    assert client.request([*REQUEST, *[(f"x-h{i}", "v") for i in range(99)]]) == 200
    assert not client.closed and client.goaway is None
    client.close()
