"""Pure tests of the load-balancing core: hashing.py, locality.py and balancer.EndpointPicker."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.snapshot.model import Cluster, Endpoint, HashPolicy, Locality
from sidecar.core import balancer, hashing, locality
from sidecar.core.balancer import EndpointPicker, key, slow_start_weight
from sidecar.core.hashing import (
    MAGLEV_TABLE_SIZE,
    HashRing,
    MaglevTable,
    request_hash,
    stable_hash,
)
from sidecar.core.locality import choose_level, priority_levels, priority_load

ALL = lambda ep: True  # noqa: E731
KEYS = [stable_hash(f"user-{i}") for i in range(10_000)]


def _eps(n: int, **labels: str) -> list[Endpoint]:
    return [Endpoint(address=f"10.0.0.{i}", port=8000 + i, instance_id=f"i{i}", labels=dict(labels))
            for i in range(n)]


def _cluster(policy: str = "round_robin", **kw: object) -> Cluster:
    return Cluster(name="outbound||svcb", host="svcb", subset="", lb_policy=policy, **kw)  # type: ignore[arg-type]


def _ports(structure: HashRing | MaglevTable, usable=ALL) -> list[int]:
    return [structure.pick(k, usable).port for k in KEYS]


# --- purity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [balancer, hashing, locality])
def test_core_modules_import_no_io(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not imported & {"trio", "socket", "ssl", "time"}


def test_stable_hash_is_pinned_across_processes() -> None:
    # every sidecar must build the same ring: the value may never depend on PYTHONHASHSEED
    assert stable_hash("abc") == 15617099051652453721
    assert stable_hash("abc", seed=1) == 5063898434406305018


# --- ring hash ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [HashRing, MaglevTable])
def test_same_key_always_same_endpoint(cls: type) -> None:
    s = cls(_eps(10))
    for k in KEYS[:20]:
        assert len({s.pick(k, ALL).port for _ in range(1000)}) == 1


def test_picker_same_hash_key_same_endpoint_across_1000_requests() -> None:
    eps = _eps(10)
    for policy in ("ring_hash", "maglev"):
        p = EndpointPicker(_cluster(policy), {}, random.Random(3).random)
        p.update(p.cluster, eps, now=0.0)
        for k in KEYS[:5]:
            assert len({p.pick(eps, now=1.0, hash_key=k).port for _ in range(1000)}) == 1


def test_ring_size_per_host_rounded_up_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(HashRing(_eps(10), 1024)) == 10 * 103          # ceil(1024 / 10) nodes each
    assert len(HashRing(_eps(3), 4096)) == 3 * 1366
    monkeypatch.setattr(hashing, "MAX_RING_SIZE", 100)
    assert len(HashRing(_eps(10), 1024)) == 100                # Envoy maximum_ring_size cap


def test_ring_adding_one_host_remaps_few_keys() -> None:
    eps = _eps(11)
    before, after = _ports(HashRing(eps[:10])), _ports(HashRing(eps))
    moved = sum(a != b for a, b in zip(before, after, strict=True)) / len(KEYS)
    new_share = after.count(eps[10].port) / len(KEYS)
    assert 0.05 < new_share < 0.14, new_share                  # ~1/11 goes to the newcomer
    # Envoy's ring also drops the highest vnode indexes of the old hosts (103 -> 94 each)
    assert new_share <= moved < 0.20, moved


@pytest.mark.parametrize("cls", [HashRing, MaglevTable])
def test_unusable_host_only_remaps_its_own_keys(cls: type) -> None:
    s = cls(_eps(10))
    before = _ports(s)
    after = _ports(s, usable=lambda ep: ep.port != 8003)
    assert before.count(8003) > 500
    assert 8003 not in after
    assert all(a == b for a, b in zip(before, after, strict=True) if a != 8003)
    # the dead host's keys spread over several others instead of all landing on one neighbour
    assert len({b for a, b in zip(before, after, strict=True) if a == 8003}) >= 5


def test_ring_distribution_within_40_percent_of_fair() -> None:
    counts = Counter(_ports(HashRing(_eps(10), 1024)))
    assert len(counts) == 10
    assert all(600 <= c <= 1400 for c in counts.values()), counts


def test_ring_walks_clockwise_to_next_usable_and_none_when_none() -> None:
    ring = HashRing(_eps(3), 16)
    k = KEYS[0]
    first = ring.pick(k, ALL)
    second = ring.pick(k, lambda ep: ep.port != first.port)
    assert second is not None and second.port != first.port
    assert ring.pick(k, lambda ep: False) is None
    assert HashRing([], 1024).pick(k, ALL) is None


# --- maglev -------------------------------------------------------------------------------------

def test_maglev_table_fully_populated_and_even() -> None:
    t = MaglevTable(_eps(10))
    assert len(t.table) == MAGLEV_TABLE_SIZE == 65537
    counts = Counter(t.table)
    assert -1 not in counts and set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 1    # ceil/floor of M / N


def test_maglev_adding_one_host_remaps_few_keys() -> None:
    eps = _eps(11)
    before, after = _ports(MaglevTable(eps[:10])), _ports(MaglevTable(eps))
    moved = sum(a != b for a, b in zip(before, after, strict=True)) / len(KEYS)
    assert 0.05 < moved < 0.20, moved


def test_maglev_removing_a_host_by_rebuild_disturbs_others_little() -> None:
    eps = _eps(10)
    before, after = _ports(MaglevTable(eps)), _ports(MaglevTable(eps[1:]))
    others_moved = sum(a != b for a, b in zip(before, after, strict=True) if a != eps[0].port)
    assert others_moved / len(KEYS) < 0.03


def test_tables_do_not_depend_on_endpoint_order() -> None:
    eps = _eps(7)
    assert MaglevTable(eps, 251).table == MaglevTable(eps[::-1], 251).table
    assert _ports(HashRing(eps)) == _ports(HashRing(eps[::-1]))
    with pytest.raises(ValueError):
        MaglevTable(_eps(5), 3)


# --- request_hash -------------------------------------------------------------------------------

def test_request_hash_sources() -> None:
    none: dict[str, str] = {}
    by_header = HashPolicy(header="X-User")
    ann = request_hash(by_header, headers={"x-user": "ann"}, query=none, source_ip=None)
    assert ann == stable_hash("ann")
    assert request_hash(by_header, headers={"x-other": "ann"}, query=none, source_ip="1.2.3.4") is None
    by_cookie = HashPolicy(cookie="session")
    jar = {"cookie": "a=1; session=xyz; b=2"}
    assert request_hash(by_cookie, headers=jar, query=none, source_ip=None) == stable_hash("xyz")
    assert request_hash(by_cookie, headers={"cookie": "a=1"}, query=none, source_ip=None) is None
    assert request_hash(by_cookie, headers=none, query=none, source_ip=None) is None
    by_query = HashPolicy(query_param="tenant")
    assert request_hash(by_query, headers=none, query={"tenant": "t1"}, source_ip=None) == stable_hash("t1")
    assert request_hash(by_query, headers=none, query={"x": "t1"}, source_ip=None) is None
    by_ip = HashPolicy(source_ip=True)
    assert request_hash(by_ip, headers=none, query=none, source_ip="10.1.1.1") == stable_hash("10.1.1.1")
    assert request_hash(by_ip, headers=none, query=none, source_ip=None) is None
    assert request_hash(HashPolicy(), headers={"x-user": "a"}, query=none, source_ip="10.1.1.1") is None


def test_request_hash_combines_present_sources_and_separates_values() -> None:
    both = HashPolicy(header="x-user", source_ip=True)
    h1 = request_hash(both, headers={"x-user": "ann"}, query={}, source_ip="10.0.0.1")
    h2 = request_hash(both, headers={"x-user": "bob"}, query={}, source_ip="10.0.0.1")
    only_ip = request_hash(both, headers={}, query={}, source_ip="10.0.0.1")
    assert len({h1, h2, only_ip}) == 3
    assert only_ip == stable_hash("10.0.0.1")
    assert h1 == (stable_hash("ann") << 1 & (2**64 - 1) | stable_hash("ann") >> 63) ^ stable_hash("10.0.0.1")


# --- locality -----------------------------------------------------------------------------------

LOC = Locality()
HERE = {"region": "eu", "zone": "eu-a"}


def _zoned(n: int, region: str, zone: str, base: int) -> list[Endpoint]:
    return [Endpoint(address="10.1.0.1", port=base + i, labels={"region": region, "zone": zone})
            for i in range(n)]


def test_priority_levels_split_and_drop_empty() -> None:
    p0, p1, p2 = _zoned(2, "eu", "eu-a", 100), _zoned(3, "eu", "eu-b", 200), _zoned(1, "us", "eu-a", 300)
    mixed = [p2[0], p1[0], p0[0], p1[1], p0[1], p1[2]]
    assert priority_levels(mixed, HERE, LOC) == [p0, p1, p2]
    assert priority_levels(p0 + p2, HERE, LOC) == [p0, p2]
    assert priority_levels(p1, HERE, LOC) == [p1]
    unlabelled = _eps(2)
    assert priority_levels(unlabelled + p0, {}, LOC) == [unlabelled, p0]
    custom = Locality(region_label="dc", zone_label="rack")
    racked = _eps(2, dc="x", rack="2")
    assert priority_levels(racked, {"dc": "x", "rack": "1"}, custom) == [racked]


def _share_of_level(levels: list[list[Endpoint]], healthy, level: int, n: int = 10_000) -> float:
    rng = random.Random(11)
    return sum(choose_level(levels, healthy, rng.random()) == level for _ in range(n)) / n


def test_priority_load_spills_by_missing_health_and_heals_back() -> None:
    levels = [_zoned(10, "eu", "eu-a", 100), _zoned(10, "eu", "eu-b", 200)]
    all_up = lambda ep: True  # noqa: E731
    half_p0 = lambda ep: not 100 <= ep.port < 105  # noqa: E731
    p0_down = lambda ep: ep.port >= 200  # noqa: E731
    assert _share_of_level(levels, all_up, 0) == 1.0
    assert priority_load(levels, half_p0) == [70, 30]                     # 1.4 x 50 %
    assert abs(_share_of_level(levels, half_p0, 0) - 0.70) <= 0.02
    assert abs(_share_of_level(levels, half_p0, 1) - 0.30) <= 0.02
    assert _share_of_level(levels, p0_down, 1) == 1.0
    assert _share_of_level(levels, all_up, 0) == 1.0                      # healed


def test_priority_load_overprovisioning_and_scaling() -> None:
    levels = [_zoned(10, "eu", "eu-a", 100), _zoned(10, "eu", "eu-b", 200)]
    assert priority_load(levels, lambda ep: ep.port not in (100, 101, 102)) == [98, 2]  # 140*7//10
    assert priority_load(levels, lambda ep: ep.port not in (100, 101)) == [100, 0]      # 8/10 >= 1/1.4
    # total health below 100 is normalised: 14 % and 14 % -> half each
    assert priority_load(levels, lambda ep: ep.port in (100, 200)) == [50, 50]
    assert priority_load(levels, lambda ep: False) == [100, 0]           # Envoy: all to P0 (panic)
    assert priority_load([], lambda ep: True) == []
    with pytest.raises(ValueError):
        choose_level([], lambda ep: True, 0.5)


def test_picker_locality_fails_over_and_heals() -> None:
    p0, p1 = _zoned(4, "eu", "eu-a", 100), _zoned(4, "eu", "eu-b", 200)
    picker = EndpointPicker(_cluster(locality=LOC), HERE, random.Random(5).random)
    picker.update(picker.cluster, p0 + p1, now=0.0)

    def local_share(usable: list[Endpoint]) -> float:
        return sum(picker.pick(usable, now=1.0).port < 200 for _ in range(10_000)) / 10_000

    assert local_share(p0 + p1) == 1.0
    assert abs(local_share(p0[:2] + p1) - 0.70) <= 0.02
    assert local_share(p1) == 0.0
    assert local_share(p0 + p1) == 1.0
    # a retry that excluded every local endpoint still gets one from the next level
    assert picker.pick(p0 + p1, now=1.0, exclude={key(e) for e in p0}).port >= 200


def test_picker_locality_with_ring_hash_is_consistent_within_level() -> None:
    p0, p1 = _zoned(4, "eu", "eu-a", 100), _zoned(4, "eu", "eu-b", 200)
    picker = EndpointPicker(_cluster("ring_hash", locality=LOC), HERE, random.Random(5).random)
    picker.update(picker.cluster, p0 + p1, now=0.0)
    for k in KEYS[:20]:
        got = {picker.pick(p0 + p1, now=1.0, hash_key=k).port for _ in range(50)}
        assert len(got) == 1 and got.pop() < 200


# --- picker: policies, slow start, rebuilds -----------------------------------------------------

def test_slow_start_weight_curve() -> None:
    assert slow_start_weight(0.0, 60.0) == pytest.approx(0.1)      # min_weight_percent 10
    assert slow_start_weight(3.0, 60.0) == pytest.approx(0.1)
    assert slow_start_weight(30.0, 60.0) == pytest.approx(0.5)
    assert slow_start_weight(60.0, 60.0) == 1.0
    assert slow_start_weight(0.0, None) == 1.0
    assert slow_start_weight(0.0, 5.0) == pytest.approx(0.2)        # max(age, 1 s) / window


def _new_share(policy: str, age: float, window: float = 60.0, picks: int = 20_000) -> float:
    old, new = _eps(4), Endpoint(address="10.9.9.9", port=9000)
    picker = EndpointPicker(_cluster(policy, slow_start=window), {}, random.Random(42).random)
    picker.update(picker.cluster, old, now=0.0)
    picker.update(picker.cluster, [*old, new], now=1000.0)
    eps = [*old, new]
    return sum(picker.pick(eps, now=1000.0 + age).port == 9000 for _ in range(picks)) / picks


@pytest.mark.parametrize("policy", ["random", "round_robin", "least_request"])
def test_slow_start_ramps_new_endpoint_from_10_percent_weight(policy: str) -> None:
    assert abs(_new_share(policy, 0.0) - 0.1 / 4.1) <= 0.005          # ~2.4 % of picks
    assert abs(_new_share(policy, 30.0) - 0.5 / 4.5) <= 0.01
    assert abs(_new_share(policy, 60.0) - 0.2) <= 0.015                # window over: full weight


def test_endpoint_that_leaves_and_returns_restarts_slow_start() -> None:
    eps = _eps(5)
    picker = EndpointPicker(_cluster("round_robin", slow_start=60.0), {}, random.Random(1).random)
    picker.update(picker.cluster, eps, now=0.0)
    picker.update(picker.cluster, eps[:4], now=100.0)
    picker.update(picker.cluster, eps, now=200.0)
    picks = Counter(picker.pick(eps, now=200.0).port for _ in range(4100))
    assert picks[eps[4].port] == pytest.approx(100, abs=2)


def test_least_request_prefers_idle_endpoint() -> None:
    eps = _eps(2)
    picker = EndpointPicker(_cluster("least_request"), {}, random.Random(1).random)
    for _ in range(5):
        picker.started(eps[0])
    picks = Counter(picker.pick(eps, now=0.0).port for _ in range(2000))
    assert 0.20 <= picks[eps[0].port] / 2000 <= 0.30                # P2C: only when both draws hit it
    for _ in range(5):
        picker.finished(eps[0])
    assert picker.in_flight(eps[0]) == 0


def test_round_robin_cycles_and_exclude_skips() -> None:
    eps = _eps(3)
    picker = EndpointPicker(_cluster(), {})
    assert set(Counter(picker.pick(eps, now=0.0).port for _ in range(300)).values()) == {100}
    assert picker.pick(eps, now=0.0, exclude={key(eps[0]), key(eps[1])}) == eps[2]
    assert picker.pick(eps, now=0.0, exclude={key(e) for e in eps}) is None
    assert picker.pick([], now=0.0) is None


def test_hash_structure_rebuilt_only_when_set_or_policy_changes() -> None:
    eps = _eps(4)
    picker = EndpointPicker(_cluster("maglev"), {})
    picker.update(picker.cluster, eps, now=0.0)
    table = picker._hasher
    relabelled = [Endpoint(address=e.address, port=e.port, labels={"v": "2"}) for e in eps[::-1]]
    picker.update(picker.cluster, relabelled, now=1.0)
    assert picker._hasher is table
    picked = picker.pick(relabelled, now=1.0, hash_key=KEYS[0])
    assert any(picked is e for e in relabelled)                      # the caller's object, new labels
    picker.update(picker.cluster, eps[:3], now=2.0)
    assert picker._hasher is not table
    picker.update(_cluster("ring_hash", hash_policy=HashPolicy(ring_size=64)), eps[:3], now=3.0)
    assert isinstance(picker._hasher, HashRing) and len(picker._hasher) == 66
    picker.update(_cluster("round_robin"), eps, now=4.0)
    assert picker._hasher is None
    with pytest.raises(ValueError):
        picker.update(_cluster("fastest"), eps, now=5.0)


def test_hash_pick_without_key_spreads_randomly() -> None:
    eps = _eps(4)
    picker = EndpointPicker(_cluster("ring_hash"), {}, random.Random(9).random)
    picker.update(picker.cluster, eps, now=0.0)
    counts = Counter(picker.pick(eps, now=0.0).port for _ in range(4000))
    assert len(counts) == 4 and min(counts.values()) > 600


# --- property: pick stays inside usable minus exclude ------------------------------------------

UNIVERSE = [*_zoned(3, "eu", "eu-a", 100), *_zoned(3, "eu", "eu-b", 200), *_zoned(2, "us", "us-a", 300)]
STRANGERS = _zoned(2, "eu", "eu-a", 900)   # usable but never given to update()
POLICIES = ("round_robin", "least_request", "random", "ring_hash", "maglev")


def _make_pickers() -> dict[tuple[str, bool], EndpointPicker]:
    pickers = {}
    for policy in POLICIES:
        for with_locality in (False, True):
            cluster = _cluster(policy, locality=LOC if with_locality else None, slow_start=30.0)
            p = EndpointPicker(cluster, HERE, random.Random(0).random)
            p.update(cluster, UNIVERSE, now=0.0)
            pickers[(policy, with_locality)] = p
    return pickers


PICKERS = _make_pickers()


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    with_locality=st.booleans(),
    usable=st.lists(st.sampled_from(UNIVERSE + STRANGERS), max_size=10),
    excluded=st.lists(st.sampled_from(UNIVERSE + STRANGERS), max_size=6),
    hash_key=st.none() | st.integers(0, 2**64 - 1),
    now=st.floats(0.0, 100.0),
)
def test_pick_stays_within_usable_minus_exclude(policy: str, with_locality: bool, usable: list[Endpoint],
                                                excluded: list[Endpoint], hash_key: int | None,
                                                now: float) -> None:
    picker = PICKERS[(policy, with_locality)]
    exclude = {key(e) for e in excluded}
    allowed = [e for e in usable if key(e) not in exclude]
    got = picker.pick(usable, now=now, hash_key=hash_key, exclude=exclude)
    if not allowed:
        assert got is None
    else:
        assert got is not None and key(got) not in exclude
        assert any(got is e for e in usable)
