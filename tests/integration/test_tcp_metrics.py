"""Istio TCP metrics and TCP circuit breaking through two real sidecars (client -> db, mTLS).

Known byte counts each way must show up exactly in ``istio_tcp_received_bytes_total`` /
``istio_tcp_sent_bytes_total`` on both sidecars' admin ``/metrics`` (reporter ``source`` on the
client's, ``destination`` on the db's), with opened == closed == connections; with the
destination's ``connection_pool.max_connections = 2``, 5 concurrent connections get exactly 2
served and 3 reset at once, counted with response flag ``UO`` (Envoy ``upstream_cx_overflow``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tcp_helpers import IO_TIMEOUT, Mesh, TcpApp, connect, ends, recv_all, upstream

from meshd.demo.harness import free_port, wait_until

pytestmark = pytest.mark.slow

REQUEST_BYTES = 123_457  # client -> db per connection
RESPONSE_BYTES = 345_679  # db -> client per connection
CONNECTIONS = 3
MAX_CONNECTIONS = 2
CONCURRENT = 5
RULES = f"""\
[[destination]]
name = "db"
host = "db"
protocol = "tcp"
[destination.connection_pool]
max_connections = {MAX_CONNECTIONS}
"""


def db_app(conn: socket.socket) -> None:
    """``S``: read REQUEST_BYTES until EOF, answer RESPONSE_BYTES; ``H``: greet, hold until EOF."""
    first = conn.recv(1)
    if first == b"H":
        conn.sendall(b"hi")
        recv_all(conn)
        return
    got = len(first) + len(recv_all(conn))
    conn.sendall(b"r" * RESPONSE_BYTES if got == REQUEST_BYTES else f"got {got}".encode())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, int, TcpApp]]:
    h = Mesh(Path(tmp_path_factory.mktemp("tcpm")), ttl=3.0, drain=0.2)
    port = free_port()
    app: TcpApp | None = None
    try:
        h.start_meshd()
        app = TcpApp(h.add_service("db-1", "db", None, {"version": "v1"}, mtls_mode="STRICT").app_port,
                     db_app)
        h.extra["client-1"] = upstream("db", port)
        h.add_service("client-1", "client", None, {"version": "v1"})
        h.wait_ready()
        h.push_rules(RULES, "tcp-metrics.toml")
        h.wait_certs("client-1", "db-1")
        yield h, port, app
        assert app.errors == []
    finally:
        if app is not None:
            app.close()
        h.close()


def tcp_metric(h: Mesh, name: str, metric: str, **labels: str) -> float:
    """Sum of ``istio_tcp_<metric>_total`` samples of sidecar ``name`` matching ``labels``."""
    text = h.http.get(f"http://127.0.0.1:{h.sidecars[name].admin}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"istio_tcp_{metric}_total" and all(s.labels.get(k) == v
                                                              for k, v in labels.items()):
                total += s.value
    return total


def test_tcp_metrics_count_exact_bytes_on_both_sidecars(mesh) -> None:
    h, port, _ = mesh
    for i in range(1, CONNECTIONS + 1):
        with connect(port) as sock:
            sock.sendall(b"S" + b"q" * (REQUEST_BYTES - 1))
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"r" * RESPONSE_BYTES
        # one connection at a time: its slot (max_connections) is free before the next one
        wait_until(lambda n=i: tcp_metric(h, "client-1", "connections_closed") == n, IO_TIMEOUT,
                   "client sidecar closed the connection")
    out = {"reporter": "source", "source_workload": "client", "destination_service": "db",
           "destination_workload": "db", "destination_version": "v1", "request_protocol": "tcp",
           "response_flags": "-", "connection_security_policy": "unknown"}
    inb = {"reporter": "destination", "source_workload": "client",
           "source_principal": "spiffe://cluster.local/ns/default/sa/client",
           "destination_workload": "db", "destination_service": "db", "request_protocol": "tcp",
           "response_flags": "-", "connection_security_policy": "mutual_tls"}
    wait_until(lambda: tcp_metric(h, "db-1", "connections_closed", **inb) == CONNECTIONS,
               IO_TIMEOUT, "db sidecar closed every connection")
    for name, labels in (("client-1", out), ("db-1", inb)):
        got = {m: tcp_metric(h, name, m, **labels) for m in
               ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")}
        assert got == {"connections_opened": CONNECTIONS, "connections_closed": CONNECTIONS,
                       "received_bytes": CONNECTIONS * REQUEST_BYTES,
                       "sent_bytes": CONNECTIONS * RESPONSE_BYTES}, name
        assert tcp_metric(h, name, "connections_opened") == CONNECTIONS, name  # no other series


def test_max_connections_resets_the_overflow_with_uo(mesh) -> None:
    h, port, app = mesh
    opened = tcp_metric(h, "client-1", "connections_opened", response_flags="-")
    sent = tcp_metric(h, "client-1", "sent_bytes", response_flags="-")
    db_opened = tcp_metric(h, "db-1", "connections_opened")
    accepted = app.accepted
    socks = [connect(port) for _ in range(CONCURRENT)]
    try:
        outcomes = []
        for sock in socks:  # served: the app's greeting; refused: EOF/reset with no byte
            first = b""
            try:
                sock.sendall(b"H")  # a refused connection may be reset already
                first = sock.recv(2)
            except (ConnectionResetError, BrokenPipeError):
                outcomes.append("reset")
                continue
            outcomes.append("served" if first == b"hi" else ends(sock))
        assert outcomes.count("served") == MAX_CONNECTIONS, outcomes
        assert len(outcomes) == CONCURRENT and set(outcomes) <= {"served", "eof", "reset"}
        assert app.accepted - accepted == MAX_CONNECTIONS
        uo = {"reporter": "source", "response_flags": "UO", "destination_service": "db"}
        assert tcp_metric(h, "client-1", "connections_opened", **uo) == CONCURRENT - MAX_CONNECTIONS
        assert tcp_metric(h, "client-1", "connections_closed", **uo) == CONCURRENT - MAX_CONNECTIONS
        assert tcp_metric(h, "client-1", "sent_bytes", **uo) == 0
        # bytes are counted while the connections are still open (not only at close)
        wait_until(lambda: tcp_metric(h, "client-1", "sent_bytes", response_flags="-")
                   == sent + 2 * MAX_CONNECTIONS, IO_TIMEOUT, "greetings counted while open")
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: tcp_metric(h, "client-1", "connections_closed", response_flags="-")
               == opened + MAX_CONNECTIONS, IO_TIMEOUT, "served connections closed")
    assert tcp_metric(h, "client-1", "connections_opened", response_flags="-") == opened + MAX_CONNECTIONS
    wait_until(lambda: tcp_metric(h, "db-1", "connections_closed") == db_opened + MAX_CONNECTIONS,
               IO_TIMEOUT, "db sidecar saw only the served connections")
    assert tcp_metric(h, "db-1", "connections_opened") == db_opened + MAX_CONNECTIONS
