"""The Consul adapter (ConsulSource, ConsulRegistrar, the trio py-consul transport) against the
Consul API double over real HTTP on loopback. Other "services" register with py-consul's own sync
client, as a team's existing tooling would.

Every change must arrive through a *blocking query wake-up* (``wait`` is 30 s, far longer than
the generous 10 s per-change bound), i.e. within one watch cycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import consul
import pytest
import trio

from meshd.errors import RegistryError
from registry.consul.registrar import ConsulRegistrar
from registry.consul.source import ConsulSource
from registry.model import Instance
from tests.doubles.consul import ConsulDouble
from tests.doubles.sink import RecordingSink

WAIT = 30.0  # seconds: the blocking wait; no test outcome may depend on it expiring


@pytest.fixture
def double() -> Iterator[ConsulDouble]:
    d = ConsulDouble(min_deregister_after=0.0)
    with d:
        yield d


def _source(d: ConsulDouble, **kw: object) -> ConsulSource:
    return ConsulSource("consul", address=d.url, wait=WAIT, rate_interval=0.05, retry_max=0.5, **kw)  # type: ignore[arg-type]


async def _reg(d: ConsulDouble, sid: str, name: str = "web", port: int = 8080, tags: list[str] | None = None,
               meta: dict[str, str] | None = None) -> None:
    c = consul.Consul(host="127.0.0.1", port=d.port)
    check = consul.Check.ttl("60s") | {"CheckID": f"service:{sid}", "Status": "passing"}
    ok = await trio.to_thread.run_sync(partial(c.agent.service.register, name, service_id=sid, port=port,
                                               tags=tags, meta=meta, check=check))
    assert ok


async def _check(d: ConsulDouble, sid: str, how: str) -> None:
    c = consul.Consul(host="127.0.0.1", port=d.port)
    assert await trio.to_thread.run_sync(getattr(c.agent.check, f"ttl_{how}"), f"service:{sid}")


async def test_add_change_health_remove_each_seen_within_one_cycle(double: ConsulDouble) -> None:
    double.add_node("vm-b", "10.0.0.6")
    double.register({"Name": "web", "ID": "web-b", "Address": "10.0.1.6", "Port": 9000,
                     "Tags": ["version=v1"], "Check": {"TTL": "60s", "Status": "passing"}}, node="vm-b")
    await _reg(double, "web-1", tags=["version=v1", "canary"], meta={"protocol": "http2"})
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(_source(double).watch, sink)
        await sink.seen(lambda v: set(v) == {"node1/web-1", "vm-b/web-b"})
        first = sink.last["node1/web-1"]
        assert first == Instance("web", "node1/web-1", "127.0.0.1", 8080, source="consul", protocol="http2",
                                 labels={"version": "v1", "canary": "true", "region": "dc1"})
        assert sink.last["vm-b/web-b"].address == "10.0.1.6"
        await _reg(double, "web-2", port=8081, tags=["version=v1"])                       # add
        await sink.seen(lambda v: "node1/web-2" in v)
        await _reg(double, "web-1", tags=["version=v2"], meta={"version": "v3"})          # labels
        await sink.seen(lambda v: v["node1/web-1"].labels == {"version": "v3", "region": "dc1"})
        await _check(double, "web-2", "fail")                                           # health
        await sink.seen(lambda v: "node1/web-2" not in v and "node1/web-1" in v)
        await _check(double, "web-2", "pass")
        await sink.seen(lambda v: "node1/web-2" in v)
        await _reg(double, "api-1", name="api", port=7000)                              # new service
        await sink.seen(lambda v: "node1/api-1" in v and len(v) == 4)
        c = consul.Consul(host="127.0.0.1", port=double.port)
        assert await trio.to_thread.run_sync(c.agent.service.deregister, "web-1")        # remove
        await sink.seen(lambda v: set(v) == {"vm-b/web-b", "node1/web-2", "node1/api-1"})
        n.cancel_scope.cancel()
    assert sink.errors == [] and all(sink.updates)
    health = [q for m, p, q in double.requests if p == "/v1/health/service/web"]
    assert health[0] == {"passing": "1"}                         # first read: no index
    assert all(q.get("wait") == "30s" and int(q["index"]) >= 1 and "passing" in q for q in health[1:])


async def test_service_error_then_outage_never_empty_and_resync(double: ConsulDouble) -> None:
    for sid, name in [("web-1", "web"), ("web-2", "web"), ("api-1", "api")]:
        await _reg(double, sid, name=name)
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(_source(double).watch, sink)
        await sink.seen(lambda v: len(v) == 3)
        good = sink.updates[-1]
        double.set_fail(service="web")                                   # one service answers 500
        await sink.until(lambda s: any(svc == "web" for _, svc in s.errors))
        assert sink.updates[-1] == good
        double.set_fail(service="web", on=False)
        await sink.until(lambda s: len(s.updates) >= 2)                  # recovery republishes
        assert sink.updates[-1] == good
        count = len(sink.updates)
        double.set_fail(all_requests=True)                               # whole registry fails
        await sink.until(lambda s: any(svc is None for _, svc in s.errors))
        double.set_fail(all_requests=False)
        await sink.until(lambda s: len(s.updates) > count)
        count = len(sink.updates)
        double.stop()                                                    # registry down
        errors = len(sink.errors)
        await sink.until(lambda s: len(s.errors) >= errors + 2)
        await trio.sleep(0.3)
        double.start()                                                   # back on the same port
        await sink.until(lambda s: len(s.updates) > count)
        during = len(sink.updates)
        await _reg(double, "web-3", name="web")                          # and watching again
        await sink.seen(lambda v: len(v) == 4)
        n.cancel_scope.cancel()
    assert all(i in good for u in sink.updates[:during] for i in u), "an error must never change the view"
    assert sink.omitted_only_failed(good)
    assert "No cluster leader" in "".join(m for m, _ in sink.errors)


async def test_index_going_backwards_resets_and_keeps_watching(double: ConsulDouble) -> None:
    for i in range(5):
        await _reg(double, f"web-{i}", port=8080 + i)
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(_source(double).watch, sink)
        await sink.seen(lambda v: len(v) == 5)
        before = len(double.requests)
        double.reset_index(to=3)                                         # snapshot restore
        await sink.until(lambda s: sum(1 for _m, p, q in double.requests[before:]
                                       if p == "/v1/health/service/web" and "index" not in q) >= 1)
        await _reg(double, "web-9", port=8099)
        await sink.seen(lambda v: "node1/web-9" in v)                    # seen long before WAIT
        n.cancel_scope.cancel()
    assert sink.errors == [] and all(len(u) >= 5 for u in sink.updates)
    after = [int(q["index"]) for _m, p, q in double.requests[before:] if p == "/v1/health/service/web"
             and "index" in q]
    assert after and min(after) >= 1 and after[-1] < 10                 # re-based on the new, low index


async def test_registrar_ttl_lapse_then_reap_then_reregister(double: ConsulDouble) -> None:
    reg = ConsulRegistrar(double.url, ttl=1.0, deregister_after=1.0)
    assert reg.heartbeat_interval == pytest.approx(1 / 3)
    inst = Instance("pay", "pay-1", "10.0.0.8", 15006, {"version": "v1", "mesh.zone": "z1"}, protocol="grpc")
    sink = RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(_source(double).watch, sink)
        await reg.register(inst)
        await sink.seen(lambda v: "node1/pay-1" in v)
        seen = sink.last["node1/pay-1"]
        assert (seen.address, seen.port, seen.protocol) == ("10.0.0.8", 15006, "grpc")
        assert seen.labels == {"version": "v1", "mesh.zone": "z1", "region": "dc1"}
        for _ in range(4):                                               # 1.3 s of heartbeats: stays
            await reg.heartbeat(inst)
            await trio.sleep(reg.heartbeat_interval)
        assert "node1/pay-1" in sink.last
        await sink.seen(lambda v: "node1/pay-1" not in v, timeout=8)      # no heartbeat: TTL -> critical
        reaped = lambda _s: "pay-1" not in {sid for _n, sid in double.services}  # noqa: E731
        await sink.until(reaped)                                           # DeregisterCriticalServiceAfter
        await reg.heartbeat(inst)                                          # 404 -> registers again
        await sink.seen(lambda v: "node1/pay-1" in v)
        await reg.deregister(inst)
        await sink.seen(lambda v: "node1/pay-1" not in v)
        await reg.deregister(inst)                                         # already gone: fine
        n.cancel_scope.cancel()
    assert sink.errors == []


async def test_cli_environment_address_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with ConsulDouble(acl_token="s3cr3t") as d:
        monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{d.port}")
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cr3t")
        inst = Instance("web", "w-1", "10.0.0.5", 15006)
        await ConsulRegistrar().register(inst)                             # both from the environment
        assert "w-1" in {sid for _n, sid in d.services}
        with pytest.raises(RegistryError):
            await ConsulRegistrar(token="wrong").register(inst)            # explicit wins, like the CLI
        monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
        await ConsulRegistrar(d.url).heartbeat(inst)                       # explicit address wins
        sink = RecordingSink()
        with trio.move_on_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(ConsulSource(address=d.url, token="wrong", retry_max=0.5).watch, sink)
                await sink.until(lambda s: len(s.errors) >= 1)
                n.cancel_scope.cancel()
        assert sink.updates == [] and "Permission denied" in sink.errors[0][0]


async def test_datacenter_services_filter_and_rate_limit(double: ConsulDouble) -> None:
    await _reg(double, "web-1")
    await _reg(double, "api-1", name="api", port=7000)
    wrong_dc, only_api = RecordingSink(), RecordingSink()
    async with trio.open_nursery() as n:
        n.start_soon(_source(double, datacenter="dc2").watch, wrong_dc)
        n.start_soon(ConsulSource("c2", address=double.url, datacenter="dc1", services=["api"], wait=WAIT,
                                  rate_interval=0.2).watch, only_api)
        await wrong_dc.until(lambda s: len(s.errors) >= 2)
        await only_api.seen(lambda v: set(v) == {"node1/api-1"})
        before = len(double.requests)

        def flap() -> None:                                   # 100 health changes in ~1 s
            for i in range(100):
                double.set_check("service:api-1", "critical" if i % 2 == 0 else "passing")
                time.sleep(0.01)

        start = trio.current_time()
        await trio.to_thread.run_sync(flap)
        span = trio.current_time() - start
        n.cancel_scope.cancel()
    assert wrong_dc.updates == [] and "No path to datacenter" in wrong_dc.errors[0][0]
    queries = sum(1 for _m, p, q in double.requests[before:] if p == "/v1/health/service/api" and "dc" in q)
    assert 1 <= queries <= 2 + span / 0.2 + 2, f"{queries} queries in {span:.2f} s: not rate-limited"
    assert all(i.service == "api" for u in only_api.updates for i in u)
