"""Per-connection abuse accounting for the HTTP/2 server. Pure: no trio, socket or ssl.

``ResetGuard`` is Envoy's premature-reset rule (CVE-2023-44487, HTTP/2 rapid reset): a stream
the client resets less than ``premature_seconds`` after opening it is *premature*; once at least
``min_streams`` streams have closed, a connection whose premature resets are ``>= ratio`` of its
closed streams is cut off (GOAWAY ENHANCE_YOUR_CALM + close). Envoy:
``ConnectionManagerImpl::maybeDrainDueToPrematureResets`` with
``premature_reset_total_stream_count`` 500 and ``premature_reset_min_stream_lifetime_seconds`` 1.

``RateGuard`` counts frames that make the server queue work without progress (PING and
SETTINGS, each answered with an ACK; CVE-2019-9512/9515) in a sliding one-second window.

Times are seconds on any monotonic clock, passed in by the caller.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class ResetGuard:
    """``opened(sid, now)``, ``closed(sid, now, reset_by_peer)``; ``tripped`` once the rule fires."""

    min_streams: int = 500
    ratio: float = 0.5
    premature_seconds: float = 1.0
    closed_streams: int = 0
    premature: int = 0
    tripped: bool = False
    _opened_at: dict[int, float] = field(default_factory=dict)

    def opened(self, sid: int, now: float) -> None:
        self._opened_at[sid] = now

    def closed(self, sid: int, now: float, *, reset_by_peer: bool) -> bool:
        """Account for a closed stream; returns ``tripped``. Unknown ids are ignored."""
        started = self._opened_at.pop(sid, None)
        if started is None:
            return self.tripped
        self.closed_streams += 1
        if reset_by_peer and now - started < self.premature_seconds:
            self.premature += 1
        if self.closed_streams >= self.min_streams and self.premature >= self.ratio * self.closed_streams:
            self.tripped = True
        return self.tripped

    @property
    def open_streams(self) -> int:
        return len(self._opened_at)


@dataclass
class RateGuard:
    """At most ``limit`` events in any window of ``window`` seconds; ``hit(now)`` is False once
    exceeded (and stays False: the connection is being closed)."""

    limit: int = 1000
    window: float = 1.0
    exceeded: bool = False
    _times: deque[float] = field(default_factory=deque)

    def hit(self, now: float, count: int = 1) -> bool:
        times = self._times
        while times and now - times[0] >= self.window:
            times.popleft()
        for _ in range(count):
            times.append(now)
        if len(times) > self.limit:
            self.exceeded = True
            times.clear()
        return not self.exceeded
