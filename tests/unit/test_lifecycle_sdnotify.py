"""sd_notify over real AF_UNIX datagram sockets, and the sidecar's drain over real TCP sockets."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import msgspec
import pytest
import trio

from meshd.sdnotify import Notifier, socket_address, watchdog_interval
from sidecar import bootstrap, lifecycle
from sidecar.lifecycle import ConnectionGroup, drainable, listen_fds, reload_plan


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.ready("up and serving") and n.stopping()
        assert rx.recv(4096) == b"READY=1\nSTATUS=up and serving"
        assert rx.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_notify_abstract_socket() -> None:
    name = f"meshd-test-{uuid.uuid4().hex}"
    with _receiver(b"\0" + name.encode()) as rx:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify(WATCHDOG=1)
        assert rx.recv(4096) == b"WATCHDOG=1"
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).reloading()
        assert rx.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")


def test_notify_is_a_noop_without_socket(tmp_path: Path) -> None:
    assert not Notifier({}).ready()
    assert socket_address("vsock:2:1") is None
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()  # never raises


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}, 7) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, 7) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None
    assert watchdog_interval({}, 7) is None


async def test_watchdog_pings(tmp_path: Path) -> None:
    path = str(tmp_path / "wd")
    with _receiver(path) as rx:
        rx.setblocking(False)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())})
        with trio.move_on_after(0.4):
            await n.run_watchdog()
        pings = []
        while True:
            try:
                pings.append(rx.recv(100))
            except BlockingIOError:
                break
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}


def test_listen_fds() -> None:
    assert listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": "42"}, 42) == [3, 4]
    assert listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": "41"}, 42) == []
    assert listen_fds({"LISTEN_FDS": "nope", "LISTEN_PID": "42"}, 42) == []


def test_reload_plan_applies_token_and_names_the_rest() -> None:
    old = bootstrap.parse('service = "svcb"\napp_port = 8080\ntoken = "a"\n', env={})
    new = msgspec.structs.replace(old, token="b", drain_seconds=1.0, labels={"version": "v2"}, app_port=9090)
    merged, restart = reload_plan(old, new)
    assert (merged.token, merged.drain_seconds) == ("b", 1.0)
    assert (merged.labels, merged.app_port) == ({}, 8080)
    assert restart == ["app_port", "labels"]


def test_token_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("secret-token\n")
    boot = bootstrap.parse(f'service = "s"\napp_port = 1\ntoken_file = "{tmp_path / "t"}"\n', env={})
    assert boot.token == "secret-token"
    env = {"MESH_JOIN_TOKEN_FILE": str(tmp_path / "missing")}
    with pytest.raises(Exception, match="cannot read token_file"):
        bootstrap.parse('service = "s"\napp_port = 1\n', env=env)


async def _line_server(stream: trio.SocketStream) -> None:
    """A tiny HTTP/1.1-like server: one line in, `sleep <s>` waits, one line out, keep-alive."""
    conn = drainable(stream)
    buf = b""
    async with conn:
        while True:
            data = await conn.receive_some(1024)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"sleep"):
                    await trio.sleep(float(line.split()[1]))
                await conn.send_all(b"HTTP/1.1 200 done " + line + b"\n")


async def test_drain_closes_idle_finishes_in_flight_and_stops_accepting() -> None:
    group = ConnectionGroup("test")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(group.serve, _line_server, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await idle.send_all(b"ping\n")
        assert await idle.receive_some(100) == b"HTTP/1.1 200 done ping\n"  # now idle, kept alive
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        await busy.send_all(b"sleep 0.5\n")
        await trio.sleep(0.1)
        left = await group.drain(trio.current_time() + 5)
        assert left == 0
        assert await idle.receive_some(100) == b""  # closed while idle
        assert await busy.receive_some(100) == b"HTTP/1.1 200 done sleep 0.5\n"  # finished
        assert await busy.receive_some(100) == b""  # then closed
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)  # no longer accepting
    assert lifecycle.IN_FLIGHT_DEADLINE > 0
