"""Route matching, weighted split and load-balancer picks as pure code (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import NoRouteFound, PolicyDenied
from meshd.rules.schema import (
    DestinationRule,
    EgressRule,
    HTTPMatch,
    HTTPRoute,
    RouteDestination,
    RouteRule,
    RulesFile,
    StringMatch,
    Subset,
)
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.model import Endpoint, Version, WeightedCluster
from registry.model import Instance
from sidecar.core.balancer import Balancer
from sidecar.core.router import (
    EgressTarget,
    RequestInfo,
    Router,
    pick_weighted,
    split_authority,
)


def _instances() -> list[Instance]:
    return [
        Instance("svcb", "b1", "127.0.0.1", 1001, {"version": "v1"}),
        Instance("svcb", "b2", "127.0.0.1", 1002, {"version": "v1"}),
        Instance("svcb", "b3", "127.0.0.1", 1003, {"version": "v2"}),
        Instance("svca", "a1", "127.0.0.1", 2001, {"version": "v1"}),
    ]


def _rules() -> RulesFile:
    iphone = HTTPMatch(headers={"user-agent": StringMatch(regex=".*iPhone.*")})
    admin = HTTPMatch(path=StringMatch(prefix="/admin"), method=StringMatch(exact="POST"))
    return RulesFile(
        route=[RouteRule(name="svcb", host="svcb", http=[
            HTTPRoute(name="iphone", match=[iphone], destinations=[RouteDestination(subset="v2")]),
            HTTPRoute(name="admin", match=[admin], destinations=[RouteDestination(subset="v1")]),
            HTTPRoute(name="canary", destinations=[RouteDestination(subset="v1", weight=95),
                                                   RouteDestination(subset="v2", weight=5)]),
        ])],
        destination=[DestinationRule(name="svcb", host="svcb", subsets=[
            Subset(name="v1", labels={"version": "v1"}), Subset(name="v2", labels={"version": "v2"})])],
        egress=[EgressRule(name="msgd", host="msgd.example", ports=[80],
                           endpoints=["127.0.0.1:9100"])],
    )


def _router(rand=None) -> Router:
    snap = for_node(compile_mesh(_rules(), _instances()), NodeInfo(node="n"), Version(1, 1))
    return Router(snap, rand)


def test_iphone_header_regex_routes_to_v2() -> None:
    r = _router()
    ua = [("user-agent", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)")]
    for _ in range(50):
        t = r.resolve(RequestInfo("svcb", "GET", "/notify", ua))
        assert (t.host, t.route, t.cluster) == ("svcb", "iphone", "outbound|v2|svcb")


def test_match_block_conditions_are_anded() -> None:
    r = _router(rand=lambda n: 0)  # canary draw 0 -> v1 anyway; check route name
    assert r.resolve(RequestInfo("svcb", "POST", "/admin/x", [])).route == "admin"
    assert r.resolve(RequestInfo("svcb", "GET", "/admin/x", [])).route == "canary"


def test_weighted_split_statistics() -> None:
    rng = random.Random(7)
    r = _router(rand=rng.randrange)
    counts = Counter(r.resolve(RequestInfo("svcb:80", "GET", "/", [])).cluster for _ in range(20000))
    share = counts["outbound|v2|svcb"] / 20000
    assert 0.045 <= share <= 0.055, share


def test_host_without_route_rule_gets_default_route() -> None:
    t = _router().resolve(RequestInfo("svca", "GET", "/pay", []))
    assert (t.host, t.route, t.cluster) == ("svca", "default", "outbound||svca")


def test_egress_allowed_only_for_listed_host_and_port() -> None:
    r = _router()
    target = r.resolve(RequestInfo("msgd.example", "GET", "/", []))
    assert target == EgressTarget("msgd.example", 80, ("127.0.0.1:9100",))
    with pytest.raises(PolicyDenied):
        r.resolve(RequestInfo("msgd.example:8080", "GET", "/", []))
    with pytest.raises(PolicyDenied):
        r.resolve(RequestInfo("example.com", "GET", "/", []))


def test_route_rule_without_match_gives_404() -> None:
    rules = RulesFile(route=[RouteRule(name="svcb", host="svcb", http=[
        HTTPRoute(match=[HTTPMatch(path=StringMatch(exact="/only"))],
                  destinations=[RouteDestination()])])])
    snap = for_node(compile_mesh(rules, _instances()), NodeInfo(node="n"), Version(1, 1))
    with pytest.raises(NoRouteFound):
        Router(snap).resolve(RequestInfo("svcb", "GET", "/other", []))


def test_split_authority() -> None:
    assert split_authority("SvcB:8080") == ("svcb", 8080)
    assert split_authority("svcb") == ("svcb", 80)
    assert split_authority("[::1]:9000") == ("::1", 9000)


@given(st.lists(st.integers(0, 100), min_size=1, max_size=6), st.data())
def test_pick_weighted_never_picks_zero_weight(weights: list[int], data: st.DataObject) -> None:
    clusters = [WeightedCluster(cluster=f"c{i}", weight=w) for i, w in enumerate(weights)]
    total = sum(weights)
    if total == 0:
        return
    draw = data.draw(st.integers(0, total - 1))
    picked = pick_weighted(clusters, total, draw)
    assert dict((c.cluster, c.weight) for c in clusters)[picked] > 0


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(address="127.0.0.1", port=1000 + i) for i in range(n)]


def test_round_robin_visits_each_endpoint_equally() -> None:
    b, eps = Balancer("round_robin"), _eps(3)
    counts = Counter(b.pick(eps).port for _ in range(300))
    assert set(counts.values()) == {100}


def test_least_request_prefers_idle_endpoint() -> None:
    b, eps = Balancer("least_request", rand=random.Random(1).randrange), _eps(2)
    for _ in range(5):
        b.started(eps[0])
    picks = Counter(b.pick(eps).port for _ in range(200))
    assert picks[1001] > picks[1000] * 2
    for _ in range(5):
        b.finished(eps[0])
    assert b.in_flight(eps[0]) == 0


def test_exclude_and_exhaustion() -> None:
    b, eps = Balancer("random"), _eps(2)
    assert b.pick(eps, {("127.0.0.1", 1000)}).port == 1001
    assert b.pick(eps, {("127.0.0.1", 1000), ("127.0.0.1", 1001)}) is None
    with pytest.raises(ValueError):
        Balancer("fastest")


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_hash_policies_work_through_the_old_api(policy: str) -> None:
    b, eps = Balancer(policy, rand=random.Random(2).randrange), _eps(3)
    assert len({b.pick(eps).port for _ in range(300)}) == 3      # no hash key: random hash
    assert b.pick(eps, {("127.0.0.1", 1000), ("127.0.0.1", 1001)}).port == 1002
    assert b.pick(eps[:1], {("127.0.0.1", 1000)}) is None
