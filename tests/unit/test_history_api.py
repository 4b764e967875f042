"""The rule-history API in-process (httpx ASGITransport on trio): history, revision, diff,
rollback, the author header and the error statuses."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from meshd.rules import validate as rv
from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore

E1 = b'[[egress]]\nname = "msgd"\nhost = "msgd.example"\nports = [80]\n'
E2 = b'[[egress]]\nname = "msgd"\nhost = "msgd.example"\nports = [80, 8080]\n'
BAD = '[[route]]\nname = "svcb"\nhost = "svcb"\n[[route.http]]\ndestinations = [{ subset = "v3" }]\n'


def _cp(path: Path) -> ControlPlane:
    cp = ControlPlane(SqliteStore(path))
    cp.start()
    return cp


@pytest.fixture
async def cp(tmp_path: Path) -> ControlPlane:
    return _cp(tmp_path)


def _client(cp: ControlPlane, author: str | bytes = "") -> httpx.AsyncClient:
    headers = {"x-meshd-author": author} if author else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(cp)),
                             base_url="http://meshd", headers=headers)


async def _push_two(cp: ControlPlane) -> None:
    async with _client(cp, "alice@h1") as c:
        assert (await c.post("/v1/rules", content=E1, params={"file": "e1.toml"})).status_code == 200
    async with _client(cp, "Jos%C3%A9@h2") as c:  # what the CLI sends for a non-ASCII name
        assert (await c.post("/v1/rules", content=E2, params={"file": "e2.toml"})).status_code == 200


async def test_history_lists_revisions_with_authors(cp: ControlPlane) -> None:
    await _push_two(cp)
    async with _client(cp, "José\x07@h3".encode()) as c:  # raw UTF-8, a control character
        assert (await c.delete("/v1/rules/egress/msgd")).status_code == 200
        body = (await c.get("/v1/rules/history")).json()
        assert body["revision"] == 3
        assert [(e["revision"], e["action"], e["file"], e["author"], e["changes"])
                for e in body["history"]] == [
            (3, "delete", "<cli>", "José@h3", [["delete", "egress", "msgd"]]),
            (2, "push", "e2.toml", "José@h2", [["update", "egress", "msgd"]]),
            (1, "push", "e1.toml", "alice@h1", [["create", "egress", "msgd"]]),
        ]
        one = (await c.get("/v1/rules/history", params={"limit": "1"})).json()["history"]
        assert [e["revision"] for e in one] == [3]
        for bad in ("0", "-1", "x", "1001"):
            assert (await c.get("/v1/rules/history", params={"limit": bad})).status_code == 400


async def test_rule_set_at_a_revision(cp: ControlPlane) -> None:
    await _push_two(cp)
    async with _client(cp) as c:
        got = (await c.get("/v1/rules/history/1")).json()
        assert got["revision"] == 1 and got["sources"] == {"egress/msgd": "e1.toml"}
        assert got["rules"]["egress"] == [{"name": "msgd", "host": "msgd.example", "ports": [80]}]
        assert got["entry"]["author"] == "alice@h1"
        assert (await c.get("/v1/rules/history/0")).json()["rules"] == {}
        assert (await c.get("/v1/rules/history/3")).status_code == 404


async def test_diff(cp: ControlPlane) -> None:
    await _push_two(cp)
    async with _client(cp) as c:
        d = (await c.get("/v1/rules/diff", params={"from": "1", "to": "2"})).json()
        assert d["changes"] == [["update", "egress", "msgd"]]
        assert "-ports = [80]\n+ports = [80, 8080]\n" in d["diff"]
        live = (await c.get("/v1/rules/diff", params={"from": "1"})).json()
        assert live["to"] == 2 and live["diff"] == d["diff"]
        assert (await c.get("/v1/rules/diff")).status_code == 400
        assert (await c.get("/v1/rules/diff", params={"from": "one"})).status_code == 400
        missing = await c.get("/v1/rules/diff", params={"from": "1", "to": "9"})
        assert missing.status_code == 404 and missing.json()["error"] == "no rule revision 9"


async def test_rollback(cp: ControlPlane) -> None:
    await _push_two(cp)
    async with _client(cp, "carol") as c:
        r = await c.post("/v1/rules/rollback/1")
        assert r.status_code == 200
        assert r.json()["changes"] == [["update", "egress", "msgd"]] and r.json()["revision"] == 3
        assert (await c.get("/v1/rules/egress/msgd")).json()["ports"] == [80]
        entry = (await c.get("/v1/rules/history", params={"limit": "1"})).json()["history"][0]
        assert (entry["action"], entry["file"], entry["author"]) == ("rollback", "rollback to 1",
                                                                    "carol")
        assert (await c.post("/v1/rules/rollback/7")).status_code == 404
        assert (await c.get("/v1/rules/rollback/1")).status_code in (404, 405)


async def test_rollback_to_an_invalid_revision_is_400(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    store.save_rules(rv.decode(BAD), {}, "push", "bad.toml", [])  # as a looser meshd might have
    store.save_rules(rv.decode(E1.decode()), {}, "push", "e1.toml", [])
    store.close()
    cp = _cp(tmp_path)
    async with _client(cp) as c:
        r = await c.post("/v1/rules/rollback/1")
        assert r.status_code == 400 and r.json()["error"] == "rollback to 1 rejected"
        assert r.json()["errors"][0]["file"] == "rollback to 1"
        assert "subset \"v3\" is not defined" in r.json()["errors"][0]["reason"]
    assert cp.revision == 2 and len(cp.store.history()) == 2
