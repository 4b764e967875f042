"""Outlier detection (passive health) as pure code: Envoy ``outlier_detection`` consecutive detectors.

One ``OutlierDetector`` per cluster per sidecar, keyed by endpoint ``(address, port)``. The
caller reports every upstream outcome with ``record`` and calls ``sweep`` every
``config.interval`` seconds (more often is harmless); times are monotonic seconds passed in.

Detectors (Envoy ``DetectorHostMonitorImpl`` with ``split_external_local_origin_errors: true``):

* ``consecutive_5xx`` — responses with status 500-599 in a row; any other status resets it.
* ``consecutive_gateway_errors`` — 502/503/504 in a row; another 5xx or a success resets it.
* ``consecutive_local_origin_failures`` — connect failures/resets/timeouts in a row; any
  response from the host (whatever its status) resets it, and local failures never count
  as 5xx.

A threshold of 0 disables that detector. A detector firing resets its counter (Envoy
``onConsecutiveErrorWorker``), then the host is ejected unless ``max_ejection_percent`` forbids
it: refused when ``100 * (ejected + 1) / total_hosts > max_ejection_percent`` unless no host is
ejected yet (Envoy ``always_eject_one_host: true``: at least one host may always be ejected).

Ejection time (Envoy ``ejectTimeBackoff``): ``min(base_ejection_time * times_ejected, cap)`` with
``cap = max(MAX_EJECTION_TIME, base_ejection_time)``. ``times_ejected`` grows at each ejection
(while below ``cap / base + 1``) and shrinks by one at each interval sweep that finds the host
un-ejected for at least ``interval`` seconds. Un-ejection resets all counters.

An ejection ends exactly at its deadline: ``is_ejected``/``ejected`` compare with ``now``, and any
call with a later ``now`` releases the host; ``sweep`` reports every host released since the
previous sweep. Outcomes recorded while a host is ejected (requests in flight) are ignored.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from meshd.snapshot.model import OutlierDetection
from sidecar.core.balancer import Key

MAX_EJECTION_TIME = 300.0  # Envoy max_ejection_time default (seconds)
GATEWAY_ERRORS = frozenset({502, 503, 504})  # Envoy Http::CodeUtility::isGatewayError

EjectionKind = Literal["consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure"]
EJECTION_KINDS: tuple[EjectionKind, ...] = (
    "consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure")


@dataclass(frozen=True, slots=True)
class OutlierStats:
    """Envoy ``outlier_detection.*`` stats: ``ejections_enforced_total``, ``ejections_active``,
    ``ejections_overflow`` and ``ejections_enforced_<kind>`` (``by_kind``)."""

    ejections_total: int
    currently_ejected: int
    ejections_overflow: int
    by_kind: dict[str, int]


@dataclass(slots=True)
class _Host:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    times_ejected: int = 0  # Envoy ejectTimeBackoff
    last_unejected: float | None = None

    def reset_counters(self) -> None:
        self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0


def _reached(count: int, threshold: int) -> bool:
    return threshold > 0 and count >= threshold


class OutlierDetector:
    """Consecutive-failure ejection for one cluster. Not thread-safe."""

    def __init__(self, config: OutlierDetection) -> None:
        self._config = config
        self._hosts: dict[Key, _Host] = {}
        self._ejected: dict[Key, float] = {}  # key -> end of ejection (monotonic seconds)
        self._released: list[Key] = []  # un-ejected since the last sweep
        self._next_decay: float | None = None
        self._by_kind: dict[str, int] = dict.fromkeys(EJECTION_KINDS, 0)
        self._overflow = 0

    def update(self, config: OutlierDetection) -> None:
        """New snapshot: counters, multipliers and running ejections are kept."""
        self._config = config

    def record(
        self,
        key: Key,
        *,
        now: float,
        total_hosts: int,
        status: int | None = None,
        local_failure: bool = False,
    ) -> bool:
        """Count one outcome of ``key``; True if this call ejected the host.

        Pass exactly one of ``status`` (the upstream's HTTP status) or ``local_failure=True``
        (connect failure, reset or timeout); ValueError otherwise. ``total_hosts`` is the number
        of endpoints in the cluster (values below 1 are read as 1).
        """
        if (status is None) == (not local_failure):
            raise ValueError("pass exactly one of status= or local_failure=True")
        self._expire(now)
        if key in self._ejected:
            return False
        host = self._hosts.setdefault(key, _Host())
        if status is None:
            host.consecutive_local += 1
            kind: EjectionKind | None = None
            if _reached(host.consecutive_local, self._config.consecutive_local_origin_failures):
                host.consecutive_local = 0
                kind = "consecutive_local_origin_failure"
        else:
            kind = self._count_status(host, status)
        return kind is not None and self._eject(key, host, kind, now, total_hosts)

    def _count_status(self, host: _Host, status: int) -> EjectionKind | None:
        cfg = self._config
        host.consecutive_local = 0  # a response proves the connection worked
        if not 500 <= status <= 599:
            host.consecutive_5xx = host.consecutive_gateway = 0
            return None
        host.consecutive_gateway = host.consecutive_gateway + 1 if status in GATEWAY_ERRORS else 0
        host.consecutive_5xx += 1
        kind: EjectionKind | None = None
        if _reached(host.consecutive_5xx, cfg.consecutive_5xx):
            host.consecutive_5xx = 0
            kind = "consecutive_5xx"
        if _reached(host.consecutive_gateway, cfg.consecutive_gateway_errors):
            host.consecutive_gateway = 0
            kind = "consecutive_gateway_failure"  # Envoy checks the gateway detector first
        return kind

    def _eject(self, key: Key, host: _Host, kind: EjectionKind, now: float, total_hosts: int) -> bool:
        cfg = self._config
        active = len(self._ejected)
        max_percent = min(100.0, cfg.max_ejection_percent)
        if active > 0 and 100.0 * (active + 1) / max(total_hosts, 1) > max_percent:
            self._overflow += 1
            return False
        base = cfg.base_ejection_time
        cap = max(MAX_EJECTION_TIME, base)
        if host.times_ejected == 0 or (base > 0 and host.times_ejected * base < cap + base):
            host.times_ejected += 1
        self._ejected[key] = now + min(base * host.times_ejected, cap)
        host.reset_counters()
        self._by_kind[kind] += 1
        return True

    def _expire(self, now: float) -> None:
        due = [k for k, until in self._ejected.items() if until <= now]
        for k in due:
            del self._ejected[k]
            host = self._hosts.get(k)
            if host is not None:
                host.reset_counters()
                host.last_unejected = now
            self._released.append(k)

    def sweep(self, now: float) -> list[Key]:
        """Release hosts whose ejection has ended and, once per ``interval``, shrink the ejection
        multiplier of hosts healthy for at least ``interval``. Returns the keys released since
        the previous sweep, in release order."""
        self._expire(now)
        if self._next_decay is None or now >= self._next_decay:
            self._next_decay = now + self._config.interval
            self._decay(now)
        released, self._released = self._released, []
        return released

    def _decay(self, now: float) -> None:
        for k, host in self._hosts.items():
            if k in self._ejected or host.times_ejected == 0 or host.last_unejected is None:
                continue
            if now - host.last_unejected >= self._config.interval:
                host.times_ejected -= 1

    def is_ejected(self, key: Key, now: float) -> bool:
        until = self._ejected.get(key)
        return until is not None and until > now

    def ejected(self, now: float) -> frozenset[Key]:
        return frozenset(k for k, until in self._ejected.items() if until > now)

    def times_ejected(self, key: Key) -> int:
        """The host's current ejection multiplier (0 for a host never ejected)."""
        host = self._hosts.get(key)
        return host.times_ejected if host is not None else 0

    def forget(self, keep: Collection[Key]) -> None:
        """Drop every state of hosts not in ``keep`` (endpoints gone from the cluster)."""
        keep = set(keep)
        self._hosts = {k: h for k, h in self._hosts.items() if k in keep}
        self._ejected = {k: u for k, u in self._ejected.items() if k in keep}
        self._released = [k for k in self._released if k in keep]

    def statistics(self) -> OutlierStats:
        return OutlierStats(
            ejections_total=sum(self._by_kind.values()),
            currently_ejected=len(self._ejected),
            ejections_overflow=self._overflow,
            by_kind=dict(self._by_kind),
        )
