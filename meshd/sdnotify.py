"""The systemd notification protocol (``sd_notify(3)``), in the standard library only.

One ``AF_UNIX``/``SOCK_DGRAM`` datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` — a path,
or an abstract socket when it starts with ``@`` (the ``@`` becomes a NUL byte). The protocol is
stable (systemd.io/PORTABILITY_AND_STABILITY; ``man/notify-selfcontained-example.py``), so no
libsystemd: after the xz backdoor systemd itself recommends re-implementing it. Without
``NOTIFY_SOCKET`` (Docker, a shell) every call is a no-op, so one binary serves both.

Messages used by meshd and the sidecar::

    READY=1        listeners bound and the first configuration loaded (Type=notify)
    STATUS=...     one free-text line for ``systemctl status``
    WATCHDOG=1     keep-alive, every WatchdogSec/2 (``WATCHDOG_USEC``; ``WATCHDOG_PID`` must match)
    STOPPING=1     drain started (SIGTERM)
    RELOADING=1    SIGHUP reload started, with MONOTONIC_USEC (Type=notify-reload, systemd >= 253)

Errors: sending never raises (a vanished socket is logged once at debug level); ``Notifier``
reports whether the datagram was handed to the kernel.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("meshd.sdnotify")
WATCHDOG_FRACTION = 0.5  # ping at half of WatchdogSec, as sd_watchdog_enabled(3) advises


def socket_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as an ``AF_UNIX`` address: ``@name`` -> ``b"\\0name"``; ``None`` if unset
    or not a Unix socket (``vsock:`` addresses are not supported)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is armed for ``pid``.

    ``WATCHDOG_USEC`` is WatchdogSec in µs; ``WATCHDOG_PID``, when set, names the process meant
    (sd_watchdog_enabled(3)); the interval is ``WATCHDOG_FRACTION`` of it."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (wpid and wpid != str(pid)):
        return None
    return usec / 1e6 * WATCHDOG_FRACTION


class Notifier:
    """Sends notifications to the service manager named by ``env`` (default ``os.environ``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(env, os.getpid())
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``notify(READY=1, STATUS="up")``); True if sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            if not self._warned:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str = "draining") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by Type=notify-reload)."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    async def run_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every ``watchdog`` seconds forever; returns at once if none is
        armed. A blocked trio loop stops the pings, so systemd restarts the process."""
        if self.address is None or self.watchdog is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await trio.sleep(self.watchdog)
