"""Eureka JSON -> Instance, the single-object quirk, delta merge and reconcile hash code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import RegistryInconsistent
from registry.eureka import convert
from registry.model import Instance

FIX = Path(__file__).parent.parent / "fixtures" / "eureka"


def _load(name: str) -> object:
    return json.loads((FIX / name).read_text())


def test_full_registry_only_up_with_enabled_ports() -> None:
    reg, server_hash = convert.parse_full(_load("apps_full.json"))
    assert len(reg) == 4 and server_hash == convert.reconcile_hashcode(reg) == "DOWN_1_UP_3_"
    got = {i.instance_id: i for i in convert.instances(reg, "eureka")}
    assert sorted(got) == ["10.0.0.5:web:8080", "10.0.0.7:web:8443", "i-0abc"]  # the DOWN one is left out
    assert got["10.0.0.5:web:8080"] == Instance(
        "web", "10.0.0.5:web:8080", "10.0.0.5", 8080, source="eureka",
        labels={"mesh.spiffe": "spiffe://mesh.local/ns/default/sa/web", "management.port": "8080"})
    secure = got["10.0.0.7:web:8443"]
    assert (secure.port, secure.protocol, secure.labels) == (8443, "http2", {"version": "v2"})
    orders = got["i-0abc"]   # plain-number port (enabled by default), "@class" skipped, Amazon zone
    assert (orders.service, orders.port, orders.labels) == ("orders", 9090, {"zone": "us-east-1c"})


def test_single_element_arrays_unwrapped_as_objects() -> None:
    reg, server_hash = convert.parse_full(_load("apps_single_unwrapped.json"))
    assert [i.instance_id for i in convert.instances(reg, "e")] == ["i-0abc"]
    assert server_hash == convert.reconcile_hashcode(reg) == "UP_1_"


def test_delta_applies_added_modified_deleted_and_hash_matches() -> None:
    reg, _ = convert.parse_full(_load("apps_full.json"))
    new, server_hash = convert.apply_delta(reg, _load("apps_delta.json"))
    assert convert.reconcile_hashcode(new) == server_hash == "UP_4_"
    ids = [i.instance_id for i in convert.instances(new, "e")]
    assert ids == ["10.0.0.9:cart:7000", "i-0abc", "10.0.0.5:web:8080", "10.0.0.6:web:8080"]
    assert len(reg) == 4   # the input registry is not mutated


def test_missed_delta_shows_as_hash_mismatch() -> None:
    reg, _ = convert.parse_full(_load("apps_single_unwrapped.json"))   # an older copy
    new, server_hash = convert.apply_delta(reg, _load("apps_delta.json"))
    assert convert.reconcile_hashcode(new) != server_hash


NO_ID = {"applications": {"application": {"name": "A", "instance": {"status": "UP"}}}}


@pytest.mark.parametrize("doc", [{}, {"applications": []}, {"applications": {"application": "x"}}, NO_ID])
def test_bad_shapes_raise(doc: object) -> None:
    with pytest.raises(RegistryInconsistent):
        convert.parse_full(doc)


def test_unknown_action_type_raises() -> None:
    inst = {"instanceId": "a1", "actionType": "X"}
    doc = {"applications": {"application": {"name": "A", "instance": inst}}}
    with pytest.raises(RegistryInconsistent):
        convert.apply_delta({}, doc)


@pytest.mark.parametrize(("port", "secure", "want"), [
    ({"$": 80, "@enabled": "true"}, {"$": 443, "@enabled": "true"}, 80),
    ({"$": 80, "@enabled": False}, {"$": 443, "@enabled": True}, 443),
    ({"$": "80", "@enabled": "false"}, 443, None),   # plain securePort stays disabled
    (None, None, None),
])
def test_port_enabled_rules(port: object, secure: object, want: int | None) -> None:
    inst = {"instanceId": "a", "app": "A", "ipAddr": "10.0.0.1", "status": "UP", "port": port,
            "securePort": secure}
    got = convert.to_instance(("A", "a"), inst, "e")
    assert (got.port if got else None) == want


@given(st.lists(st.sampled_from(["UP", "DOWN", "STARTING", "OUT_OF_SERVICE", "UNKNOWN"]), max_size=30))
def test_hashcode_counts_every_status_in_sorted_order(statuses: list[str]) -> None:
    reg = {("A", str(n)): {"status": s} for n, s in enumerate(statuses)}
    code = convert.reconcile_hashcode(reg)
    pairs = re.findall(r"([A-Z_]+?)_(\d+)_", code)   # OUT_OF_SERVICE has underscores itself
    names, counts = [p[0] for p in pairs], [int(p[1]) for p in pairs]
    assert "".join(f"{n}_{c}_" for n, c in pairs) == code
    assert names == sorted(set(statuses)) and sum(counts) == len(statuses)


def test_registration_round_trips() -> None:
    inst = Instance("web", "w-1", "10.0.0.5", 15006, {"version": "v2"}, protocol="grpc")
    body = convert.registration(inst, "WEB", 30, 90, 1700000000000)
    back = convert.to_instance(("WEB", "w-1"), body["instance"], "eureka")  # type: ignore[arg-type]
    assert back == Instance("web", "w-1", "10.0.0.5", 15006, {"version": "v2"}, source="eureka",
                            protocol="grpc")
