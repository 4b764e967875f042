"""Per-cluster runtime state of one sidecar: load balancer, circuit breaker, outlier detector,
active health state — kept across snapshot swaps, keyed by cluster name.

``ClusterRuntimes.sync(applied, now)`` creates, updates or drops runtimes when a snapshot is
applied. ``ClusterRuntime.pick`` merges the health sources (registry presence, active health
checks, outlier ejection; Envoy panic threshold) and asks the ``EndpointPicker``. The pending
queue of the circuit breaker waits on ``released`` (a trio.Event re-armed on every release).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import trio

from meshd.snapshot.model import Cluster, Endpoint, OutlierDetection
from sidecar.core.balancer import EndpointPicker, Key, key
from sidecar.core.circuit import CircuitBreaker
from sidecar.core.health import HealthTracker, healthy_set
from sidecar.core.outlier import OutlierDetector
from sidecar.state import Applied

NO_OUTLIER = OutlierDetection(consecutive_5xx=0, consecutive_gateway_errors=0,
                              consecutive_local_origin_failures=0, min_health_percent=0.0)


class ClusterRuntime:
    def __init__(self, cluster: Cluster, local_labels: Mapping[str, str]) -> None:
        self.cluster = cluster
        self.picker = EndpointPicker(cluster, local_labels)
        self.breaker = CircuitBreaker(cluster.circuit_breakers, cluster.retry_budget)
        self.outlier = OutlierDetector(cluster.outlier or NO_OUTLIER)
        self.health = HealthTracker(cluster.health_check) if cluster.health_check else None
        self.endpoints: tuple[Endpoint, ...] = ()
        self.next_check: dict[Key, float] = {}
        self._released = trio.Event()

    def update(self, cluster: Cluster, endpoints: tuple[Endpoint, ...], now: float) -> None:
        self.cluster = cluster
        self.endpoints = endpoints
        self.picker.update(cluster, endpoints, now)
        self.breaker.update(cluster.circuit_breakers, cluster.retry_budget)
        self.outlier.update(cluster.outlier or NO_OUTLIER)
        keep = [key(e) for e in endpoints]
        self.outlier.forget(keep)
        if cluster.health_check is None:
            self.health = None
        elif self.health is None:
            self.health = HealthTracker(cluster.health_check)
        if self.health is not None:
            self.health.forget(keep)

    def usable(self, now: float) -> tuple[list[Endpoint], bool]:
        """Endpoints every health source accepts (or all of them in panic), and panic flag."""
        min_health = (self.cluster.outlier or NO_OUTLIER).min_health_percent
        return healthy_set(
            self.endpoints,
            hc_unhealthy=self.health.unhealthy() if self.health else frozenset(),
            ejected=self.outlier.ejected(now), min_health_percent=min_health)

    def pick(self, now: float, hash_key: int | None, exclude: Collection[Key]) -> Endpoint | None:
        usable, _ = self.usable(now)
        ep = self.picker.pick(usable, now=now, hash_key=hash_key, exclude=exclude)
        if ep is None and exclude:  # every endpoint tried: allow a repeat (Envoy does too)
            ep = self.picker.pick(usable, now=now, hash_key=hash_key)
        return ep

    def record(self, ep: Endpoint, now: float, *, status: int | None = None,
               local_failure: bool = False) -> None:
        if self.cluster.outlier is not None:
            self.outlier.record(key(ep), now=now, total_hosts=len(self.endpoints),
                                status=status, local_failure=local_failure)

    def release(self) -> None:
        """A request slot was freed: wake requests queued by the circuit breaker."""
        self._released.set()
        self._released = trio.Event()

    async def wait_released(self) -> None:
        await self._released.wait()


class ClusterRuntimes:
    def __init__(self, local_labels: Mapping[str, str]) -> None:
        self.local_labels = dict(local_labels)
        self._by_name: dict[str, ClusterRuntime] = {}

    def sync(self, applied: Applied, now: float) -> None:
        live = applied.clusters
        for name in list(self._by_name):
            if name not in live:
                del self._by_name[name]
        for name, cluster in live.items():
            rt = self._by_name.get(name)
            if rt is None:
                rt = self._by_name[name] = ClusterRuntime(cluster, self.local_labels)
            rt.update(cluster, applied.endpoints.get(name, ()), now)
            rt.release()  # new limits may admit queued requests

    def get(self, name: str) -> ClusterRuntime | None:
        return self._by_name.get(name)

    def all(self) -> list[ClusterRuntime]:
        return list(self._by_name.values())
