"""registry.merge / registry.guard: merging, last known good, staleness, the guard (Hypothesis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.guard import GuardPolicy
from registry.merge import Merger
from registry.model import Instance

SOURCES = ("consul", "docker", "etcd")


def inst(service: str, n: int, source: str = "", port: int = 8000, **labels: str) -> Instance:
    return Instance(service=service, instance_id=f"{service}-{n}", address=f"10.0.0.{n}",
                    port=port, labels=labels, source=source or "builtin")


views = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 7)), max_size=10).map(
    lambda pairs: [inst(s, n) for s, n in sorted(set(pairs))])
steps = st.lists(st.one_of(
    st.tuples(st.just("update"), st.sampled_from(SOURCES), views),
    st.tuples(st.just("error"), st.sampled_from(SOURCES), st.sampled_from([None, "a", "b"])),
    st.tuples(st.just("tick"), st.none(), st.none()),
), max_size=25)


def _per(m: Merger, source: str) -> dict[str, set[str]]:
    return {s: {i.instance_id for i in v} for s, v in m.sources[source].applied.items()}


@settings(max_examples=300, deadline=None)
@given(steps, st.floats(0.1, 0.9))
def test_errors_never_remove_and_guard_bounds_each_step(script, share) -> None:
    policy = GuardPolicy(max_removal_share=share, hold=5.0)
    m = Merger(SOURCES, policy)
    now = 0.0
    for op, source, arg in script:
        now += 1.0
        before = {s: _per(m, s) for s in SOURCES}
        held = {(s, svc): w.since for s in SOURCES for svc, w in m.sources[s].guard.withheld.items()}
        merged_before = m.instances()
        if op == "error":
            m.error(source, "boom", now, service=arg)
            assert m.instances() == merged_before  # an error changes nothing
            continue
        m.update(source, arg, now) if op == "update" else m.tick(now)
        for s in SOURCES:
            for service, ids in before[s].items():
                left = _per(m, s).get(service, set())
                removed = len(ids - left)
                # at most the allowed share at once, unless that removal was withheld `hold` s
                allowed = max(policy.min_removed - 1, math.floor(share * len(ids)))
                if removed > allowed:
                    assert now - held[(s, service)] >= policy.hold
    # merged view: one instance per (service, address, port), from the applied views only
    keys = [(i.service, i.address, i.port) for i in m.instances()]
    assert len(keys) == len(set(keys))
    applied = {(i.service, i.address, i.port) for s in SOURCES
               for v in m.sources[s].applied.values() for i in v}
    assert set(keys) == applied


@settings(max_examples=200, deadline=None)
@given(views, views)
def test_persistent_view_is_applied_after_hold(first, second) -> None:
    m = Merger(["docker"], GuardPolicy(hold=30.0))
    m.update("docker", first, 0.0)
    assert {i.instance_id for i in m.instances()} == {i.instance_id for i in first}
    m.update("docker", second, 1.0)
    m.tick(31.0)
    assert {i.instance_id for i in m.instances()} == {i.instance_id for i in second}
    assert not m.sources["docker"].guard.withheld


def test_mass_disappearance_withheld_then_applied_and_reported() -> None:
    m = Merger(["etcd"])
    m.update("etcd", [inst("a", n) for n in range(4)], 0.0)
    assert not m.update("etcd", [inst("a", 0)], 1.0)  # 3 of 4 gone: withheld
    assert len(m.instances()) == 4
    w = m.sources["etcd"].guard.withheld["a"]
    assert (w.since, w.removed, w.of) == (1.0, 3, 4)
    assert m.update("etcd", [inst("a", 0), inst("a", 9)], 5.0)  # additions apply at once
    assert len(m.instances()) == 5
    assert not m.tick(30.0)
    assert m.tick(31.0)  # persisted 30 s since the first withheld update
    assert {i.instance_id for i in m.instances()} == {"a-0", "a-9"}


def test_service_gone_entirely_counts_single_removal_passes() -> None:
    m = Merger(["docker"])
    m.update("docker", [inst("a", 1), inst("a", 2), inst("b", 1)], 0.0)
    m.update("docker", [inst("a", 1), inst("a", 2)], 0.5)  # b: 1 of 1, a single removal
    assert {i.service for i in m.instances()} == {"a"}
    m.update("docker", [], 1.0)  # a vanishes: 2 of 2 withheld
    assert len(m.instances()) == 2
    m.update("docker", [inst("a", 1), inst("a", 2)], 2.0)  # back: the episode ends
    assert not m.sources["docker"].guard.withheld


def test_staleness_keeps_last_good_and_clears_on_update() -> None:
    m = Merger(["consul"], GuardPolicy(hold=10.0))
    m.update("consul", [inst("a", 1), inst("b", 1)], 0.0)
    m.error("consul", "connection refused", 1.0)
    m.error("consul", "still refused", 2.0)
    stale = m.sources["consul"].stale
    assert stale is not None and (stale.since, stale.message) == (1.0, "still refused")
    m.error("consul", "500 for b", 3.0, service="b")
    m.update("consul", [inst("a", 1)], 4.0)  # b omitted while stale: kept
    assert m.sources["consul"].stale is None
    assert {i.service for i in m.instances()} == {"a", "b"}
    assert "b" in m.sources["consul"].stale_services
    m.tick(13.5)  # no error for b for `hold` seconds: its omission is a removal (1 of 1)
    assert {i.service for i in m.instances()} == {"a"}
    assert not m.sources["consul"].stale_services


def test_merge_across_sources_and_conflicts() -> None:
    m = Merger(["consul", "docker", "etcd"])
    m.update("consul", [inst("a", 1, version="v1"), inst("a", 2)], 0.0)
    m.update("docker", [inst("a", 1, version="v2"), inst("a", 3)], 0.0)  # same addr as a-1
    m.update("etcd", [Instance("a", "a-2", "10.9.9.9", 80)], 0.0)       # id clash a-2
    got = {(i.instance_id, i.source, i.address) for i in m.instances()}
    assert got == {("a-1", "consul", "10.0.0.1"), ("a-2", "consul", "10.0.0.2"),
                   ("a-3", "docker", "10.0.0.3"), ("a-2", "etcd", "10.9.9.9")}
    kinds = {(c.kind, c.key, c.sources) for c in m.conflicts()}
    assert ("address", "10.0.0.1:8000", ("consul", "docker")) in kinds
    assert ("instance_id", "a-2", ("consul", "etcd")) in kinds
    assert ("instance_id", "a-1", ("consul", "docker")) not in kinds  # same address: one endpoint
