"""Istio HTTPMatchRequest semantics in the sans-IO router: every condition kind, and explain()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import NoRouteFound
from meshd.rules.validate import decode
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.model import Version
from registry.model import Instance
from sidecar.core.router import RequestInfo, Router

RULES = """\
[[destination]]
name = "svcb"
host = "svcb"
[[destination.subsets]]
name = "v1"
labels = { version = "v1" }
[[destination.subsets]]
name = "v2"
labels = { version = "v2" }

[[route]]
name = "svcb"
host = "svcb"

[[route.http]]
name = "from-svca-v2"
match = [{ source = "svca", source_labels = { version = "v2" } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "query"
match = [{ query_params = { beta = { exact = "1" } } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "json-not-debug"
match = [{ path = { suffix = ".json" }, headers = { x-debug = { absent = true } } }]
destinations = [{ subset = "v1" }]

[[route.http]]
name = "has-test-header"
match = [{ headers = { x-test = { present = true } } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "not-get"
match = [{ method = { exact = "GET", invert = true } }, { port = 8080 }]
destinations = [{ subset = "v1" }]

[[route.http]]
name = "authority"
match = [{ authority = { prefix = "svcb.internal" } }]
destinations = [{ subset = "v1" }]

[[route.http]]
name = "moved"
match = [{ path = { exact = "/old" } }]
redirect = { path = "/new", status = 308 }
"""


def _router() -> Router:
    rules = decode(RULES, "r.toml")
    insts = [Instance("svcb", "b1", "127.0.0.1", 1, {"version": "v1"}),
             Instance("svcb", "b2", "127.0.0.1", 2, {"version": "v2"})]
    return Router(for_node(compile_mesh(rules, insts), NodeInfo(node="n"), Version(1, 1)))


@pytest.mark.parametrize(("req", "route"), [
    (RequestInfo("svcb", "GET", "/", (), "svca", {"version": "v2"}), "from-svca-v2"),
    (RequestInfo("svcb", "GET", "/x?beta=1&z=2", ()), "query"),
    (RequestInfo("svcb", "GET", "/a.json", ()), "json-not-debug"),
    (RequestInfo("svcb", "GET", "/a.json", (("x-debug", "1"), ("x-test", ""))), "has-test-header"),
    (RequestInfo("svcb", "POST", "/a", ()), "not-get"),
    (RequestInfo("svcb:8080", "GET", "/a", ()), "not-get"),
    (RequestInfo("svcb", "GET", "/old", ()), "moved"),
])
def test_each_condition_kind(req: RequestInfo, route: str) -> None:
    assert _router().resolve(req).route == route


def test_source_labels_must_all_match_and_unknown_source_falls_through() -> None:
    r = _router()
    with pytest.raises(NoRouteFound):
        r.resolve(RequestInfo("svcb", "GET", "/", (), "svca", {"version": "v1"}))


def test_redirect_route_has_no_cluster_but_carries_policy() -> None:
    t = _router().resolve(RequestInfo("svcb", "GET", "/old", ()))
    assert t.cluster == "" and t.policy.redirect.path == "/new" and t.policy.redirect.status == 308


def test_explain_names_the_failing_condition_per_route() -> None:
    trace, target = _router().explain(RequestInfo("svcb", "GET", "/a.json", (("x-debug", "1"),)))
    assert trace[0] == ("from-svca-v2", "match[0]: source 'unknown'")
    assert trace[1] == ("query", "match[0]: query param beta=None")
    assert trace[2] == ("json-not-debug", "match[0]: header x-debug='1'")
    assert trace[3] == ("has-test-header", "match[0]: header x-test=None")
    assert trace[4] == ("not-get", "match[0]: method GET; match[1]: port 80")
    assert target is None


@given(st.text(alphabet="abcxyz/.", max_size=12))
def test_suffix_and_invert_agree_with_str_methods(path: str) -> None:
    r = _router()
    req = RequestInfo("svcb", "GET", "/" + path, ())
    trace, _ = r.explain(req)
    matched = dict(trace).get("json-not-debug", "x") is None
    assert matched == ("/" + path).endswith(".json")
