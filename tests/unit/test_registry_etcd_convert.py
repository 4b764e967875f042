"""registry.etcd.convert on etcd 3.4 JSON-gateway replies recorded from Debian's etcd."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from registry.etcd.convert import (
    b64,
    key_of,
    parse_kv,
    parse_range,
    parse_watch,
    prefix_range,
    split_key,
    unb64,
    value_of,
)
from registry.model import Instance

FIX = Path(__file__).parent.parent / "fixtures" / "etcd"
P = "/meshd/services/"


def lines(name: str) -> list[dict]:
    return [json.loads(x) for x in (FIX / name).read_text().splitlines() if x.strip()]


def test_range_response() -> None:
    batch = parse_range(json.loads((FIX / "range.json").read_text()), P, "etcd")
    assert batch.revision == 4 and not batch.problems
    [(key, inst)] = batch.changes
    assert key == "/meshd/services/a/a-2"
    assert inst == Instance("a", "a-2", "10.0.0.2", 80, {"version": "v2"}, source="etcd")


def test_watch_put_and_delete_in_order() -> None:
    created, events = lines("watch_events.jsonl")
    assert parse_watch(created, P, "etcd").changes == []
    batch = parse_watch(events, P, "etcd")
    assert [(k, i is None) for k, i in batch.changes] == [("/meshd/services/a/a-2", False),
                                                           ("/meshd/services/a/a-1", True)]
    assert batch.revision == 4 and not batch.canceled


def test_watch_cancelled_by_compaction() -> None:
    _, cancelled = lines("watch_compacted.jsonl")
    batch = parse_watch(cancelled, P, "etcd")
    assert batch.canceled and batch.compact_revision == 4
    assert parse_watch({"error": {"grpc_code": 14, "message": "unavailable"}}, P, "x").canceled


def test_bad_values_are_problems_of_their_service() -> None:
    bad = {"key": b64(P + "db/db-1"), "value": b64("{not json")}
    _, inst, problem = parse_kv(bad, P, "etcd")
    assert inst is None and "bad instance JSON" in problem
    batch = parse_range({"header": {"revision": "7"}, "kvs": [bad]}, P, "etcd")
    assert batch.problems[0][1] == "db" and batch.changes == []
    assert parse_kv({"key": b64(P + "nokey"), "value": b64("{}")}, P, "e")[1] is None
    port0 = {"key": b64(P + "a/1"), "value": b64('{"address": "h", "port": 0}')}
    assert "port" in parse_kv(port0, P, "e")[2]


def test_prefix_range() -> None:
    r = prefix_range(P)
    assert unb64(r["key"]) == P and unb64(r["range_end"]) == "/meshd/services0"


names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)


@given(names, names, st.dictionaries(names, names, max_size=3), st.integers(1, 65535))
def test_value_round_trip(service, iid, labels, port) -> None:
    inst = Instance(service, iid, "10.1.2.3", port, labels, source="etcd", ttl=7.0, protocol="http")
    assert split_key(P, key_of(P, inst)) == (service, iid)
    assert parse_kv({"key": b64(key_of(P, inst)), "value": value_of(inst)}, P, "etcd")[1] == inst
