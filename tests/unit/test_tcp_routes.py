"""TCP routes and port protocols: rules validation (file:line: field: reason, whole file
rejected), compile into the snapshot, and the sidecar's pure TCP router (weighted split, port
match, egress, protocol precedence destination > registry)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from meshd.errors import NoRouteFound, PolicyDenied, RuleValidationError
from meshd.rules.schema import RulesFile
from meshd.rules.validate import parse_rules, validate_push
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.consistency import consistency_errors
from meshd.snapshot.model import TcpRoute, Version, WeightedCluster, decode, encode
from registry.model import Instance
from sidecar.core.router import EgressTarget
from sidecar.core.tcp_routes import TcpRouter, TcpTarget

GOOD = """\
[[route]]
name = "db"
host = "db"

[[route.tcp]]
name = "primary-port"
match = [{ port = 5432 }]
destinations = [{ subset = "v1", weight = 80 }, { subset = "v2", weight = 20 }]

[[route.tcp]]
destinations = [{ subset = "v2" }]

[[destination]]
name = "db"
host = "db"
protocol = "tcp"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]

[[egress]]
name = "api"
host = "api.example.com"
ports = [443]
"""

INSTANCES = [
    Instance("db", "db-1", "10.0.0.1", 15006, {"version": "v1"}),
    Instance("db", "db-2", "10.0.0.2", 15006, {"version": "v2"}),
    Instance("cache", "cache-1", "10.0.0.3", 15006, {}, protocol="tcp"),
    Instance("web", "web-1", "10.0.0.4", 15006, {}, protocol="http"),
    Instance("web", "web-2", "10.0.0.5", 15006, {}, protocol="grpc"),
]


def errors_of(text: str) -> list[str]:
    with pytest.raises(RuleValidationError) as caught:
        validate_push(text, "t.toml", RulesFile(), {})
    return [str(e) for e in caught.value.errors]


def _snapshot(text: str = GOOD):
    return for_node(compile_mesh(parse_rules(text, "t.toml"), INSTANCES), NodeInfo("n"), Version(1, 1))


def test_good_file_compiles_to_tcp_routes_and_clusters() -> None:
    snap = _snapshot()
    assert consistency_errors(snap) == []
    vh = next(v for v in snap.virtual_hosts if v.host == "db")
    assert vh.routes == ()
    assert vh.tcp_routes == (
        TcpRoute(name="primary-port", ports=(5432,), clusters=(
            WeightedCluster("outbound|v1|db", 80), WeightedCluster("outbound|v2|db", 20))),
        TcpRoute(name="db-tcp-1", ports=(), clusters=(WeightedCluster("outbound|v2|db", 100),)))
    clusters = {c.name: c for c in snap.clusters}
    assert {"outbound|v1|db", "outbound|v2|db", "outbound||db"} <= set(clusters)
    assert clusters["outbound|v1|db"].protocol == "tcp"
    assert decode(encode(snap)) == snap


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("weight = 20", "weight = 30"),
     ["t.toml:8: route[0].tcp[0].destinations: weights sum to 110, must be 100"]),
    (GOOD.replace("port = 5432", "port = 70000"),
     ["t.toml:7: route[0].tcp[0].match[0].port: port 70000 is out of range 1..65535"]),
    (GOOD.replace('destinations = [{ subset = "v2" }]', "destinations = []"),
     ["t.toml:11: route[0].tcp[1].destinations: at least one destination is required"]),
    (GOOD.replace('{ subset = "v2" }]\n', '{ subset = "v9" }]\n'),
     ['t.toml:11: route[0].tcp[1].destinations[0].subset: subset "v9" is not defined by any '
      'destination rule for host "db"']),
    (GOOD.replace('protocol = "tcp"', 'protocol = "udp"'),
     ["t.toml:16: destination[0].protocol: invalid value \"udp\", expected one of: http, http2, "
      "grpc, tcp"]),
    (GOOD.replace("match = [{ port = 5432 }]", "match = [{ port = 5432, sni = \"x\" }]"),
     ['t.toml:7: route[0].tcp[0].match[0].sni: unknown field "sni", expected one of: port']),
    (GOOD.replace('name = "primary-port"', 'name = "Bad Name"'),
     ['t.toml:6: route[0].tcp[0].name: name "Bad Name" must be lower-case letters, digits, "-" or '
      '".", starting and ending with a letter or digit']),
])
def test_bad_tcp_routes_reject_the_whole_file(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_route_rule_needs_http_or_tcp() -> None:
    assert errors_of('[[route]]\nname = "x"\nhost = "x"\n') == [
        "t.toml:1: route[0].http: at least one http route is required"]
    parse_rules('[[route]]\nname = "x"\nhost = "x"\n[[route.tcp]]\ndestinations = [{}]\n', "t.toml")


def test_weighted_pick_follows_weights_and_port_match() -> None:
    draws = itertools.count()
    router = TcpRouter(_snapshot(), rand=lambda n: next(draws) % n)
    picks = Counter(router.resolve("db", 5432).cluster for _ in range(100))  # type: ignore[union-attr]
    assert picks == {"outbound|v1|db": 80, "outbound|v2|db": 20}
    assert router.resolve("db", 6000) == TcpTarget("db", "db-tcp-1", "outbound|v2|db")
    assert router.resolve("cache", 6379) == TcpTarget("cache", "default", "outbound||cache")


def test_port_only_routes_without_catch_all_refuse_other_ports() -> None:
    text = GOOD.replace('[[route.tcp]]\ndestinations = [{ subset = "v2" }]\n', "")
    with pytest.raises(NoRouteFound):
        TcpRouter(_snapshot(text)).resolve("db", 6000)


def test_egress_and_deny() -> None:
    router = TcpRouter(_snapshot())
    assert router.resolve("api.example.com", 443) == EgressTarget("api.example.com", 443, ())
    with pytest.raises(PolicyDenied):
        router.resolve("api.example.com", 8443)
    with pytest.raises(PolicyDenied):
        router.resolve("evil.example.com", 443)


def test_protocol_destination_wins_then_registry_when_unanimous() -> None:
    router = TcpRouter(_snapshot())
    assert router.protocol("db") == "tcp"          # destination rule
    assert router.protocol("cache") == "tcp"       # registry (Instance.protocol)
    assert router.protocol("web") == ""            # endpoints disagree: detect
    assert router.protocol("api.example.com") == ""
    override = GOOD + '[[destination]]\nname = "cache"\nhost = "cache"\nprotocol = "http"\n'
    assert TcpRouter(_snapshot(override)).protocol("cache") == "http"
