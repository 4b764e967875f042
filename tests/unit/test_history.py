"""Rule history and rollback: ControlPlane + SqliteStore in tmp_path, no sockets.

Revisions, authors, restart survival, per-rule diffs (and their TOML rendering), refused
rollbacks, and the in-place migration of a schema-1 store.
"""

from __future__ import annotations

import sqlite3
import tomllib
from pathlib import Path

import msgspec
import pytest

from meshd.errors import RuleValidationError
from meshd.rules import validate as rv
from meshd.rules.schema import RulesFile
from meshd.server.control import ControlPlane
from meshd.server.rulediff import rule_toml
from meshd.snapshot.compile import NodeInfo
from meshd.store.sqlite import SqliteStore

A = """\
[[destination]]
name = "svcb"
host = "svcb"
subsets = [
  { name = "v1", labels = { version = "v1" } },
  { name = "v2", labels = { version = "v2" } },
]

[[route]]
name = "svcb"
host = "svcb"
[[route.http]]
destinations = [{ subset = "v1" }]
"""
B = """\
[[route]]
name = "svcb"
host = "svcb"
[[route.http]]
destinations = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]

[[egress]]
name = "msgd"
host = "msgd.example"
ports = [80]
"""
DIFF_1_2 = """\
--- route/svcb @1
+++ route/svcb @2
@@ -2,4 +2,4 @@
 name = "svcb"
 host = "svcb"
 [[route.http]]
-destinations = [{ subset = "v1" }]
+destinations = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
--- egress/msgd @1
+++ egress/msgd @2
@@ -0,0 +1,4 @@
+[[egress]]
+name = "msgd"
+host = "msgd.example"
+ports = [80]
"""


def _open(path: Path) -> ControlPlane:
    cp = ControlPlane(SqliteStore(path), clock=lambda: 1000.0)
    cp.start()
    return cp


@pytest.fixture
async def cp(tmp_path: Path) -> ControlPlane:
    """Revisions 1 = A (alice), 2 = B (bob), 3 = egress/msgd deleted (bob)."""
    cp = _open(tmp_path)
    cp.push_rules(A, "a.toml", author="alice@h1")
    cp.push_rules(B, "b.toml", author="bob@h2")
    cp.delete_rule("egress", "msgd", author="bob@h2")
    return cp


async def test_rollback_is_a_new_revision_with_the_old_rules(cp: ControlPlane) -> None:
    cp.subscribe(NodeInfo(node="n1", outbound_port=15001))
    result = cp.rollback(1, author="carol@h3")
    assert result["changes"] == [["update", "route", "svcb"]]
    assert result["revision"] == 4 and result["target"] == 1 and cp.revision == 4
    one = cp.rules_at(1)
    assert cp.rules == one.rules and cp.sources == one.sources == {
        "destination/svcb": "a.toml", "route/svcb": "a.toml"}
    assert cp.store.load_rules().rules == one.rules
    entries = [(e.revision, e.action, e.file, e.author, e.changes) for e in cp.store.history()]
    assert entries == [
        (4, "rollback", "rollback to 1", "carol@h3", [("update", "route", "svcb")]),
        (3, "delete", "<cli>", "bob@h2", [("delete", "egress", "msgd")]),
        (2, "push", "b.toml", "bob@h2", [("update", "route", "svcb"), ("create", "egress", "msgd")]),
        (1, "push", "a.toml", "alice@h1", [("create", "route", "svcb"),
                                           ("create", "destination", "svcb")]),
    ]
    snap = cp.cache.get("n1").snapshot
    assert str(snap.version) == result["version"]
    (vhost,) = [v for v in snap.virtual_hosts if v.host == "svcb"]
    assert [c.cluster for r in vhost.routes for c in r.clusters] == ["outbound|v1|svcb"]


async def test_rollback_to_the_live_rules_stores_nothing(cp: ControlPlane) -> None:
    cp.rollback(2)
    version = cp.version
    again = cp.rollback(4)  # revision 4 == revision 2 == live
    assert again == {"changes": [], "target": 4, "revision": 4, "version": str(version)}
    assert len(cp.store.history()) == 4 and cp.version == version


async def test_unknown_revision_is_a_key_error(cp: ControlPlane) -> None:
    for rev in (-1, 4, 10**30):
        with pytest.raises(KeyError):
            cp.rollback(rev)
        with pytest.raises(KeyError):
            cp.rule_diff(1, rev)
    assert cp.revision == 3


async def test_history_survives_reopening_the_store(cp: ControlPlane, tmp_path: Path) -> None:
    cp.rollback(1, author="carol@h3")
    before = cp.store.history()
    cp.store.close()
    cp2 = _open(tmp_path)
    assert cp2.revision == 4 and cp2.store.history() == before
    assert cp2.rules == cp2.rules_at(1).rules and cp2.rules_at(2).rules.egress[0].name == "msgd"
    assert cp2.rollback(2, author="dave")["revision"] == 5
    assert cp2.store.history(limit=1)[0].author == "dave"


