"""TCP through two real sidecars (mTLS, ALPN meshd-tcp): a 1 GiB transfer arrives byte-identical,
the half-close matrix (client FIN first, server FIN first, RST either side) releases every
socket, tcp routes split connections by weight across subsets, and localhost upstream ports
carry TCP (declared ``tcp``) and HTTP (detected) to their services."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tcp_helpers import IO_TIMEOUT, Mesh, TcpApp, connect, ends, recv_all, reset, upstream

from meshd.demo.harness import free_port, wait_until

pytestmark = pytest.mark.slow

TRANSFER_BYTES = int(os.environ.get("MESHD_TCP_TEST_BYTES", str(1 << 30)))  # 1 GiB
RULES = """\
[[destination]]
name = "db"
host = "db"
protocol = "tcp"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]

[[route]]
name = "db"
host = "db"
[[route.tcp]]
name = "split"
destinations = [{ subset = "v1", weight = 70 }, { subset = "v2", weight = 30 }]

[[authorization]]
name = "locked"
host = "locked"
action = "DENY"
[[authorization.rules]]
from = { principals = ["*"] }
"""


def greeter(conn: socket.socket) -> None:
    """A server-first protocol (SMTP-like): greet, then echo until EOF."""
    conn.sendall(b"220 ready\n")
    conn.sendall(recv_all(conn))



class DbApp:
    """The raw TCP app behind the db sidecars; the first line of a connection is a command."""

    def __init__(self, name: str, port: int, results: dict[str, object], done: threading.Condition):
        self.name, self.results, self.done = name, results, done
        self.app = TcpApp(port, self.serve)

    def _record(self, key: str, value: object) -> None:
        with self.done:
            self.results[key] = value
            self.done.notify_all()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        while b"\n" not in buf:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
        line, rest = buf.split(b"\n", 1)
        cmd, _, token = line.decode().partition(" ")
        if cmd == "WHO":
            conn.sendall(self.name.encode())
        elif cmd == "HASH":
            digest, count = hashlib.sha256(rest), len(rest)
            while data := conn.recv(1 << 20):
                digest.update(data)
                count += len(data)
            conn.sendall(f"{digest.hexdigest()} {count}".encode())
        elif cmd == "CFIN":  # the client half-closes first; we answer after its EOF
            got = rest + recv_all(conn)
            conn.sendall(b"pong:" + got)
        elif cmd == "SFIN":  # we half-close first and still read what the client sends after
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            self._record(token, rest + recv_all(conn))
        elif cmd == "HOLD":  # the client resets; how did our side end?
            self._record(token, ends(conn))
        elif cmd == "RST":
            conn.sendall(b"x")
            time.sleep(0.2)
            reset(conn)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, dict[str, int], dict]]:
    h = Mesh(Path(tmp_path_factory.mktemp("tcp")), ttl=3.0, drain=0.2)
    ports = {"db": free_port(), "web": free_port(), "raw": free_port(), "locked": free_port()}
    results: dict[str, object] = {}
    done = threading.Condition()
    apps: list[DbApp] = []
    try:
        h.start_meshd()
        for name, version in (("db-1", "v1"), ("db-2", "v2")):
            sc = h.add_service(name, "db", None, {"version": version}, mtls_mode="STRICT")
            apps.append(DbApp(name, sc.app_port, results, done))
        h.add_service("web-1", "web", "msgd", {"version": "v1"})
        raw = TcpApp(h.add_service("raw-1", "raw", None).app_port, greeter)  # protocol undeclared
        locked = TcpApp(h.add_service("locked-1", "locked", None).app_port, greeter)
        h.extra["client-1"] = "".join(upstream(s, ports[s], 5432 if s == "db" else 0) for s in ports)
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.wait_ready()
        h.push_rules(RULES, "tcp.toml")
        h.wait_certs("client-1", "db-1", "db-2")
        yield h, ports, {"results": results, "done": done, "apps": apps, "raw": raw, "locked": locked}
        assert [e for a in apps for e in a.app.errors] == [] and raw.errors == []
    finally:
        for a in apps:
            a.app.close()
        h.close()


def _wait_result(state: dict, key: str) -> object:
    with state["done"]:
        assert state["done"].wait_for(lambda: key in state["results"], IO_TIMEOUT), key
        return state["results"][key]


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


def test_one_gib_through_two_sidecars_is_byte_identical(mesh) -> None:
    h, ports, _ = mesh
    before = h.handshakes("db-1") + h.handshakes("db-2")
    block = os.urandom(4 << 20)
    view = memoryview(block + block)
    sent, digest = 0, hashlib.sha256()
    start = time.perf_counter()
    with connect(ports["db"]) as sock:
        sock.sendall(b"HASH\n")
        i = 0
        while sent < TRANSFER_BYTES:
            off = (i * 4099) % len(block)
            chunk = view[off:off + min(len(block), TRANSFER_BYTES - sent)]
            digest.update(chunk)
            sock.sendall(chunk)
            sent += len(chunk)
            i += 1
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock).decode()
    seconds = time.perf_counter() - start
    assert answer == f"{digest.hexdigest()} {TRANSFER_BYTES}"
    assert h.handshakes("db-1") + h.handshakes("db-2") > before  # the hop was mTLS
    print(f"\nTCP {TRANSFER_BYTES / 2**20:.0f} MiB through two sidecars (mTLS): "
          f"{TRANSFER_BYTES / 1e6 / seconds:.0f} MB/s")


def test_client_fin_first(mesh) -> None:
    _, ports, _ = mesh
    with connect(ports["db"]) as sock:
        sock.sendall(b"CFIN\nping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"pong:ping"  # the answer came after our FIN, then EOF


def test_server_fin_first(mesh) -> None:
    _, ports, state = mesh
    with connect(ports["db"]) as sock:
        sock.sendall(b"SFIN s1\n")
        assert recv_all(sock) == b"hello"  # EOF from the server while our direction is open
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
    assert _wait_result(state, "s1") == b"bye"


def test_client_reset_releases_both_sides(mesh) -> None:
    h, ports, state = mesh
    pids = [h.sidecars[n].procs[-1].pid for n in ("client-1", "db-1", "db-2")]
    baseline = [_sockets(p) for p in pids]
    sock = connect(ports["db"])
    sock.sendall(b"HOLD r1\npartial")
    wait_until(lambda: sum(a.app.accepted for a in state["apps"]) > 0, IO_TIMEOUT, "accepted")
    time.sleep(0.3)
    reset(sock)
    assert _wait_result(state, "r1") in ("eof", "reset")
    for pid, base in zip(pids, baseline, strict=True):
        wait_until(lambda p=pid, b=base: _sockets(p) <= b, IO_TIMEOUT, f"sockets of {pid} released")


def test_server_reset_reaches_the_client(mesh) -> None:
    _, ports, _ = mesh
    with connect(ports["db"]) as sock:
        sock.sendall(b"RST\n")
        assert sock.recv(1) == b"x"
        assert ends(sock) in ("eof", "reset")


def test_tcp_route_splits_connections_by_weight(mesh) -> None:
    _, ports, _ = mesh
    seen: Counter[bytes] = Counter()
    for _ in range(100):
        with connect(ports["db"]) as sock:
            sock.sendall(b"WHO\n")
            seen[recv_all(sock)] += 1
    assert sum(seen.values()) == 100 and set(seen) == {b"db-1", b"db-2"}
    assert 50 <= seen[b"db-1"] <= 90, seen  # 70 % expected; binomial sd 4.6


def test_upstream_port_carries_http_to_an_http_service(mesh) -> None:
    _, ports, _ = mesh
    resp = httpx.get(f"http://127.0.0.1:{ports['web']}/send", timeout=IO_TIMEOUT)
    assert resp.status_code == 200 and resp.json()["instance"] == "web-1"


def test_undeclared_server_first_protocol_is_detected_as_tcp(mesh) -> None:
    """Nothing from the client: after the detection timeout the bytes count as opaque TCP."""
    _, ports, _ = mesh
    with connect(ports["raw"]) as sock:
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += sock.recv(64)
        assert greeting == b"220 ready\n"
        sock.sendall(b"EHLO x")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"EHLO x"


def test_inbound_authorization_denies_tcp(mesh) -> None:
    h, ports, state = mesh
    with connect(ports["locked"]) as sock:
        sock.sendall(b"hello")
        assert ends(sock) in ("eof", "reset")
    assert state["locked"].accepted == 0  # the denied connection never reached the app
    log = h.workdir / "locked-1.log"
    wait_until(lambda: "denied by locked" in log.read_text(), IO_TIMEOUT, "the inbound denied it")


def test_outbound_port_waits_for_a_slow_http_client(mesh) -> None:
    """Silence past the detection timeout on the outbound port is still HTTP (pre-connect)."""
    h, _, _ = mesh
    with connect(h.sidecars["client-1"].outbound) as sock:
        time.sleep(1.5)
        sock.sendall(b"GET /send HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 200 ")
