"""HTTP/1.1 smuggling and malformed-request corpus through real sidecar processes.

meshd and two sidecars run as processes (``MeshHarness``): ``client-1`` (no app) and ``a-1``
(service ``a``) whose app is ``Recorder``, a raw TCP upstream that parses what it receives with
h11 (a third-party parser, not ours) and records every request boundary: method, target,
headers and body of each complete request, and any request cut off unfinished.

Each corpus case is sent on a fresh connection right after a good request (``GET
/good/<listener>/<case>``), to the client sidecar's outbound listener (two sidecars, mTLS
between them) and to ``a-1``'s inbound listener. Every case must get its status with
``connection: close`` and then EOF, and the recorder must have seen exactly the good requests:
nothing of a rejected request, and no request whose boundary differs from what was sent.
``BOUNDARY`` cases are valid requests that carry smuggling-looking bytes: each must arrive as
exactly one request with its body intact. Header limits (431) are checked at write sizes from
1 byte to 1 MiB.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from meshd.demo.harness import MeshHarness, wait_until
from sidecar.http.limits import HEADER_READ_TIMEOUT, LINGER_TIMEOUT
from tests.integration.test_http_layer import SMUGGLING

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
# cases sent at once; more makes a loaded CI box queue mTLS handshakes past the 1 s connect
# timeout (503 UF)
PARALLEL = 10
H = "POST / HTTP/1.1\r\nHost: a\r\n"
G = "GET / HTTP/1.1\r\nHost: a\r\n"
TE = H + "Transfer-Encoding: chunked\r\n\r\n"

# (id, raw request, expected status): added to the 30 cases of test_http_layer.SMUGGLING
EXTRA = [
    # Content-Length + Transfer-Encoding in other spellings
    ("cl-te-capital", H + "Content-Length: 4\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-nospace-cl", H + "Transfer-Encoding:chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("te-tabs-cl", H + "Transfer-Encoding:\tchunked\t\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("te-cl-zero", H + "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n", 400),
    ("cl-te-identity", H + "Content-Length: 4\r\nTransfer-Encoding: identity\r\n\r\nabcd", 501),
    ("te-space-colon-cl", H + "Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold", H + "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("http10-te-cl", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", 400),
    # Transfer-Encoding variants
    ("te-chunked-then-identity", H + "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("te-identity-chunked", H + "Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 501),
    ("te-quoted", H + 'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n', 501),
    ("te-vertical-tab", H + "Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-param", H + "Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n", 501),
    # Content-Length values
    ("cl-minus", H + "Content-Length: -1\r\n\r\n", 400),
    ("cl-hex", H + "Content-Length: 0x4\r\n\r\nabcd", 400),
    ("cl-inner-space", H + "Content-Length: 4 4\r\n\r\nabcd", 400),
    ("cl-exponent", H + "Content-Length: 1e1\r\n\r\nabcdefghij", 400),
    ("cl-overflow", H + "Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("cl-dup-case", H + "content-length: 4\r\nCONTENT-LENGTH: 4\r\n\r\nabcd", 400),
    ("cl-empty", H + "Content-Length: \r\n\r\n", 400),
    ("cl-tab-before-colon", H + "Content-Length\t: 4\r\n\r\nabcd", 400),
    # header names and line endings
    ("nul-in-name", G + "X\x00A: b\r\n\r\n", 400),
    ("no-colon", G + "X-A b\r\n\r\n", 400),
    ("empty-name", G + ": v\r\n\r\n", 400),
    ("paren-in-name", G + "X(A): b\r\n\r\n", 400),
    ("space-in-name", G + "X A: b\r\n\r\n", 400),
    ("high-byte-in-name", G + "X\xffA: b\r\n\r\n", 400),
    ("fold-first-header", "GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    ("bare-cr-request-line", "GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("bare-lf-blank-line", "GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    ("leading-bare-lf", "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("del-in-value", G + "X-A: b\x7fc\r\n\r\n", 400),
    # chunked framing
    ("chunk-size-plus", TE + "+3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-0x", TE + "0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-leading-space", TE + " 3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-nul", TE + "3;a\x00\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-lf", TE + "3;a\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-open-quote", TE + '3;a="x\r\nabc\r\n0\r\n\r\n', 400),
    ("chunk-ext-70k", TE + "3;" + "a" * 70_000 + "\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-data-bare-lf", TE + "3\r\nabc\n0\r\n\r\n", 400),
    ("chunk-data-longer", TE + "3\r\nabcd\r\n0\r\n\r\n", 400),
    ("trailer-bare-cr", TE + "0\r\nT: a\rb\r\n\r\n", 400),
    ("trailer-content-length", TE + "3\r\nabc\r\n0\r\nContent-Length: 99\r\n\r\n", 400),
    ("trailer-transfer-encoding", TE + "3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # Host and request-target
    ("host-dup-case", "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    ("host-space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-slash", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("host-list", "GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    ("absolute-host-mismatch", "GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-userinfo", "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-ftp", "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-https-plaintext", "GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-no-slash", "GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-fragment", "GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("asterisk-not-options", "GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect-origin-form", "CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("nul-in-target", "GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("space-in-target", "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("high-byte-target", "GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("uri-70k", "GET /" + "a" * 70_000 + " HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    # request line, method, version
    ("request-line-extra", "GET / HTTP/1.1 x\r\nHost: a\r\n\r\n", 400),
    ("http09-no-version", "GET /\r\n\r\n", 400),
    ("http09-version", "GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    ("http3-version", "GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    ("version-lowercase", "GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("version-two-digits", "GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    ("method-bad-char", "G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("tab-separator", "GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("leading-space", " GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # pipelined smuggle attempts: the second request must never reach the upstream
    ("pipelined-after-cl-te", H + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
     "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("pipelined-after-bad-chunk", TE + "3\r\nabcGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", 400),
]
CORPUS = [*SMUGGLING, *EXTRA]

# (id, raw request, target, body the upstream must receive as ONE request); "/b/" becomes
# "/b/<listener>/" so that each listener's run is told apart upstream
SMUGGLE_BODY = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
LAST_CHUNK_DATA = "0\r\n\r\n" + SMUGGLE_BODY
BOUNDARY = [
    ("cl-body-holds-request", f"POST /b/1 HTTP/1.1\r\nHost: a\r\nContent-Length: {len(SMUGGLE_BODY)}\r\n\r\n"
     + SMUGGLE_BODY, "/b/1", SMUGGLE_BODY),
    ("get-with-body", f"GET /b/2 HTTP/1.1\r\nHost: a\r\nContent-Length: {len(SMUGGLE_BODY)}\r\n\r\n"
     + SMUGGLE_BODY, "/b/2", SMUGGLE_BODY),
    ("chunk-holds-last-chunk", "POST /b/3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     f"{len(LAST_CHUNK_DATA):x}\r\n{LAST_CHUNK_DATA}\r\n0\r\n\r\n", "/b/3", LAST_CHUNK_DATA),
    ("chunk-ext-and-trailer", "POST /b/4 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     "3;x=1\r\nabc\r\n0\r\nX-Trailer: v\r\n\r\n", "/b/4", "abc"),
    ("connection-nominates-cl", "POST /b/5 HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n"
     f"Content-Length: {len(SMUGGLE_BODY)}\r\n\r\n" + SMUGGLE_BODY, "/b/5", SMUGGLE_BODY),
    ("underscore-te-name", "POST /b/6 HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n"
     "Content-Length: 4\r\n\r\nabcd", "/b/6", "abcd"),
    ("te-uppercase", "POST /b/7 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
     "4\r\nabcd\r\n0\r\n\r\n", "/b/7", "abcd"),
    ("cl-leading-zeros", "POST /b/8 HTTP/1.1\r\nHost: a\r\nContent-Length: 004\r\n\r\nabcd", "/b/8", "abcd"),
    ("absolute-form-same-host", "GET http://a/b/9 HTTP/1.1\r\nHost: a\r\n\r\n", "/b/9", ""),
    ("http10-cl", "POST /b/10 HTTP/1.0\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd", "/b/10", "abcd"),
]
END = "GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@dataclass
class Seen:
    """What the recorder received on one connection."""

    requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)  # targets of requests cut off unfinished
    errors: list[str] = field(default_factory=list)  # bytes h11 refused


class Recorder(socketserver.ThreadingTCPServer):
    """The upstream app: parses with h11 and records every request boundary it sees."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.conns: list[Seen] = []
        super().__init__(("127.0.0.1", port), _RecordHandler)

    def all_requests(self) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
        with self.lock:
            return [r for seen in self.conns for r in seen.requests]

    def anomalies(self) -> list[str]:
        with self.lock:
            return [f"partial {p}" for s in self.conns for p in s.partial] + [
                f"h11 error {e}" for s in self.conns for e in s.errors
            ]