async def test_diff_between_revisions_rule_by_rule(cp: ControlPlane) -> None:
    d = cp.rule_diff(1, 2)
    assert d["from"] == 1 and d["to"] == 2
    assert d["changes"] == [["update", "route", "svcb"], ["create", "egress", "msgd"]]
    assert d["diff"] == DIFF_1_2
    live = cp.rule_diff(2)  # to defaults to the live revision
    assert live["to"] == 3 and live["changes"] == [["delete", "egress", "msgd"]]
    assert live["diff"].splitlines()[:3] == ["--- egress/msgd @2", "+++ egress/msgd @3",
                                             "@@ -1,4 +0,0 @@"]
    assert cp.rule_diff(3, 3) == {"from": 3, "to": 3, "changes": [], "diff": ""}
    assert cp.rule_diff(0, 1)["changes"] == [["create", "route", "svcb"],
                                             ["create", "destination", "svcb"]]


async def test_rollback_to_an_invalid_state_is_refused(tmp_path: Path) -> None:
    """A revision stored by a looser meshd (here: written straight to the store) that today's
    validation rejects is refused whole; nothing changes."""
    store = SqliteStore(tmp_path)
    good = rv.decode(A)
    bad = rv.decode('[[route]]\nname = "svcc"\nhost = "svcc"\n'
                    '[[route.http]]\ndestinations = [{ subset = "v3" }]\n')
    store.save_rules(good, {}, "push", "a.toml", [])
    store.save_rules(bad, {}, "push", "bad.toml", [])
    store.save_rules(good, {}, "push", "a.toml", [])
    store.close()
    cp = _open(tmp_path)
    version, history = cp.version, cp.store.history()
    with pytest.raises(RuleValidationError) as err:
        cp.rollback(2, author="eve")
    assert [str(e) for e in err.value.errors] == [
        'rollback to 2: route[0].http[0].destinations[0].subset: subset "v3" is not defined '
        'by any destination rule for host "svcc"']
    assert cp.version == version and cp.store.history() == history and cp.rules == good


async def test_old_schema_store_is_migrated(tmp_path: Path) -> None:
    """A schema-1 file (no ``author`` column) opens, keeps its history, and records authors."""
    db = sqlite3.connect(tmp_path / "meshd.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE rules (id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL,
                            revision INTEGER NOT NULL);
        CREATE TABLE rule_history (revision INTEGER PRIMARY KEY, at REAL NOT NULL,
            action TEXT NOT NULL, file TEXT NOT NULL, changes BLOB NOT NULL, body BLOB NOT NULL);
        CREATE TABLE instances (id TEXT PRIMARY KEY, body BLOB NOT NULL);
        INSERT INTO meta VALUES ('schema', '1'), ('epoch', '7');
    """)
    body = msgspec.json.encode({"rules": rv.decode(A), "sources": {"route/svcb": "a.toml"}})
    db.execute("INSERT INTO rule_history VALUES (1, 1700000000.5, 'push', 'a.toml', ?, ?)",
               (b'[["create","route","svcb"],["create","destination","svcb"]]', body))
    db.execute("INSERT INTO rules VALUES (1, ?, 1)", (body,))
    db.commit()
    db.close()

    cp = _open(tmp_path)
    assert cp.epoch == 8 and cp.revision == 1 and cp.rules == rv.decode(A)
    (old,) = cp.store.history()
    assert (old.revision, old.at, old.author, old.file) == (1, 1700000000.5, "", "a.toml")
    assert cp.push_rules(B, "b.toml", author="alice")["revision"] == 2
    assert cp.rollback(1, author="bob")["revision"] == 3
    cp.store.close()
    cp = _open(tmp_path)  # opening a migrated file again changes nothing
    assert [(e.revision, e.author) for e in cp.store.history()] == [(3, "bob"), (2, "alice"), (1, "")]
    assert cp.store._meta("schema") == "3"  # type: ignore[attr-defined]


def test_rule_toml_round_trips() -> None:
    rules = msgspec.convert({
        "route": [{"name": "r", "host": "svcb", "http": [
            {"name": "beta",
             "match": [{"headers": {"x-beta": {"exact": "1"}, "odd key": {"prefix": "\x7f\"\\"}},
                        "path": {"prefix": "/api"}},
                       {"method": {"regex": "GET|HEAD"}}],
             "destinations": [{"subset": "v2", "weight": 50}, {"host": "other", "weight": 50}]},
            {"destinations": [{"subset": "v1"}]}]}],
        "destination": [{"name": "d", "host": "svcb", "load_balancer": "least_request",
                         "subsets": [{"name": f"v{i}", "labels": {"version": f"v{i}", "zone": "é"}}
                                     for i in range(4)]}],
        "egress": [{"name": "e", "host": "api.example", "ports": [443, 8443],
                    "endpoints": ["10.0.0.1:443"]}],
    }, RulesFile)
    for kind in ("route", "destination", "egress"):
        for rule in getattr(rules, kind):
            text = "\n".join(rule_toml(kind, rule))
            assert msgspec.convert(tomllib.loads(text), RulesFile) == RulesFile(**{kind: [rule]}), text
    assert rule_toml("route", rules.route[0])[:4] == ["[[route]]", 'name = "r"', 'host = "svcb"',
                                                      "[[route.http]]"]
