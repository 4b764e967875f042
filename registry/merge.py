"""Merge any number of discovery sources into one service model — pure code, caller's clock.

Each source (``registry.source.DiscoverySource``) reports full views; ``Merger`` keeps per
source:

* the **applied** view per service (what meshd routes to) and the last **proposed** view;
* **staleness**: ``error(source, msg)`` marks the whole source stale, ``error(source, msg,
  service)`` one service. An error never removes anything: the applied (last good) view stays
  until the source reports again. ``update`` clears the source's staleness and that of every
  service the update contains; a stale service the update *omits* keeps its last good instances
  until no error was reported for it for ``guard.hold`` seconds (then its omission counts as a
  removal, through the guard);
* the **mass-disappearance guard** (``registry.guard``): an update removing more than
  ``max_removal_share`` of a service's instances at once is withheld (the disappearing
  instances stay; additions and changes apply) until the removal has persisted ``hold`` seconds
  — Eureka's self-preservation idea, applied per service.

The merged view (``instances()``) is the union over sources in configuration order. The same
service name from several sources merges its instances. Two instances of one service at the
same ``address:port`` are one endpoint: the first source wins, and if their labels differ a
conflict is reported; the same ``instance_id`` at different addresses from two sources is kept
twice and reported (``conflicts()``).

Times are seconds from the caller's monotonic clock (``trio.current_time`` in meshd).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from registry.guard import Guard, GuardPolicy
from registry.model import Instance

Views = dict[str, tuple[Instance, ...]]
log = logging.getLogger("registry.merge")


@dataclass(frozen=True, slots=True)
class Conflict:
    """``kind``: "address" (same address:port, different labels) or "instance_id"."""

    kind: str
    service: str
    key: str  # "address:port" or the instance id
    sources: tuple[str, ...]
    detail: str


@dataclass(slots=True)
class Stale:
    since: float  # first error of this episode
    last: float   # latest error
    message: str


@dataclass(slots=True)
class SourceState:
    name: str
    applied: Views = field(default_factory=dict)
    proposed: Views = field(default_factory=dict)
    synced: bool = False            # at least one update received
    updated_at: float | None = None
    stale: Stale | None = None      # whole source
    stale_services: dict[str, Stale] = field(default_factory=dict)
    guard: Guard = field(default_factory=Guard)


def _by_service(instances: Iterable[Instance]) -> Views:
    out: dict[str, list[Instance]] = {}
    for inst in instances:
        out.setdefault(inst.service, []).append(inst)
    return {s: tuple(sorted(v, key=lambda i: i.instance_id)) for s, v in out.items()}


class Merger:
    """The merged model of all sources; every mutator returns True if ``instances()`` changed."""

    def __init__(self, sources: Sequence[str], policy: GuardPolicy | None = None) -> None:
        if len(set(sources)) != len(sources):
            raise ValueError(f"source names must be unique: {list(sources)}")
        self.policy = policy or GuardPolicy()
        self.sources: dict[str, SourceState] = {n: SourceState(n, guard=Guard(self.policy))
                                                for n in sources}
        self._merged: list[Instance] = []

    def _state(self, source: str) -> SourceState:
        try:
            return self.sources[source]
        except KeyError:
            raise KeyError(f"unknown source {source!r}") from None

    def update(self, source: str, instances: Sequence[Instance], now: float) -> bool:
        """A source's complete current view (``Instance.source`` is set to ``source``)."""
        st = self._state(source)
        fixed = [i if i.source == source else msgspec.structs.replace(i, source=source)
                 for i in instances]
        st.proposed = _by_service(fixed)
        st.synced, st.updated_at, st.stale = True, now, None
        for service in list(st.stale_services):
            if service in st.proposed:
                del st.stale_services[service]
        return self._reconcile(st, now)

    def error(self, source: str, message: str, now: float, service: str | None = None) -> None:
        """A failed read: mark stale, change nothing else."""
        st = self._state(source)
        if service is None:
            st.stale = Stale(st.stale.since if st.stale else now, now, message)
            return
        old = st.stale_services.get(service)
        st.stale_services[service] = Stale(old.since if old else now, now, message)

    def tick(self, now: float) -> bool:
        """Apply withheld removals whose hold elapsed and drop long-silent stale services."""
        changed = False
        for st in self.sources.values():
            if st.guard.withheld or st.stale_services:
                changed |= self._reconcile(st, now)
        return changed

    def _reconcile(self, st: SourceState, now: float) -> bool:
        applied: Views = {}
        for service in sorted(set(st.applied) | set(st.proposed)):
            old = st.applied.get(service, ())
            stale = st.stale_services.get(service)
            if service not in st.proposed and stale is not None:
                if now - stale.last < self.policy.hold:
                    if old:
                        applied[service] = old  # an error is never "zero instances"
                    continue
                del st.stale_services[service]
            new = st.guard.admit(service, old, st.proposed.get(service, ()), now)
            if new:
                applied[service] = new
        if applied == st.applied:
            return False
        st.applied = applied
        return self._remerge()

    def _remerge(self) -> bool:
        merged: dict[tuple[str, str, int], Instance] = {}
        for st in self.sources.values():
            for views in st.applied.values():
                for inst in views:
                    merged.setdefault((inst.service, inst.address, inst.port), inst)
        out = sorted(merged.values(), key=lambda i: (i.service, i.instance_id, i.source))
        if out == self._merged:
            return False
        self._merged = out
        return True

    def instances(self) -> list[Instance]:
        return list(self._merged)

    def conflicts(self) -> list[Conflict]:
        """Same address:port with different labels, or one instance_id at two addresses."""
        by_addr: dict[tuple[str, str, int], list[Instance]] = {}
        by_id: dict[tuple[str, str], list[Instance]] = {}
        for st in self.sources.values():
            for views in st.applied.values():
                for inst in views:
                    by_addr.setdefault((inst.service, inst.address, inst.port), []).append(inst)
                    by_id.setdefault((inst.service, inst.instance_id), []).append(inst)
        out = []
        for (service, address, port), insts in sorted(by_addr.items()):
            if len({msgspec.json.encode(i.labels, order="sorted") for i in insts}) > 1:
                out.append(Conflict("address", service, f"{address}:{port}",
                                    tuple(i.source for i in insts),
                                    f"labels differ; {insts[0].source} wins"))
        for (service, iid), insts in sorted(by_id.items()):
            if len({(i.address, i.port) for i in insts}) > 1:
                where = ", ".join(f"{i.source}={i.address}:{i.port}" for i in insts)
                out.append(Conflict("instance_id", service, iid,
                                    tuple(i.source for i in insts), f"different addresses: {where}"))
        return out


