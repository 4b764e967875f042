"""Load-balancer picks over a cluster's endpoints, as pure code (Envoy's three basic policies).

* ``round_robin`` — rotate through endpoints in order (Envoy ROUND_ROBIN, unweighted).
* ``least_request`` — power of two choices on in-flight requests (Envoy LEAST_REQUEST with
  ``choice_count = 2``, the default).
* ``random`` — uniform (Envoy RANDOM).

``Balancer.pick(endpoints, exclude)`` returns an endpoint not in ``exclude`` (used to retry a
connect failure elsewhere) or ``None`` when none is left. In-flight accounting is done by the
caller with ``started``/``finished``; counts are keyed by ``(address, port)`` so they survive a
snapshot change that keeps the endpoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from meshd.snapshot.model import Endpoint

Key = tuple[str, int]
LB_POLICIES = ("round_robin", "least_request", "random")


def key(ep: Endpoint) -> Key:
    return (ep.address, ep.port)


class Balancer:
    """Stateful picker for one cluster. Not thread-safe; one per cluster per sidecar."""

    def __init__(self, policy: str, rand: Callable[[int], int] | None = None) -> None:
        if policy not in LB_POLICIES:
            raise ValueError(f"unknown load balancer policy {policy!r}")
        self.policy = policy
        self._rr = 0
        self._in_flight: dict[Key, int] = {}
        self._rand = rand or (lambda n: random.randrange(n))

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Key] = ()) -> Endpoint | None:
        candidates = [e for e in endpoints if key(e) not in exclude] if exclude else endpoints
        if not candidates:
            return None
        n = len(candidates)
        if self.policy == "round_robin":
            self._rr = (self._rr + 1) % (1 << 30)
            return candidates[self._rr % n]
        if self.policy == "random" or n == 1:
            return candidates[self._rand(n)]
        a = candidates[self._rand(n)]
        b = candidates[self._rand(n)]
        return a if self.in_flight(a) <= self.in_flight(b) else b

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
