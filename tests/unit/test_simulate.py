"""rule simulate: decisions with reasons, computed by the sidecar's own router."""

from __future__ import annotations

from meshd.rules.validate import decode
from meshd.server.simulate import SimRequest, simulate
from registry.model import Instance

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
name = "testers"
match = [{ headers = { x-test = { exact = "1" } } }]
destinations = [{ subset = "v2" }]
fault = { abort = { status = 503, percentage = 10.0 } }
timeout = "2s"
[[route.http]]
name = "canary"
destinations = [{ subset = "v1", weight = 95 }, { subset = "v2", weight = 5 }]

[[egress]]
name = "msgd"
host = "msgd.example"
"""
INSTANCES = [Instance("svcb", "b1", "127.0.0.1", 1, {"version": "v1"}),
             Instance("svcb", "b2", "127.0.0.1", 2, {"version": "v2"})]


def test_matching_route_with_policies_and_reasons() -> None:
    out = simulate(decode(RULES), INSTANCES, SimRequest("svcb", headers={"X-Test": "1"}))
    assert out["outcome"] == "route" and out["route"] == "testers"
    assert out["trace"] == [{"route": "testers", "matched": True, "why_not": None}]
    assert out["destinations"][0]["endpoints"] == ["b2"]
    assert out["policies"]["timeout"] == 2.0
    assert out["policies"]["fault"]["abort_status"] == 503


def test_split_reported_as_shares_with_the_failed_condition() -> None:
    out = simulate(decode(RULES), INSTANCES, SimRequest("svcb", headers={"x-test": "0"}))
    assert out["route"] == "canary"
    assert out["trace"][0]["why_not"] == "match[0]: header x-test='0'"
    assert [(d["subset"], d["share_percent"]) for d in out["destinations"]] == [("v1", 95.0),
                                                                                ("v2", 5.0)]


def test_egress_and_denied() -> None:
    rules = decode(RULES)
    assert simulate(rules, INSTANCES, SimRequest("msgd.example"))["outcome"] == "egress"
    denied = simulate(rules, INSTANCES, SimRequest("elsewhere.example:443"))
    assert denied["outcome"] == "denied" and "no egress rule" in denied["reason"]
