"""Load-balancing decisions for one cluster in one sidecar, as pure code (Envoy's LB policies).

``EndpointPicker(cluster, local_labels, rand)``; ``update(cluster, endpoints, now)`` on every
snapshot; ``pick(usable, now=…, hash_key=…, exclude=…)`` per attempt; ``started``/``finished``
around each request. ``usable`` is the caller's list of endpoints fit for traffic (health and
outlier ejection already applied, or every endpoint in panic mode); ``exclude`` holds the
``(address, port)`` keys already tried by this request. ``now`` is monotonic seconds and
``rand`` returns floats in [0, 1): no clock or entropy is read here.

A pick goes through, in order:

1. Locality (``cluster.locality`` set): Envoy priority load over P0/P1/P2 (``locality.py``),
   with level health measured over the endpoints of the last ``update`` (healthy = in
   ``usable``); the pick is then made among the candidates of the chosen level (if a retry has
   excluded all of them, among the best-ranked level that has candidates left).
2. ``ring_hash``/``maglev`` (``hashing.py``): consistent pick for ``hash_key``; the ring/table
   is rebuilt only when the endpoint set or the policy changes, and unusable hosts are skipped.
   No ``hash_key`` -> a random hash, as Envoy does.
3. ``round_robin`` (Envoy ROUND_ROBIN), ``least_request`` (Envoy LEAST_REQUEST, power of two
   choices on in-flight requests, ``choice_count = 2``) and ``random`` (Envoy RANDOM), with
   Envoy ``slow_start_config`` weights (aggression 1.0, min_weight_percent 10): an endpoint
   first seen ``age`` seconds ago weighs ``max(0.1, max(age, 1 s) / slow_start)`` until the
   window ends. With unequal weights round robin is smooth weighted round robin (nginx; same
   long-run shares as Envoy's EDF schedule, O(n) per pick) and least request is the same
   schedule over ``weight / (in_flight + 1)`` (Envoy's ``active_request_bias`` 1.0). Envoy
   applies slow start to RR and LR only; here ``random`` is weighted too.

``pick`` returns an endpoint of ``usable`` not in ``exclude``, and ``None`` only when there is
none. In-flight counts and first-seen times are keyed by ``(address, port)`` so they survive
snapshots that keep the endpoint; an endpoint that leaves and comes back starts slow start anew.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence

from meshd.snapshot.model import Cluster, Endpoint, Locality
from sidecar.core.hashing import HashRing, MaglevTable
from sidecar.core.locality import choose_level, locality_rank, priority_levels

Key = tuple[str, int]
HASH_POLICIES = ("ring_hash", "maglev")
LB_POLICIES = ("round_robin", "least_request", "random", *HASH_POLICIES)
DEFAULT_MIN_RING_SIZE = 1024        # Envoy ring_hash minimum_ring_size default
MIN_WEIGHT_PERCENT = 10.0           # Envoy slow_start_config.min_weight_percent default
SLOW_START_AGGRESSION = 1.0         # Envoy slow_start_config.aggression default (linear)
MIN_TIME_FACTOR_SECONDS = 1.0       # Envoy: TimeFactor = max(TimeSinceStart, 1 s) / window
ACTIVE_REQUEST_BIAS = 1.0           # Envoy least_request active_request_bias default
_HASH_SPACE = 1 << 64


def key(ep: Endpoint) -> Key:
    return (ep.address, ep.port)


def slow_start_weight(age: float, window: float | None) -> float:
    """Weight factor in (0, 1] for an endpoint first seen ``age`` seconds ago."""
    if not window or window <= 0 or age >= window:
        return 1.0
    time_factor = max(age, MIN_TIME_FACTOR_SECONDS) / window
    return min(1.0, max(MIN_WEIGHT_PERCENT / 100, time_factor ** (1 / SLOW_START_AGGRESSION)))


def _check_policy(policy: str) -> None:
    if policy not in LB_POLICIES:
        raise ValueError(f"unknown load balancer policy {policy!r}")


class EndpointPicker:
    """All load-balancing decisions for one cluster in one sidecar. Not thread-safe."""

    def __init__(self, cluster: Cluster, local_labels: Mapping[str, str],
                 rand: Callable[[], float] | None = None) -> None:
        _check_policy(cluster.lb_policy)
        self.cluster = cluster
        self._local = dict(local_labels)
        self._rand = rand or random.random
        self._in_flight: dict[Key, int] = {}
        self._first_seen: dict[Key, float] = {}
        self._levels: list[list[Endpoint]] = []
        self._ranks: list[int] = []          # locality rank of each level in ``_levels``
        self._hasher: HashRing | MaglevTable | None = None
        self._hasher_sig: tuple[object, ...] | None = None
        self._rr = 0
        self._current: dict[Key, float] = {}  # smooth weighted round robin state

    @property
    def policy(self) -> str:
        return self.cluster.lb_policy

    def update(self, cluster: Cluster, endpoints: Sequence[Endpoint], now: float) -> None:
        """Take a new snapshot's cluster and endpoints; ``now`` dates newly seen endpoints."""
        _check_policy(cluster.lb_policy)
        if cluster.lb_policy != self.cluster.lb_policy:
            self._rr, self._current = 0, {}
        self.cluster = cluster
        keys = {key(e) for e in endpoints}
        self._first_seen = {k: self._first_seen.get(k, now) for k in keys}
        self._current = {k: v for k, v in self._current.items() if k in keys}
        self._levels, self._ranks = [], []
        if cluster.locality is not None:
            self._levels = priority_levels(endpoints, self._local, cluster.locality)
            self._ranks = [locality_rank(lv[0], self._local, cluster.locality) for lv in self._levels]
        self._rebuild_hasher(cluster, endpoints, keys)

    def _rebuild_hasher(self, cluster: Cluster, endpoints: Sequence[Endpoint], keys: set[Key]) -> None:
        if cluster.lb_policy not in HASH_POLICIES:
            self._hasher, self._hasher_sig = None, None
            return
        ring_size = cluster.hash_policy.ring_size if cluster.hash_policy else DEFAULT_MIN_RING_SIZE
        sig = (cluster.lb_policy, ring_size, tuple(sorted(keys)))
        if sig == self._hasher_sig:
            return
        self._hasher_sig = sig
        if cluster.lb_policy == "ring_hash":
            self._hasher = HashRing(endpoints, ring_size)
        else:
            self._hasher = MaglevTable(endpoints)

    def pick(self, usable: Sequence[Endpoint], *, now: float, hash_key: int | None = None,
             exclude: Collection[Key] = ()) -> Endpoint | None:
        """An endpoint of ``usable`` whose key is not in ``exclude``; None if there is none."""
        candidates = [e for e in usable if key(e) not in exclude] if exclude else list(usable)
        if not candidates:
            return None
        if self._levels and self.cluster.locality is not None:
            candidates = self._in_chosen_level(usable, candidates, self.cluster.locality)
        policy = self.cluster.lb_policy
        if policy in HASH_POLICIES:
            return self._pick_hashed(candidates, hash_key)
        weights = self._weights(candidates, now)
        if policy == "round_robin":
            return self._round_robin(candidates, weights)
        if policy == "least_request":
            return self._least_request(candidates, weights)
        return self._random(candidates, weights)

    def _in_chosen_level(self, usable: Sequence[Endpoint], candidates: list[Endpoint],
                         locality: Locality) -> list[Endpoint]:
        healthy = {key(e) for e in usable}
        level = choose_level(self._levels, lambda e: key(e) in healthy, self._rand())
        ranks = [locality_rank(e, self._local, locality) for e in candidates]
        rank = self._ranks[level] if self._ranks[level] in ranks else min(ranks)
        return [e for e, r in zip(candidates, ranks, strict=True) if r == rank]

    def _pick_hashed(self, candidates: list[Endpoint], hash_key: int | None) -> Endpoint:
        by_key = {key(e): e for e in candidates}
        h = hash_key if hash_key is not None else int(self._rand() * _HASH_SPACE)
        hit = self._hasher.pick(h, lambda e: key(e) in by_key) if self._hasher else None
        if hit is None:  # no candidate is in the ring/table (not in the last update)
            return candidates[self._index(len(candidates))]
        return by_key[key(hit)]

    def _weights(self, candidates: list[Endpoint], now: float) -> list[float] | None:
        """Slow-start weight per candidate, or None when they are all equal (unweighted path)."""
        window = self.cluster.slow_start
        if not window:
            return None
        seen = self._first_seen
        weights = [slow_start_weight(now - seen[k], window) if (k := key(e)) in seen else 1.0
                   for e in candidates]
        return None if min(weights) == max(weights) else weights

    def _index(self, n: int) -> int:
        return min(n - 1, int(self._rand() * n))

    def _round_robin(self, candidates: list[Endpoint], weights: list[float] | None) -> Endpoint:
        if weights is not None:
            return self._smooth(candidates, weights)
        if self._current:
            self._current.clear()
        self._rr = (self._rr + 1) % (1 << 30)
        return candidates[self._rr % len(candidates)]

    def _least_request(self, candidates: list[Endpoint], weights: list[float] | None) -> Endpoint:
        n = len(candidates)
        if weights is not None:  # Envoy: unequal weights -> schedule on weight / (active + 1)^bias
            load = [w / (self.in_flight(e) + 1) ** ACTIVE_REQUEST_BIAS
                    for e, w in zip(candidates, weights, strict=True)]
            return self._smooth(candidates, load)
        if n == 1:
            return candidates[0]
        a = candidates[self._index(n)]
        b = candidates[self._index(n)]
        return a if self.in_flight(a) <= self.in_flight(b) else b

    def _random(self, candidates: list[Endpoint], weights: list[float] | None) -> Endpoint:
        if weights is None:
            return candidates[self._index(len(candidates))]
        point = self._rand() * sum(weights)
        for ep, w in zip(candidates, weights, strict=True):
            point -= w
            if point < 0:
                return ep
        return candidates[-1]

    def _smooth(self, candidates: list[Endpoint], weights: list[float]) -> Endpoint:
        """Smooth weighted round robin: each candidate gains its weight, the leader pays the total."""
        current = self._current
        total, best, best_score = 0.0, candidates[0], float("-inf")
        for ep, w in zip(candidates, weights, strict=True):
            k = key(ep)
            score = current[k] = current.get(k, 0.0) + w
            total += w
            if score > best_score:
                best, best_score = ep, score
        current[key(best)] -= total
        return best

    def in_flight(self, ep: Endpoint) -> int:
        return self._in_flight.get(key(ep), 0)

    def started(self, ep: Endpoint) -> None:
        k = key(ep)
        self._in_flight[k] = self._in_flight.get(k, 0) + 1

    def finished(self, ep: Endpoint) -> None:
        k = key(ep)
        left = self._in_flight.get(k, 0) - 1
        if left > 0:
            self._in_flight[k] = left
        else:
            self._in_flight.pop(k, None)


class Balancer:
    """The earlier per-cluster API, kept for the current outbound: ``pick(endpoints, exclude)``
    over ``EndpointPicker`` with no locality, no slow start and no request hash (ring_hash and
    maglev pick from a random hash). ``rand(n)`` returns an int in [0, n)."""

    _SCALE = 1 << 53

    def __init__(self, policy: str, rand: Callable[[int], int] | None = None) -> None:
        _check_policy(policy)
        self.policy = policy
        unit = None if rand is None else (lambda: rand(self._SCALE) / self._SCALE)
        self._picker = EndpointPicker(Cluster(name="", host="", subset="", lb_policy=policy), {}, unit)
        self._seen: Sequence[Endpoint] | None = None

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Key] = ()) -> Endpoint | None:
        if self.policy in HASH_POLICIES and endpoints is not self._seen:
            self._seen = endpoints
            self._picker.update(self._picker.cluster, endpoints, 0.0)
        return self._picker.pick(endpoints, now=0.0, exclude=exclude)

    def in_flight(self, ep: Endpoint) -> int:
        return self._picker.in_flight(ep)

    def started(self, ep: Endpoint) -> None:
        self._picker.started(ep)

    def finished(self, ep: Endpoint) -> None:
        self._picker.finished(ep)