class _RecordHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Recorder = self.server  # type: ignore[assignment]
        seen = Seen()
        with server.lock:
            server.conns.append(seen)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * MiB)
        target, headers, body = "", [], bytearray()
        self.request.settimeout(30)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                with server.lock:
                    seen.errors.append(repr(exc))
                return
            if event is h11.NEED_DATA:
                try:
                    data = self.request.recv(65536)
                except OSError:
                    data = b""
                if not data and conn.their_state is h11.SEND_BODY:
                    with server.lock:
                        seen.partial.append(target)
                    return
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
            elif isinstance(event, h11.Request):
                target = event.target.decode("latin-1")
                headers = [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
                method, body = event.method.decode(), bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                with server.lock:
                    seen.requests.append((method, target, headers, bytes(body)))
                reply = f"ok {target}".encode()
                self.request.sendall(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(reply)))]))
                    + conn.send(h11.Data(data=reply))
                    + conn.send(h11.EndOfMessage())
                )
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
            elif isinstance(event, h11.ConnectionClosed):
                return


@dataclass
class Mesh:
    harness: MeshHarness
    recorder: Recorder
    ports: dict[str, int]  # listener name -> port


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    h = MeshHarness(Path(tmp_path_factory.mktemp("smuggling")), ttl=3.0, drain=0.2)
    recorder: Recorder | None = None
    try:
        h.start_meshd()
        client = h.add_service("client-1", "client", None)
        a = h.add_service("a-1", "a", None)
        recorder = Recorder(a.app_port)
        threading.Thread(target=recorder.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        h.wait_ready()
        h.wait_synced()
        wait_until(lambda: _status(client.outbound, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n") == 200,
                   20, "client-1 reaches service a")
        yield Mesh(h, recorder, {"outbound": client.outbound, "inbound": a.inbound})
    finally:
        if recorder is not None:
            recorder.shutdown()
            recorder.server_close()
        h.close()


def _status(port: int, raw: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        data = s.recv(65536)
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def exchange(port: int, raw: bytes, slice_size: int | None = None, within: float = 10.0) -> bytes:
    """Send ``raw`` (in ``slice_size`` writes, TCP_NODELAY) and return everything read until EOF.

    Stops sending once the server answered or closed (it may reject before the end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = slice_size or len(raw) or 1
        try:
            for i in range(0, len(raw), step):
                s.sendall(raw[i : i + step])
                if (i // step) % max(1, 1024 // step) == 0 and select.select([s], [], [], 0)[0]:
                    break  # an answer (or EOF) is waiting: the rest would only be discarded
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = bytearray()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                raise AssertionError(f"reset instead of EOF after {bytes(out[:200])!r}") from None
            if not data:
                return bytes(out)
            out += data
        raise AssertionError(f"no EOF within {within} s after {bytes(out[:200])!r}")


def responses(data: bytes) -> list[tuple[int, dict[str, str]]]:
    """Status and headers of each Content-Length framed response in ``data``."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        out.append((int(lines[0].split(" ")[1]), headers))
        data = data[int(headers.get("content-length", "0")) :]
    return out


def _good(listener: str, name: str) -> bytes:
    return f"GET /good/{listener}/{name} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_corpus_rejected_closed_and_never_forwarded(mesh: Mesh, listener: str) -> None:
    """N/N corpus cases get their 4xx/5xx + ``connection: close`` + EOF; the upstream sees only
    the good request before each, with the boundary it was sent with."""
    assert len(CORPUS) >= 40 and len({c[0] for c in CORPUS}) == len(CORPUS)
    port = mesh.ports[listener]

    def run(case: tuple[str, str, int]) -> tuple[str, list[tuple[int, str | None]]] | None:
        name, raw, status = case
        got = responses(exchange(port, _good(listener, name) + raw.encode("latin-1")))
        if [r[0] for r in got] != [200, status] or got[1][1].get("connection") != "close":
            return name, [(r[0], r[1].get("connection")) for r in got]
        return None

    with ThreadPoolExecutor(PARALLEL) as pool:  # bounded: see PARALLEL
        wrong = [w for w in pool.map(run, CORPUS) if w is not None]
    seen = [r for r in mesh.recorder.all_requests() if r[1].startswith(f"/good/{listener}/")]
    unexpected = [r[:2] for r in mesh.recorder.all_requests() if "smuggled" in r[1] or r[1] == "/"]
    print(f"corpus via {listener}: {len(CORPUS) - len(wrong)}/{len(CORPUS)} rejected as expected; "
          f"upstream saw {len(seen)} good requests, {len(unexpected)} others")
    assert wrong == []
    assert sorted(r[1] for r in seen) == sorted(f"/good/{listener}/{c[0]}" for c in CORPUS)
    assert all(r[0] == "GET" and r[3] == b"" for r in seen)  # each good request arrived alone
    assert unexpected == [] and _anomalies(mesh) == []


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
def test_smuggling_shaped_valid_requests_keep_their_boundary(mesh: Mesh, listener: str) -> None:
    """Valid requests whose bodies look like requests or chunk ends arrive upstream as exactly
    one request each, with the body sent, never with both Content-Length and Transfer-Encoding."""
    port, prefix = mesh.ports[listener], f"/b/{listener}/"

    def run(case: tuple[str, str, str, str]) -> None:
        name, raw = case[:2]
        http10 = " HTTP/1.0\r\n" in raw  # not kept alive: no second request
        data = raw.replace("/b/", prefix) + ("" if http10 else END)
        got = responses(exchange(port, data.encode("latin-1")))
        assert [r[0] for r in got] == ([200] if http10 else [200, 200]), name

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(run, BOUNDARY))
    requests = mesh.recorder.all_requests()
    for name, _, target, body in BOUNDARY:
        got = [r for r in requests if r[1] == target.replace("/b/", prefix)]
        assert [r[3] for r in got] == [body.encode("latin-1")], (name, got)
        names = {k for k, _ in got[0][2]}
        assert not {"content-length", "transfer-encoding"} <= names, name
    print(f"boundary cases via {listener}: {len(BOUNDARY)}/{len(BOUNDARY)} arrived as one request")
    assert not any("smuggled" in r[1] for r in requests)
    assert _anomalies(mesh) == []


def _anomalies(mesh: Mesh) -> list[str]:
    return [a for a in mesh.recorder.anomalies() if "/stream-bad" not in a]


def test_bad_chunk_after_forwarding_started_gets_400_and_aborts_upstream(mesh: Mesh) -> None:
    """A chunked body that turns bad after the sidecar began streaming it upstream: the client
    gets 400 + close, the upstream connection is cut so no complete (different) request exists."""
    with socket.create_connection(("127.0.0.1", mesh.ports["outbound"]), timeout=10) as s:
        s.sendall(b"POST /stream-bad HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        wait_until(lambda: bool(mesh.recorder.conns), 5, "upstream connection")
        time.sleep(0.3)  # the head and first chunk are upstream by now
        s.sendall(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
        out = bytearray()
        while data := s.recv(65536):
            out += data
    assert [(r[0], r[1].get("connection")) for r in responses(bytes(out))] == [(400, "close")]
    wait_until(lambda: any("/stream-bad" in a for a in mesh.recorder.anomalies()), 5, "upstream cut")
    assert not any(r[1] in ("/stream-bad", "/smuggled") for r in mesh.recorder.all_requests())


_BIG_START = "GET /big HTTP/1.1\r\nHost: a\r\nX-Big: "
BIG_HEAD = (_BIG_START + "a" * (MiB - len(_BIG_START) - 4) + "\r\n\r\n").encode()
MANY_HEADERS = ("GET /many HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(200))
                + "\r\n").encode()


WRITE_SIZES = [1, 7, 64, 1024, 65536, MiB]


def test_header_limits_hold_at_every_write_size(mesh: Mesh) -> None:
    """A 1 MiB head (> 60 KiB) and a head of 201 lines (> 100 headers), each written in slices
    of 1 B, 7 B, 64 B, 1 KiB, 64 KiB and 1 MiB: 431 + close every time, nothing forwarded."""
    assert len(BIG_HEAD) == MiB and len(MANY_HEADERS) < 8 * 1024
    before = len(mesh.recorder.all_requests())
    runs = [(raw, size) for raw in (BIG_HEAD, MANY_HEADERS) for size in WRITE_SIZES]

    def run(case: tuple[bytes, int]) -> list[tuple[int, str | None]]:
        got = responses(exchange(mesh.ports["outbound"], case[0], case[1], within=20))
        return [(r[0], r[1].get("connection")) for r in got]

    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(run, runs))
    print(f"header limits: {results.count([(431, 'close')])}/{len(runs)} answered 431 + close")
    assert results == [[(431, "close")]] * len(runs)
    assert len(mesh.recorder.all_requests()) == before


def test_heads_just_under_the_limits_pass(mesh: Mesh) -> None:
    """90 headers and a 50 KiB head are forwarded (the next hop adds a few headers of its own)."""
    raw = ("GET /under HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(88))
           + "X-Pad: " + "p" * 50_000 + "\r\nConnection: close\r\n\r\n").encode()
    assert [r[0] for r in responses(exchange(mesh.ports["outbound"], raw, 1024))] == [200]


def test_sidecar_process_closes_slowloris_at_its_default_header_timeout(mesh: Mesh) -> None:
    """The shipped defaults, end to end: 200 connections trickling a head into the outbound
    listener get 408 + close after HEADER_READ_TIMEOUT (10 s) while requests keep succeeding.
    The FIN follows the 408 at once (the drain wrapper passes ``send_eof``), not after the 1 s
    linger: every close would come at >= 11 s otherwise.
    (The 1000-connection run with a small configured limit is in test_http1_dos.py.)"""
    n, timeout = 200, HEADER_READ_TIMEOUT
    socks = [socket.create_connection(("127.0.0.1", mesh.ports["outbound"]), timeout=5) for _ in range(n)]
    started, closed, got = {}, {}, {s: b"" for s in socks}
    for s in socks:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        started[s] = time.monotonic()
    ok = failed = 0
    deadline = time.monotonic() + timeout + 15
    try:
        while len(closed) < n and time.monotonic() < deadline:
            for s in select.select([s for s in socks if s not in closed], [], [], 1.0)[0]:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                got[s] += data
                if not data:
                    closed[s] = time.monotonic() - started[s]
            for s in socks:
                if s not in closed:
                    try:
                        s.send(b"x")  # a header byte at most every second: no read waits 10 s
                    except OSError:
                        pass
            try:
                ok += _status(mesh.ports["outbound"], _good("slowloris", str(ok))) == 200
            except OSError:
                failed += 1
    finally:
        for s in socks:
            s.close()
    times = sorted(closed.values())
    print(f"sidecar process slowloris: {sum(g.startswith(b'HTTP/1.1 408 ') for g in got.values())}/{n} "
          f"got 408 + close after {times[0]:.1f}..{times[-1]:.1f} s (default {timeout:g} s); "
          f"{ok} requests ok, {failed} failed meanwhile")
    assert len(closed) == n and all(g.startswith(b"HTTP/1.1 408 ") for g in got.values())
    assert timeout - 0.5 <= times[0] < timeout + LINGER_TIMEOUT and times[-1] <= timeout + 5
    assert ok >= 5 and failed == 0
