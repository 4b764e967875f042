"""Process lifecycle of the sidecar: systemd socket activation, graceful drain, SIGHUP reload.

* **Socket activation** (``sd_listen_fds(3)``): with ``LISTEN_PID`` = our pid, fds
  ``3 .. 3+LISTEN_FDS-1`` are listening sockets opened by a ``.socket`` unit. A listener whose
  port matches one of them adopts it instead of binding. systemd keeps those sockets open across
  a restart of the service, so connections made while the process is replaced wait in the
  kernel's backlog instead of being refused (0 failed requests across ``systemctl restart``).
* **Drain** (``ConnectionGroup``, one per listener): stop accepting, close idle keep-alive
  connections (an HTTP/1.1 connection waiting for its next request head reads EOF, the client
  retries on a new connection), let in-flight exchanges finish, and wait for the last
  connection or the deadline. After a response the next read of an HTTP/1.1 connection is the
  next request head: that is how ``DrainStream`` knows a connection is idle without parsing.
  Over a TCP stream it is a ``HalfCloseableStream`` (``HalfCloseDrainStream``), so a response
  that closes the connection sends its FIN at once, before the lingering read.
* **Reload**: ``reload_plan`` splits a changed bootstrap into what applies at once and what
  needs a restart (logged).

Pure functions (``listen_fds``, ``reload_plan``) take their environment as arguments.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import trio

from meshd.errors import ConfigError
from meshd.sdnotify import Notifier
from sidecar import bootstrap
from sidecar.bootstrap import Bootstrap

log = logging.getLogger("sidecar.lifecycle")
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3)
RELOADABLE = frozenset({"token", "token_file", "drain_seconds"})  # read where used, not cached
IN_FLIGHT_DEADLINE = 10.0  # seconds for in-flight exchanges; with drain_seconds < TimeoutStopSec 30 s
READY_POLL = 0.05  # seconds between checks for the first applied snapshot
_GROUP: contextvars.ContextVar[ConnectionGroup | None] = contextvars.ContextVar("group", default=None)


def listen_fds(env: Mapping[str, str], pid: int) -> list[int]:
    """The fds passed by systemd to ``pid`` (empty unless LISTEN_PID matches)."""
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if count <= 0 or env.get("LISTEN_PID", "") != str(pid):
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def inherited_sockets() -> dict[int, socket.socket]:
    """Adopt systemd's listening TCP sockets, by local port; unsets LISTEN_* (sd_listen_fds
    with unset_environment=1, so children do not take them)."""
    found: dict[int, socket.socket] = {}
    for fd in listen_fds(os.environ, os.getpid()):
        sock = socket.socket(fileno=fd)  # family and type read from the fd
        os.set_inheritable(fd, False)
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
            found[sock.getsockname()[1]] = sock
        else:
            log.warning("ignoring inherited fd %d: not a TCP socket", fd)
            sock.detach()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if found:
        log.info("socket activation: ports %s from systemd", sorted(found))
    return found


def warn_unused(inherited: dict[int, socket.socket]) -> None:
    """Sockets systemd passed that no listener took (the .socket unit's ports differ from the
    bootstrap's): systemd keeps them listening and nobody answers, so say so loudly."""
    for port, sock in sorted(inherited.items()):
        log.warning("socket activation: systemd listens on port %d for this unit but the bootstrap "
                    "does not use it; connections there get no answer (fix the .socket drop-in)", port)
        sock.close()
    inherited.clear()


class DrainStream(trio.abc.Stream):
    """An HTTP/1.1 server connection that reads EOF when it is idle and its group drains."""

    def __init__(self, inner: trio.abc.Stream, group: ConnectionGroup) -> None:
        self.inner, self.group = inner, group
        self.idle = True           # waiting for (the first byte of) a request head
        self._scope: trio.CancelScope | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        if not bytes(data[:13]) == b"HTTP/1.1 100 ":  # after 100-continue the body follows
            self.idle = True

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.idle:
            return await self.inner.receive_some(max_bytes)
        if self.group.draining:
            return b""
        data: bytes | None = None
        with trio.CancelScope() as self._scope:
            data = await self.inner.receive_some(max_bytes)
        self._scope = None
        if data is None or (self.group.draining and not data):  # cancelled by the drain
            return b""
        self.idle = not data
        return data

    def close_if_idle(self) -> None:
        if self.idle and self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        self.group.http1.discard(self)
        try:
            await self.inner.aclose()
        except trio.BrokenResourceError:  # an SSLStream whose idle read the drain cancelled
            pass


class HalfCloseDrainStream(DrainStream, trio.abc.HalfCloseableStream):
    """A ``DrainStream`` over a half-closeable stream (TCP): ``send_eof`` passes through, so
    ``serve_http1`` closing after a response sends FIN before it lingers (the client reads EOF
    at once, not after ``linger_timeout``)."""

    async def send_eof(self) -> None:
        assert isinstance(self.inner, trio.abc.HalfCloseableStream)  # drainable() checked it
        await self.inner.send_eof()


def current_group() -> ConnectionGroup | None:
    """The ``ConnectionGroup`` that accepted the current connection task (None outside one).
    Protocols other than HTTP/1.1 await ``group.drain_started`` to finish gracefully (HTTP/2:
    GOAWAY, then let open streams end)."""
    return _GROUP.get()


def drainable(stream: trio.abc.Stream) -> trio.abc.Stream:
    """Wrap an HTTP/1.1 server stream so its listener's drain can close it while idle; the
    stream itself when the connection was not accepted by a ``ConnectionGroup``."""
    group = _GROUP.get()
    if group is None:
        return stream
    wrapped = (HalfCloseDrainStream(stream, group) if isinstance(stream, trio.abc.HalfCloseableStream)
               else DrainStream(stream, group))
    group.http1.add(wrapped)
    return wrapped


class ConnectionGroup:
    """The connections of one listener: accept, count, drain. ``serve`` is for ``nursery.start``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.draining = False
        self.active = 0
        self.http1: set[DrainStream] = set()
        self._accept = trio.CancelScope()
        self._empty = trio.Event()
        self.drain_started = trio.Event()

    async def serve(self, handler: Callable[[trio.SocketStream], Awaitable[Any]], host: str, port: int,
                    inherited: dict[int, socket.socket] | None = None, *,
                    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``host:port`` (or systemd's socket for ``port``) until ``stop_accepting``;
        then wait for this group's connections to end."""
        sock = (inherited or {}).pop(port, None)
        if sock is not None:
            listeners: list[Any] = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)

        async def track(stream: trio.SocketStream) -> None:
            self.active += 1
            _GROUP.set(self)
            try:
                await handler(stream)
            finally:
                self.active -= 1
                if self.draining and self.active == 0:
                    self._empty.set()

        async with trio.open_nursery() as conns:
            with self._accept:
                await trio.serve_listeners(track, listeners, handler_nursery=conns,
                                           task_status=task_status)

    async def drain(self, deadline: float) -> int:
        """Stop accepting, close idle HTTP/1.1 connections, wait for the others until ``deadline``
        (trio time). Returns how many connections were still open at the deadline."""
        self.draining = True
        self.drain_started.set()
        self._accept.cancel()
        for stream in list(self.http1):
            stream.close_if_idle()
        if self.active:
            with trio.move_on_at(deadline):
                await self._empty.wait()
        if self.active:
            log.warning("%s: %d connection(s) still open at the drain deadline", self.name, self.active)
        return self.active


