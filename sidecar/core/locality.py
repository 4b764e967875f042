"""Locality-weighted priority failover, as pure code (Envoy priority levels + priority load).

Priorities are derived from labels, the way Istio's ``localityLbSetting`` failover derives them
from region/zone (Istio sets Envoy endpoint priorities; Envoy balances across them):

* P0 — same region and same zone as the calling sidecar;
* P1 — same region, another zone;
* P2 — another region.

A label missing on either side compares as ``""`` (Istio treats an unset locality part as the
empty string), so a sidecar without locality labels sees unlabelled endpoints as local.
Empty levels are dropped, so level indexes are dense.

Priority load (Envoy ``load_balancing/priority``): each level's health is
``min(100, OVERPROVISIONING_FACTOR * 100 * healthy / total)`` in integer percent; the sum is
capped at 100 (the "normalized total health"); level by level, P gets
``min(remaining, health(P) * 100 / normalized_total)``. So a level keeps all its traffic until
fewer than 1/1.4 ≈ 71 % of its endpoints are healthy, and the missing percentage spills to the
next level. When no level has a healthy endpoint, all load goes to P0 (Envoy; the caller is in
panic mode then and passes every endpoint as usable). Rounding leftovers go to the first level
with non-zero health, as in Envoy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from meshd.snapshot.model import Endpoint, Locality

OVERPROVISIONING_FACTOR = 1.4  # Envoy default (overprovisioning_factor 140)
_OVERPROVISIONING_PERCENT = round(OVERPROVISIONING_FACTOR * 100)
LEVELS = 3                     # P0 same zone, P1 same region, P2 elsewhere


def locality_rank(ep: Endpoint, local: Mapping[str, str], locality: Locality) -> int:
    """0 same region+zone, 1 same region other zone, 2 other region."""
    if ep.labels.get(locality.region_label, "") != local.get(locality.region_label, ""):
        return 2
    if ep.labels.get(locality.zone_label, "") != local.get(locality.zone_label, ""):
        return 1
    return 0


def priority_levels(endpoints: Iterable[Endpoint], local: Mapping[str, str],
                    locality: Locality) -> list[list[Endpoint]]:
    """Endpoints grouped P0, P1, P2 (input order kept within a level); empty levels dropped."""
    levels: list[list[Endpoint]] = [[] for _ in range(LEVELS)]
    for ep in endpoints:
        levels[locality_rank(ep, local, locality)].append(ep)
    return [level for level in levels if level]


def level_health(level: Sequence[Endpoint], healthy: Callable[[Endpoint], bool]) -> int:
    """Envoy per-priority health in percent: ``min(100, 140 * healthy // total)``."""
    if not level:
        return 0
    up = sum(1 for ep in level if healthy(ep))
    return min(100, _OVERPROVISIONING_PERCENT * up // len(level))


def priority_load(levels: Sequence[Sequence[Endpoint]],
                  healthy: Callable[[Endpoint], bool]) -> list[int]:
    """Percent of traffic per level; sums to 100 (empty list for no levels)."""
    if not levels:
        return []
    health = [level_health(level, healthy) for level in levels]
    total = min(100, sum(health))
    if total == 0:
        return [100] + [0] * (len(levels) - 1)
    load: list[int] = []
    remaining = 100
    for h in health:
        share = min(remaining, h * 100 // total)
        load.append(share)
        remaining -= share
    if remaining:
        first = next(i for i, h in enumerate(health) if h > 0)
        load[first] += remaining
    return load


def choose_level(levels: list[list[Endpoint]], healthy: Callable[[Endpoint], bool],
                 draw: float) -> int:
    """Index into ``levels`` for one request; ``draw`` uniform in [0, 1).

    The level whose cumulative load range contains ``draw * 100`` (Envoy draws an integer
    0..99 the same way). Raises ValueError for an empty ``levels``.
    """
    if not levels:
        raise ValueError("no priority levels")
    point = draw * 100
    cumulative = 0
    load = priority_load(levels, healthy)
    for i, share in enumerate(load):
        cumulative += share
        if point < cumulative:
            return i
    return max(i for i, share in enumerate(load) if share > 0)
