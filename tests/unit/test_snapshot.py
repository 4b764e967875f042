"""Snapshot compilation, consistency checks and versions as pure code."""

from __future__ import annotations

import msgspec
import pytest

from meshd.rules.schema import (
    DestinationRule,
    HTTPRoute,
    RouteDestination,
    RouteRule,
    RulesFile,
    Subset,
)
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.consistency import consistency_errors
from meshd.snapshot.model import Version, WeightedCluster, decode, encode
from registry.model import Instance

INSTANCES = [
    Instance("svcb", "b1", "10.0.0.1", 15006, {"version": "v1"}),
    Instance("svcb", "b2", "10.0.0.2", 15006, {"version": "v2"}),
]


def _rules(weights=(90, 10)) -> RulesFile:
    return RulesFile(
        route=[RouteRule(name="svcb", host="svcb", http=[HTTPRoute(destinations=[
            RouteDestination(subset="v1", weight=weights[0]),
            RouteDestination(subset="v2", weight=weights[1])])])],
        destination=[DestinationRule(name="svcb", host="svcb", load_balancer="least_request",
                                     subsets=[Subset(name="v1", labels={"version": "v1"}),
                                              Subset(name="v2", labels={"version": "v2"})])],
    )


def test_subset_clusters_select_instances_by_label() -> None:
    mesh = compile_mesh(_rules(), INSTANCES)
    eps = {e.cluster: [x.instance_id for x in e.endpoints] for e in mesh.endpoints}
    assert eps == {"outbound||svcb": ["b1", "b2"], "outbound|v1|svcb": ["b1"],
                   "outbound|v2|svcb": ["b2"]}
    assert {c.name: c.lb_policy for c in mesh.clusters}["outbound|v2|svcb"] == "least_request"


def test_node_snapshot_has_listeners_and_is_consistent() -> None:
    node = NodeInfo(node="svca-1", service="svca", inbound_port=15006, outbound_port=15001,
                    admin_port=15000, app_port=8080)
    snap = for_node(compile_mesh(_rules(), INSTANCES), node, Version(3, 7))
    assert [(x.name, x.port) for x in snap.listeners] == [
        ("virtualOutbound", 15001), ("virtualInbound", 15006), ("admin", 15000)]
    assert consistency_errors(snap) == []
    assert decode(encode(snap)) == snap


def test_inconsistent_snapshot_is_reported() -> None:
    snap = for_node(compile_mesh(_rules(), INSTANCES), NodeInfo(node="n"), Version(1, 1))
    vh = snap.virtual_hosts[0]
    bad_route = msgspec.structs.replace(vh.routes[0], clusters=(
        WeightedCluster(cluster="outbound|v9|svcb", weight=60),
        WeightedCluster(cluster="outbound|v1|svcb", weight=30)))
    bad = msgspec.structs.replace(snap, virtual_hosts=(msgspec.structs.replace(vh, routes=(bad_route,)),),
                                  endpoints=snap.endpoints[1:])
    problems = consistency_errors(bad)
    assert "virtual_host svcb route svcb-0: weights sum to 90, must be 100" in problems
    assert "virtual_host svcb route svcb-0: unknown cluster outbound|v9|svcb" in problems
    dropped = snap.endpoints[0].cluster
    assert f"cluster {dropped} has no endpoint assignment" in problems


def test_content_key_ignores_version_only() -> None:
    mesh = compile_mesh(_rules(), INSTANCES)
    a = for_node(mesh, NodeInfo(node="n"), Version(1, 1))
    b = for_node(mesh, NodeInfo(node="n"), Version(2, 9))
    c = for_node(compile_mesh(_rules((80, 20)), INSTANCES), NodeInfo(node="n"), Version(2, 9))
    assert a.content_key() == b.content_key() != c.content_key()


def test_versions_order_across_epochs() -> None:
    assert Version(2, 0) > Version(1, 999)
    assert str(Version(4, 2)) == "4.2" and Version.parse("4.2") == Version(4, 2)
    with pytest.raises(ValueError):
        Version.parse("nope")
