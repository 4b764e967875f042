"""meshd's HTTP API in-process (httpx ASGITransport on trio): status codes, auth, long-poll."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore

RULES = b'[[egress]]\nname = "msgd"\nhost = "msgd.example"\nports = [80]\n'


@pytest.fixture
async def cp(tmp_path: Path) -> ControlPlane:
    cp = ControlPlane(SqliteStore(tmp_path))
    cp.start()
    return cp


def _client(cp: ControlPlane, token: str = "", auth: str = "") -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {auth}"} if auth else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(cp, token)),
                             base_url="http://meshd", headers=headers)


async def test_registry_lifecycle(cp: ControlPlane) -> None:
    async with _client(cp) as c:
        inst = {"service": "svcb", "instance_id": "b1", "address": "127.0.0.1", "port": 15006,
                "labels": {"version": "v1"}, "ttl": 5}
        assert (await c.post("/v1/registry/instances", json=inst)).status_code == 200
        assert (await c.post("/v1/registry/instances", json={**inst, "port": 0})).status_code == 400
        assert (await c.post("/v1/registry/instances", json={"bogus": 1})).status_code == 400
        assert (await c.put("/v1/registry/instances/b1/heartbeat")).status_code == 200
        assert (await c.put("/v1/registry/instances/zz/heartbeat")).status_code == 404
        svcs = (await c.get("/v1/registry/services")).json()["services"]
        assert svcs[0]["name"] == "svcb" and svcs[0]["instances"][0]["labels"] == {"version": "v1"}
        assert (await c.delete("/v1/registry/instances/b1")).status_code == 200
        assert (await c.delete("/v1/registry/instances/b1")).status_code == 404


async def test_rules_push_get_delete(cp: ControlPlane) -> None:
    async with _client(cp) as c:
        dry = await c.post("/v1/rules", content=RULES, params={"file": "e.toml", "dry_run": "1"})
        assert dry.json()["changes"] == [["create", "egress", "msgd"]] and cp.rules.egress == []
        assert (await c.post("/v1/rules", content=RULES, params={"file": "e.toml"})).status_code == 200
        got = await c.get("/v1/rules/egress/msgd")
        assert got.json() == {"name": "msgd", "host": "msgd.example", "ports": [80]}
        bad = await c.post("/v1/rules", content=b"[[egress]]\nname = 3\n", params={"file": "x.toml"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["file"] == "x.toml"
        assert (await c.post("/v1/rules", content=b"\xff\xfe")).status_code == 400
        assert (await c.get("/v1/rules/route/nope")).status_code == 404
        assert (await c.delete("/v1/rules/egress/msgd")).status_code == 200
        assert (await c.delete("/v1/rules/egress/msgd")).status_code == 404


async def test_long_poll_returns_304_then_200_on_change(cp: ControlPlane) -> None:
    async with _client(cp) as c:
        first = await c.get("/v1/snapshot/n1", params={"outbound_port": "15001"})
        version = first.json()["version"]
        with trio.fail_after(5):
            unchanged = await c.get("/v1/snapshot/n1", params={
                "version": f"{version[0]}.{version[1]}", "wait": "0.2", "outbound_port": "15001"})
        assert unchanged.status_code == 304
        got: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:
            async def poll() -> None:
                got.append(await c.get("/v1/snapshot/n1", params={
                    "version": f"{version[0]}.{version[1]}", "wait": "5",
                    "outbound_port": "15001"}))
            nursery.start_soon(poll)
            await trio.sleep(0.05)
            await c.post("/v1/rules", content=RULES)
        assert got[0].status_code == 200 and got[0].json()["version"] != version
        assert got[0].json()["egress"][0]["host"] == "msgd.example"
        ack = await c.post("/v1/snapshot/n1/ack", json={"version": "x", "error": "boom"})
        assert ack.status_code == 200
        status = (await c.get("/v1/proxy-status")).json()["proxies"][0]
        assert status["nacked"] == "x" and status["nack_reason"] == "boom"


async def test_join_token_required_when_configured(cp: ControlPlane) -> None:
    async with _client(cp, token="s3cret") as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/v1/registry/services")).status_code == 401
    async with _client(cp, token="s3cret", auth="wrong") as c:
        assert (await c.get("/v1/rules")).status_code == 401
    async with _client(cp, token="s3cret", auth="s3cret") as c:
        assert (await c.get("/v1/rules")).status_code == 200