class Sink:
    """A ``SourceSink`` for one source of a ``Merger``: ``on_change()`` runs when the merged view
    changed; errors are logged once per stale episode (and on every message change)."""

    def __init__(self, merger: Merger, source: str, clock: Callable[[], float],
                 on_change: Callable[[], object] = lambda: None) -> None:
        merger._state(source)  # KeyError for an unknown source, at wiring time
        self.merger, self.source, self.clock, self.on_change = merger, source, clock, on_change

    def update(self, instances: Sequence[Instance]) -> None:
        st = self.merger.sources[self.source]
        was_stale, now = st.stale is not None, self.clock()
        if self.merger.update(self.source, instances, now):
            self.on_change()
        if was_stale:
            log.info("source %s recovered: %d instances", self.source, len(instances))
        for service, w in st.guard.withheld.items():
            if w.since == now:  # a new episode
                log.warning("source %s: removal of %d of %d instances of %s withheld since %.1f "
                            "(mass-disappearance guard)", self.source, w.removed, w.of, service, w.since)

    def error(self, message: str, service: str | None = None) -> None:
        st = self.merger.sources[self.source]
        old = st.stale if service is None else st.stale_services.get(service)
        self.merger.error(self.source, message, self.clock(), service)
        if old is None or old.message != message:
            log.warning("source %s%s stale (last good view kept): %s", self.source,
                        f" service {service}" if service else "", message)
