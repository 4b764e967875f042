"""The mass-disappearance guard: withhold an update that empties a service too fast — pure code.

Precedent: Eureka's *self-preservation* (a server that suddenly misses most renewals stops
expiring instances, because a network or registry fault is likelier than a mass shutdown).
meshd applies the idea per (source, service) and with a time limit:

* An update that would remove more than ``max_removal_share`` of a service's applied instances
  at once, and at least ``min_removed`` of them, is **withheld**: the disappearing instances
  stay in the model; additions and changes to the remaining ones apply at once.
* A service vanishing from the source's view entirely counts as removing all its instances.
* The withheld removal is applied once it has **persisted** for ``hold`` seconds (each later
  update still removing too much keeps the clock running from the first one; an update that
  brings the instances back ends the episode).
* A single removal is never withheld (``min_removed = 2``): one container stopping or one
  lease expiring is ordinary churn and must leave at once (a Docker ``die`` event).

``withheld`` holds, per service, since when and how many instances are withheld; meshd shows it
in ``meshd services`` and logs each new episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.model import Instance

MAX_REMOVAL_SHARE = 0.5  # issue 6: "more than 50 % of a service's instances at once"
GUARD_HOLD = 30.0        # seconds; Eureka's renewal interval (one missed heartbeat round)
MIN_REMOVED = 2          # a single disappearance is churn, not a mass event


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    max_removal_share: float = MAX_REMOVAL_SHARE  # 0..1; 1.0 disables the guard
    hold: float = GUARD_HOLD                      # seconds
    min_removed: int = MIN_REMOVED


@dataclass(frozen=True, slots=True)
class Withheld:
    since: float     # when the removal was first withheld
    removed: int     # how many instances the source's view lacks
    of: int          # out of how many applied


@dataclass(slots=True)
class Guard:
    policy: GuardPolicy = field(default_factory=GuardPolicy)
    withheld: dict[str, Withheld] = field(default_factory=dict)

    def trips(self, old: int, removed: int) -> bool:
        p = self.policy
        return removed >= p.min_removed and removed > p.max_removal_share * old

    def admit(self, service: str, old: tuple[Instance, ...], new: tuple[Instance, ...],
              now: float) -> tuple[Instance, ...]:
        """The view of ``service`` to apply, given the applied ``old`` and proposed ``new``."""
        new_ids = {i.instance_id for i in new}
        kept = tuple(i for i in old if i.instance_id not in new_ids)
        if not kept or not self.trips(len(old), len(kept)):
            self.withheld.pop(service, None)
            return new
        episode = self.withheld.get(service)
        since = episode.since if episode else now
        if now - since >= self.policy.hold:
            self.withheld.pop(service, None)
            return new
        self.withheld[service] = Withheld(since, len(kept), len(old))
        return tuple(sorted(new + kept, key=lambda i: i.instance_id))
