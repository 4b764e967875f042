"""Active health-check state and the usable-endpoint set, as pure code.

``HealthTracker`` follows Envoy's ``HealthCheckerImplBase`` thresholds: a healthy host turns
unhealthy after ``unhealthy_threshold`` consecutive failed checks, an unhealthy host turns healthy
after ``healthy_threshold`` consecutive passed checks; a result of the other kind resets the run.
Unlike Envoy (which holds new hosts back until a first check passes), hosts start healthy: the
registry already vouched for them, and a fresh sidecar must not black-hole its cluster.
Thresholds below 1 are read as 1.

``healthy_set`` merges the three sources of health — registry (the snapshot's endpoints are the
registry-healthy ones), active checks, outlier ejection — so that an endpoint is used only if every
source says healthy, with Envoy's panic threshold (``healthy_panic_threshold``, Istio
``minHealthPercent``) as the safety net.

The caller runs the checks (trio) and passes outcomes in; ``next_check_delay`` gives the sleep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from meshd.snapshot.model import Endpoint, HealthCheck
from sidecar.core.balancer import Key, key


@dataclass(frozen=True, slots=True)
class HealthStats:
    tracked: int  # hosts with any recorded check state
    unhealthy: int


@dataclass(slots=True)
class _State:
    healthy: bool = True
    successes: int = 0  # consecutive passes while unhealthy
    failures: int = 0  # consecutive failures while healthy


class HealthTracker:
    """Per-endpoint active health state of one cluster. Not thread-safe."""

    def __init__(self, config: HealthCheck) -> None:
        self._config = config
        self._hosts: dict[Key, _State] = {}

    def update(self, config: HealthCheck) -> None:
        """New snapshot: states and running counts are kept; new thresholds apply from now on."""
        self._config = config

    def observe(self, key: Key, ok: bool) -> bool:
        """Record one check result of ``key``; True if the host's health flipped."""
        st = self._hosts.get(key)
        if st is None:
            st = self._hosts[key] = _State()
        if st.healthy:
            if ok:
                st.failures = 0
                return False
            st.failures += 1
            if st.failures < max(1, self._config.unhealthy_threshold):
                return False
        else:
            if not ok:
                st.successes = 0
                return False
            st.successes += 1
            if st.successes < max(1, self._config.healthy_threshold):
                return False
        st.healthy = not st.healthy
        st.successes = st.failures = 0
        return True

    def healthy(self, key: Key) -> bool:
        """True for hosts never checked (see module docstring)."""
        st = self._hosts.get(key)
        return st is None or st.healthy

    def unhealthy(self) -> frozenset[Key]:
        return frozenset(k for k, st in self._hosts.items() if not st.healthy)

    def forget(self, keep: Collection[Key]) -> None:
        """Drop the state of hosts not in ``keep`` (endpoints gone from the cluster)."""
        keep = set(keep)
        self._hosts = {k: st for k, st in self._hosts.items() if k in keep}

    def statistics(self) -> HealthStats:
        unhealthy = sum(not st.healthy for st in self._hosts.values())
        return HealthStats(tracked=len(self._hosts), unhealthy=unhealthy)


def next_check_delay(config: HealthCheck, draw: Callable[[float], float]) -> float:
    """Seconds until the next check: ``interval + draw(jitter)`` (Envoy ``interval_jitter``).

    ``draw(upper)`` must return a float in ``[0, upper)``; out-of-range draws are clamped.
    With ``jitter <= 0`` the draw is not called and the result is ``interval``.
    """
    if config.jitter <= 0.0:
        return config.interval
    extra = min(max(draw(config.jitter), 0.0), math.nextafter(config.jitter, 0.0))
    return config.interval + extra


def healthy_set(
    endpoints: Sequence[Endpoint],
    *,
    hc_unhealthy: Collection[Key],
    ejected: Collection[Key],
    min_health_percent: float,
) -> tuple[list[Endpoint], bool]:
    """The endpoints to balance over, and whether the cluster is in panic.

    Usable = not failing active checks and not ejected by outlier detection, order kept.
    Panic (Envoy ``healthy_panic_threshold``): when ``100 * usable / total < min_health_percent``,
    or when no endpoint is usable at all, return ``(all endpoints, True)`` so load is spread
    over every endpoint rather than crushing the few healthy ones or failing with 503 UH.
    ``([], False)`` when ``endpoints`` is empty.
    """
    if not endpoints:
        return [], False
    usable = [e for e in endpoints if key(e) not in hc_unhealthy and key(e) not in ejected]
    if not usable or 100.0 * len(usable) / len(endpoints) < min_health_percent:
        return list(endpoints), True
    return usable, False
