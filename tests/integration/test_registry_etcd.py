"""etcd adapter against a real etcd 3.4 (Debian): watch, registrar leases, a killed registrar."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import httpx
import msgspec
import trio

from registry.etcd import source as etcd_source
from registry.etcd.convert import b64
from registry.etcd.registrar import EtcdRegistrar
from registry.etcd.source import EtcdSource
from registry.model import Instance

TTL = 2.0  # seconds; etcd's minimum lease TTL with default timing is 1.5 s

KILLED_REGISTRAR = textwrap.dedent("""
    import sys, trio
    from registry.etcd.registrar import EtcdRegistrar
    from registry.model import Instance

    async def main():
        inst = Instance("api", "api-9", "10.0.0.9", 8080, {"version": "v9"}, ttl=float(sys.argv[2]))
        reg = EtcdRegistrar([sys.argv[1]], ttl=inst.ttl)
        await reg.register(inst)
        print("registered", flush=True)
        while True:
            await trio.sleep(reg.heartbeat_interval)
            await reg.heartbeat(inst)

    trio.run(main)
""")


async def test_watch_sees_add_change_remove_and_lease_expiry(etcd, merged_view) -> None:
    view = merged_view(["etcd"])
    src = EtcdSource("etcd", [etcd.url])
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        nursery.start_soon(src.watch, view.sink("etcd"))
        await view.until(lambda: view.merger.sources["etcd"].synced)
        reg = EtcdRegistrar([etcd.url], ttl=TTL, client=client)
        a1 = Instance("api", "api-1", "10.0.0.1", 8080, {"version": "v1"}, ttl=TTL, protocol="http")
        await reg.register(a1)
        await view.until(lambda: view.ids() == {"api-1"})
        got = view.get("api-1")
        assert got is not None and got.labels == {"version": "v1"} and got.protocol == "http"

        a1v2 = msgspec.structs.replace(a1, labels={"version": "v2"})
        await reg.register(a1v2)  # a new lease and value: a change, not a removal
        await view.until(lambda: (i := view.get("api-1")) is not None and i.labels["version"] == "v2")

        for _ in range(5):  # keepalive every ttl/3 holds the key well past one TTL
            await reg.heartbeat(a1v2)
            await trio.sleep(reg.heartbeat_interval)
        assert view.ids() == {"api-1"}

        await reg.deregister(a1v2)  # lease revoked: etcd deletes the key
        await view.until(lambda: view.ids() == set())

        proc = await trio.lowlevel.open_process([sys.executable, "-c", KILLED_REGISTRAR, etcd.url,
                                                 str(TTL)], stdout=subprocess.DEVNULL)
        try:
            await view.until(lambda: view.ids() == {"api-9"}, within=30)
            proc.send_signal(signal.SIGKILL)  # no deregistration: only the lease can remove it
            await proc.wait()
            gone_after = await view.until(lambda: view.ids() == set(), within=TTL + 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        print(f"killed registrar: removed {gone_after:.2f}s after SIGKILL (lease TTL {TTL}s)")
        assert not view.stale("etcd") and src.rounds == 1  # one listing, the watch did the rest
        nursery.cancel_scope.cancel()


async def test_heartbeat_reregisters_when_the_lease_is_gone(etcd, merged_view) -> None:
    view = merged_view(["etcd"])
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        nursery.start_soon(EtcdSource("etcd", [etcd.url]).watch, view.sink("etcd"))
        reg = EtcdRegistrar([etcd.url], ttl=TTL, client=client)
        inst = Instance("db", "db-1", "10.0.0.5", 5432, ttl=TTL)
        await reg.register(inst)
        await view.until(lambda: view.ids() == {"db-1"})
        resp = await client.post(f"{etcd.url}/v3/lease/revoke", json={"ID": reg.lease})
        resp.raise_for_status()  # etcd forgets the lease (as after a partition longer than TTL)
        await view.until(lambda: view.ids() == set())
        await reg.heartbeat(inst)  # keepalive answers without TTL -> register again
        await view.until(lambda: view.ids() == {"db-1"})
        nursery.cancel_scope.cancel()


async def test_bad_value_is_an_error_of_its_service_only(etcd, merged_view) -> None:
    view = merged_view(["etcd"])
    async with httpx.AsyncClient(base_url=etcd.url) as client, trio.open_nursery() as nursery:
        nursery.start_soon(EtcdSource("etcd", [etcd.url]).watch, view.sink("etcd"))
        reg = EtcdRegistrar([etcd.url], ttl=30, client=client)
        await reg.register(Instance("db", "db-1", "10.0.0.5", 5432, ttl=30))
        await reg.register(Instance("web", "web-1", "10.0.0.6", 80, ttl=30))
        await view.until(lambda: view.ids() == {"db-1", "web-1"})
        key = b64("/meshd/services/db/db-1")
        (await client.post("/v3/kv/put", json={"key": key, "value": b64("{broken")})).raise_for_status()
        st = view.merger.sources["etcd"]
        await view.until(lambda: "db" in st.stale_services)
        assert view.ids() == {"db-1", "web-1"} and st.stale is None  # last good db-1 kept
        await reg.register(Instance("web", "web-2", "10.0.0.7", 80, ttl=30))
        await view.until(lambda: view.ids() == {"db-1", "web-1", "web-2"})
        assert "db" in st.stale_services  # still bad: still stale after another update
        await reg.register(Instance("db", "db-1", "10.0.0.8", 5432, ttl=30))  # fixed value
        await view.until(lambda: (i := view.get("db-1")) is not None and i.address == "10.0.0.8")
        assert "db" not in st.stale_services
        nursery.cancel_scope.cancel()


async def test_watch_cancelled_by_compaction_relists(etcd, merged_view, monkeypatch) -> None:
    """The first range read is made to report an old revision, so the watch starts below
    etcd's compaction point: etcd cancels it (compact_revision) and the source relists."""
    async with httpx.AsyncClient(base_url=etcd.url) as client:
        reg = EtcdRegistrar([etcd.url], ttl=30, client=client)
        for n in range(3):
            await reg.register(Instance("api", f"api-{n}", f"10.0.0.{n}", 80, ttl=30))
        rev = int((await client.post("/v3/kv/range", json={"key": b64("x")})).json()["header"]["revision"])
        (await client.post("/v3/kv/compaction", json={"revision": str(rev)})).raise_for_status()
    calls = []

    def stale_first(body, prefix, source):  # type: ignore[no-untyped-def]
        batch = real(body, prefix, source)
        calls.append(batch.revision)
        if len(calls) == 1:
            batch.revision = 1  # as if etcd compacted between our read and our watch
        return batch

    real = etcd_source.parse_range
    monkeypatch.setattr(etcd_source, "parse_range", stale_first)
    view, src = merged_view(["etcd"]), EtcdSource("etcd", [etcd.url])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(src.watch, view.sink("etcd"))
        await view.until(lambda: src.relists == 1 and src.rounds == 2)
        assert view.ids() == {"api-0", "api-1", "api-2"} and not view.stale("etcd")
        nursery.cancel_scope.cancel()
