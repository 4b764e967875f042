"""The Eureka adapter (EurekaSource, EurekaRegistrar) against the Eureka double over real HTTP.

The source polls every POLL seconds; each change must be in the sink within a few cycles
(bounds are generous, assertions are on outcomes and on the double's fetch counters).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio

from registry.eureka.registrar import EurekaRegistrar
from registry.eureka.source import EurekaSource
from registry.model import Instance
from tests.doubles.eureka import EurekaDouble
from tests.doubles.sink import RecordingSink

POLL = 0.2  # seconds between delta fetches in these tests (Eureka: 30 s)


@pytest.fixture
def double() -> Iterator[EurekaDouble]:
    d = EurekaDouble(prefix="/eureka")
    with d:
        yield d


async def _op(d: EurekaDouble, method: str, path: str, **params: str) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.request(method, f"{d.url}{d.prefix}{path}", params=params)
    assert r.status_code == 200, r.text


async def test_add_change_health_remove_through_deltas(double: EurekaDouble) -> None:
    reg = EurekaRegistrar(f"{double.url}/eureka", renewal=30)
    w1 = Instance("web", "w-1", "10.0.0.5", 15006, {"version": "v1"}, protocol="http")
    w2 = Instance("web", "w-2", "10.0.0.6", 15006, {"version": "v1"})
    await reg.register(w1)
    sink = RecordingSink()
    src = EurekaSource(address=double.url, poll=POLL)            # bare address: probes the prefix
    async with trio.open_nursery() as n:
        n.start_soon(src.watch, sink)
        await sink.seen(lambda v: "w-1" in v)
        assert sink.last["w-1"] == Instance("web", "w-1", "10.0.0.5", 15006, {"version": "v1"},
                                            source="eureka", protocol="http")
        await reg.register(w2)                                                       # add
        await sink.seen(lambda v: set(v) == {"w-1", "w-2"})
        await _op(double, "PUT", "/apps/WEB/w-1/metadata", version="v2")             # labels
        await sink.seen(lambda v: v["w-1"].labels == {"version": "v2"})
        await _op(double, "PUT", "/apps/WEB/w-2/status", value="OUT_OF_SERVICE")    # health
        await sink.seen(lambda v: set(v) == {"w-1"})
        await _op(double, "PUT", "/apps/WEB/w-2/status", value="UP")
        await sink.seen(lambda v: set(v) == {"w-1", "w-2"})
        await reg.deregister(w1)                                                     # remove
        await sink.seen(lambda v: set(v) == {"w-2"})
        n.cancel_scope.cancel()
    assert sink.errors == [] and all(sink.updates)
    assert src.full_fetches == 1, "every change must come through a delta"
    assert double.full_fetches == 2  # the prefix probe and the initial fetch
    assert src.delta_fetches >= 5


async def test_v2_prefix_arrays_and_missed_deltas_force_full_fetch() -> None:
    with EurekaDouble(prefix="/eureka/v2", unwrap_single=False) as d:
        reg = EurekaRegistrar(f"{d.url}/eureka/v2/")
        await reg.register(Instance("orders", "o-1", "10.0.0.9", 15006))
        d.record_deltas = False                                   # every later change is "missed"
        sink = RecordingSink()
        src = EurekaSource(address=f"{d.url}/eureka/v2", poll=POLL)
        async with trio.open_nursery() as n:
            n.start_soon(src.watch, sink)
            await sink.seen(lambda v: set(v) == {"o-1"})
            await reg.register(Instance("orders", "o-2", "10.0.0.10", 15006))
            await sink.seen(lambda v: set(v) == {"o-1", "o-2"})   # hash mismatch -> full fetch
            n.cancel_scope.cancel()
        assert src.full_fetches >= 2 and sink.errors == []


async def test_errors_and_outage_never_empty_then_resync(double: EurekaDouble) -> None:
    reg = EurekaRegistrar(f"{double.url}/eureka")
    for i in range(3):
        await reg.register(Instance("web", f"w-{i}", f"10.0.0.{i + 1}", 15006))
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(EurekaSource(address=f"{double.url}/eureka", poll=POLL, retry_max=0.5).watch, sink)
        await sink.seen(lambda v: len(v) == 3)
        good, count = sink.updates[-1], len(sink.updates)
        double.fail_all = True                                                  # 500s
        await sink.until(lambda s: len(s.errors) >= 2)
        double.fail_all = False
        await sink.until(lambda s: len(s.updates) > count)                      # resync republishes
        count = len(sink.updates)
        double.stop()                                                           # server down
        errors = len(sink.errors)
        await sink.until(lambda s: len(s.errors) >= errors + 2)
        double.start()
        await sink.until(lambda s: len(s.updates) > count)
        n.cancel_scope.cancel()
    assert all(u == good for u in sink.updates), "an error must never change the view"
    assert all(svc is None for _m, svc in sink.errors)


async def test_lease_expiry_evicts_and_heartbeat_reregisters(double: EurekaDouble) -> None:
    reg = EurekaRegistrar(f"{double.url}/eureka", renewal=0.2, duration=1.0)
    assert reg.heartbeat_interval == 0.2
    inst = Instance("pay", "p-1", "10.0.0.8", 15006, {"zone": "z1"}, protocol="grpc")
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(EurekaSource(address=f"{double.url}/eureka", poll=POLL).watch, sink)
        await reg.register(inst)
        await sink.seen(lambda v: "p-1" in v)
        assert sink.last["p-1"].labels == {"zone": "z1"} and sink.last["p-1"].protocol == "grpc"
        for _ in range(6):                                                   # 1.2 s > lease: renewals keep it
            await reg.heartbeat(inst)
            await trio.sleep(reg.heartbeat_interval)
        assert "p-1" in sink.last and double.renewals >= 6
        await sink.seen(lambda v: "p-1" not in v, timeout=8)                 # no renewal: evicted
        await reg.heartbeat(inst)                                            # 404 -> register again
        assert reg.registrations == 2
        await sink.seen(lambda v: "p-1" in v)
        await reg.deregister(inst)
        await reg.deregister(inst)                                           # already gone: fine
        await sink.seen(lambda v: "p-1" not in v)
        n.cancel_scope.cancel()
    assert sink.errors == []
