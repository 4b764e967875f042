"""ControlPlane without sockets: pushes, rejections, versions across restarts, watches, ACK/NACK."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshd.errors import RuleValidationError
from meshd.server.control import ControlPlane
from meshd.snapshot.compile import NodeInfo
from meshd.store.sqlite import SqliteStore
from registry.model import Instance

GOOD = """\
[[destination]]
name = "svcb"
host = "svcb"
[[destination.subsets]]
name = "v1"
labels = { version = "v1" }

[[route]]
name = "svcb"
host = "svcb"
[[route.http]]
destinations = [{ subset = "v1" }]
"""
BAD = GOOD.replace('subset = "v1" }', 'subset = "v3" }')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cp(path: Path, clock: Clock | None = None) -> ControlPlane:
    cp = ControlPlane(SqliteStore(path), clock=clock or Clock())
    cp.start()
    return cp


async def test_rejected_push_changes_nothing(tmp_path: Path) -> None:
    cp = _cp(tmp_path)
    cp.subscribe(NodeInfo(node="a", outbound_port=15001))
    cp.push_rules(GOOD, "good.toml")
    version, rules = cp.cache.get("a").snapshot.version, cp.rules
    with pytest.raises(RuleValidationError) as err:
        cp.push_rules(BAD, "bad.toml")
    assert str(err.value) == ('bad.toml:12: route[0].http[0].destinations[0].subset: subset "v3" '
                              'is not defined by any destination rule for host "svcb"')
    assert cp.cache.get("a").snapshot.version == version and cp.rules == rules
    assert cp.store.load_rules().rules == rules


async def test_dry_run_reports_changes_without_applying(tmp_path: Path) -> None:
    cp = _cp(tmp_path)
    result = cp.push_rules(GOOD, "good.toml", dry_run=True)
    assert result["changes"] == [["create", "route", "svcb"], ["create", "destination", "svcb"]]
    assert cp.rules.route == [] and cp.store.history() == []


async def test_restart_never_reissues_a_version(tmp_path: Path) -> None:
    cp = _cp(tmp_path)
    cp.push_rules(GOOD, "good.toml")
    for i in range(5):
        cp.register(Instance("svcb", f"b{i}", "127.0.0.1", 2000 + i, {"version": "v1"}))
    first = cp.version
    cp.store.close()
    cp2 = _cp(tmp_path)
    assert cp2.version > first and cp2.epoch == first.epoch + 1
    assert cp2.rules == cp.rules and len(cp2.instances()) == 5


async def test_only_changed_content_is_pushed_and_watch_wakes(tmp_path: Path) -> None:
    clock = Clock()
    cp = _cp(tmp_path, clock)
    cp.subscribe(NodeInfo(node="a"))
    v0 = str(cp.cache.get("a").snapshot.version)
    assert await cp.cache.wait_for("a", "", 0) is not None
    cp.rebuild()  # nothing changed -> same version
    assert str(cp.cache.get("a").snapshot.version) == v0
    async with trio.open_nursery() as nursery:
        got: list[str] = []

        async def watch() -> None:
            entry = await cp.cache.wait_for("a", v0, 5)
            got.append(str(entry.snapshot.version))

        nursery.start_soon(watch)
        await trio.sleep(0.01)
        cp.register(Instance("svcb", "b1", "127.0.0.1", 2001))
    assert got and got[0] != v0


async def test_ttl_expiry_rebuilds_and_ack_nack_status(tmp_path: Path) -> None:
    clock = Clock()
    cp = _cp(tmp_path, clock)
    cp.subscribe(NodeInfo(node="a", service="svca"))
    cp.register(Instance("svcb", "b1", "127.0.0.1", 2001, ttl=3.0))
    v = str(cp.cache.get("a").snapshot.version)
    cp.cache.ack("a", v, None)
    assert cp.cache.status()[0]["state"] == "SYNCED"
    clock.now += 3.5
    assert [i.instance_id for i in cp.expire()] == ["b1"]
    v2 = str(cp.cache.get("a").snapshot.version)
    assert v2 != v and cp.cache.status()[0]["state"] == "STALE"
    cp.cache.ack("a", v2, "bad regex")
    row = cp.cache.status()[0]
    assert row["state"] == "NACKED" and row["nack_reason"] == "bad regex" and row["applied"] == v


async def test_silent_sidecars_leave_proxy_status(tmp_path: Path) -> None:
    cp = _cp(tmp_path)
    cp.subscribe(NodeInfo(node="gone"))
    cp.subscribe(NodeInfo(node="alive"))
    cp.cache._status["gone"].last_seen -= 60
    assert cp.cache.prune(10.0) == ["gone"]
    assert [r["node"] for r in cp.cache.status()] == ["alive"]