def reload_plan(old: Bootstrap, new: Bootstrap) -> tuple[Bootstrap, list[str]]:
    """Bootstrap to run with after a reload, and the changed fields that need a restart.

    Fields in ``RELOADABLE`` are read at each use, so they take effect at once; every other
    change is left out of the result (the process keeps its old value) and named."""
    old_d, new_d = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
    changed = sorted(k for k in new_d if new_d[k] != old_d[k])
    apply = {k: new_d[k] for k in changed if k in RELOADABLE}
    merged = msgspec.structs.replace(old, **apply) if apply else old
    return merged, [k for k in changed if k not in RELOADABLE]


async def notify_ready(notifier: Notifier, has_config: Callable[[], bool], node: str) -> None:
    """READY=1 once the listeners are bound (the caller's job) and a first snapshot is applied
    (from meshd or the disk cache): systemd orders dependants after it (Type=notify)."""
    while not has_config():  # noqa: ASYNC110 - State has no swap event; 50 ms polls, start only
        await trio.sleep(READY_POLL)
    notifier.ready(f"{node}: serving")


def reload(path: str, current: Bootstrap, holders: Sequence[object], notifier: Notifier) -> Bootstrap:
    """SIGHUP: re-read the bootstrap at ``path``; reloadable changes go to every holder's
    ``boot``; the others are logged as needing a restart. A bad file keeps ``current``."""
    notifier.reloading()
    try:
        new = bootstrap.load(path)
    except ConfigError as exc:
        log.error("reload failed, keeping the running bootstrap: %s", exc)
        notifier.ready("reload failed; see the log")
        return current
    merged, restart = reload_plan(current, new)
    for holder in holders:
        if hasattr(holder, "boot"):
            holder.boot = merged  # type: ignore[attr-defined]
    applied = sorted(k for k in RELOADABLE if getattr(merged, k) != getattr(current, k))
    log.info("reloaded %s: applied %s", path, ", ".join(applied) or "nothing")
    if restart:
        log.warning("reload: %s changed but need a restart to apply", ", ".join(restart))
    notifier.ready(f"{merged.node}: reloaded")
    return merged


async def drain(boot: Bootstrap, notifier: Notifier, deregister: Callable[[], Awaitable[None]],
                inbound: ConnectionGroup, outbound: ConnectionGroup, socket_activated: bool) -> None:
    """SIGTERM: STOPPING=1; deregister and keep serving ``drain_seconds`` so peers move away
    (Envoy drain), unless systemd holds the inbound socket (then the endpoint outlives this
    process and the next one takes the queued connections); stop accepting and finish
    in-flight exchanges, inbound first (they may still call out through the outbound)."""
    notifier.stopping()
    if not socket_activated:
        await deregister()
        await trio.sleep(boot.drain_seconds)
    deadline = trio.current_time() + IN_FLIGHT_DEADLINE
    left = await inbound.drain(deadline) + await outbound.drain(deadline)
    log.info("drained%s", f" ({left} connection(s) cut at the deadline)" if left else "")
