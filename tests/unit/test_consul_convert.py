"""Consul JSON -> Instance on the documented samples, index rules, rate limit, registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import RegistryInconsistent
from registry.consul import convert
from registry.model import Instance

FIX = Path(__file__).parent.parent / "fixtures" / "consul"


def _load(name: str) -> object:
    return json.loads((FIX / name).read_text())


def test_documented_health_sample() -> None:
    [inst] = convert.health_service(_load("health_service_redis.json"), "consul")
    assert inst == Instance(
        service="redis", instance_id="foobar/redis", address="10.1.10.12", port=8000,
        labels={"primary": "true", "redis_version": "4.0", "region": "dc1"}, source="consul")


def test_mixed_entries_address_fallback_health_tags_meta_locality() -> None:
    got = {i.instance_id: i for i in convert.health_service(_load("health_service_web_mixed.json"), "c")}
    assert sorted(got) == ["vm-a/web-1", "vm-b/web-2"]  # vm-c's service check is critical
    a, b = got["vm-a/web-1"], got["vm-b/web-2"]
    assert (a.address, a.port, a.protocol) == ("10.0.0.5", 8080, "")
    assert a.labels == {"version": "v1", "region": "dc1"}
    assert (b.address, b.port, b.protocol) == ("10.0.1.6", 8081, "http2")
    assert b.labels == {"version": "v2", "canary": "true", "region": "eu-west-1", "zone": "eu-west-1a"}


@pytest.mark.parametrize(("tags", "labels"), [
    (["version=v2", "primary"], {"version": "v2", "primary": "true"}),
    (["a=b=c", "=x", "", 7], {"a": "b=c"}),
    (["k="], {"k": ""}),
    (None, {}),
])
def test_tags_to_labels(tags: object, labels: dict[str, str]) -> None:
    assert convert.tags_to_labels(tags) == labels


def test_unroutable_entries_are_skipped_and_bad_shapes_raise() -> None:
    entry = _load("health_service_redis.json")[0]  # type: ignore[index]
    entry["Service"]["Port"] = 0
    assert convert.health_service([entry], "c") == []
    with pytest.raises(RegistryInconsistent):
        convert.health_service({"not": "a list"}, "c")
    with pytest.raises(RegistryInconsistent):
        convert.health_service([{"Node": "x"}], "c")


def test_catalog_services_skips_consul_and_filters() -> None:
    body = _load("catalog_services.json")
    assert convert.catalog_services(body) == {"redis": (), "postgresql": ("primary", "secondary")}
    assert convert.catalog_services(body, frozenset({"redis", "nope"})) == {"redis": ()}
    with pytest.raises(RegistryInconsistent):
        convert.catalog_services(["redis"])


@pytest.mark.parametrize(("prev", "returned", "nxt"), [
    (0, "12", 12), (12, "12", 12), (12, "40", 40),
    (40, "7", 0),   # backwards: reset, restart with a non-blocking read
    (0, "0", 1),    # never 0 after a read (would busy-loop)
    (0, "junk", 1),
])
def test_next_index(prev: int, returned: str, nxt: int) -> None:
    assert convert.next_index(prev, returned) == nxt


@given(st.integers(0, 10**12), st.integers(-5, 10**12))
def test_next_index_is_never_zero_unless_backwards(prev: int, returned: int) -> None:
    nxt = convert.next_index(prev, returned)
    assert nxt == 0 if returned < prev else nxt >= max(1, prev)


def test_token_bucket_allows_a_burst_of_two_then_one_per_interval() -> None:
    b = convert.TokenBucket(interval=1.0, burst=2)
    assert [b.delay(0.0), b.delay(0.0)] == [0.0, 0.0]
    assert b.delay(0.0) == pytest.approx(1.0)
    assert b.delay(1.0) == pytest.approx(1.0)   # the previous caller took the token refilled by 1.0
    assert b.delay(10.0) == 0.0                  # idle -> full again


@given(st.lists(st.floats(0, 5), min_size=1, max_size=40))
def test_token_bucket_never_exceeds_its_rate(gaps: list[float]) -> None:
    b, now, starts = convert.TokenBucket(interval=1.0, burst=2), 0.0, []
    for gap in gaps:
        now += gap
        now += b.delay(now)
        starts.append(now)
    span = starts[-1] - starts[0]
    assert len(starts) <= 2 + span / 1.0 + 1e-6


def test_registration_round_trips_through_the_health_shape() -> None:
    inst = Instance("web", "web-1", "10.0.0.5", 15006, {"version": "v2", "mesh.zone": "z1"}, protocol="grpc")
    reg = convert.registration(inst, ttl=10, deregister_after=60)
    assert reg["meta"] == {"version": "v2", "protocol": "grpc"}   # "mesh.zone" is no valid meta key
    assert reg["check"] == {"CheckID": "service:web-1", "Name": "meshd sidecar TTL", "TTL": "10s",
                            "Status": "passing", "DeregisterCriticalServiceAfter": "1m"}
    entry = {"Node": {"Node": "n1", "Address": "10.9.9.9", "Datacenter": "dc1"},
             "Service": {"ID": reg["service_id"], "Service": reg["name"], "Tags": reg["tags"],
                         "Address": reg["address"], "Port": reg["port"], "Meta": reg["meta"]},
             "Checks": [{"Status": "passing"}]}
    back = convert.health_entry(entry, "consul")
    assert back is not None
    assert (back.address, back.port, back.protocol) == ("10.0.0.5", 15006, "grpc")
    assert back.labels == {"version": "v2", "mesh.zone": "z1", "region": "dc1"}


@pytest.mark.parametrize(("s", "d"), [(10, "10s"), (1.5, "1.5s"), (60, "1m"), (90, "90s"), (300, "5m")])
def test_go_duration(s: float, d: str) -> None:
    assert convert.go_duration(s) == d
