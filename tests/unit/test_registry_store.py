"""Built-in registry TTL semantics (driven clock) and the SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.errors import ConfigError
from meshd.rules.schema import EgressRule, RulesFile
from meshd.store.sqlite import SqliteStore
from registry.builtin import BuiltinRegistry
from registry.model import Instance


def _inst(iid: str = "b1", ttl: float = 3.0) -> Instance:
    return Instance("svcb", iid, "127.0.0.1", 15006, {"version": "v1"}, ttl=ttl)


def test_instance_expires_within_one_ttl_without_heartbeat() -> None:
    reg = BuiltinRegistry()
    assert reg.register(_inst(), now=100.0)
    assert reg.expire(102.9) == []
    assert reg.heartbeat("b1", now=102.9)
    assert reg.expire(105.8) == []          # renewed at 102.9 -> lease to 105.9
    assert [i.instance_id for i in reg.expire(106.0)] == ["b1"]
    assert reg.instances() == [] and not reg.heartbeat("b1", now=106.0)


def test_reregister_same_instance_is_not_a_change() -> None:
    reg = BuiltinRegistry()
    assert reg.register(_inst(), 0.0)
    assert not reg.register(_inst(), 1.0)
    assert reg.register(Instance("svcb", "b1", "127.0.0.1", 15007, ttl=3.0), 2.0)


@pytest.mark.parametrize("inst", [_inst(ttl=0.1), Instance("svcb", "x", "h", 0)])
def test_register_rejects_bad_instances(inst: Instance) -> None:
    with pytest.raises(ConfigError):
        BuiltinRegistry().register(inst, 0.0)


def test_restore_gives_a_fresh_lease() -> None:
    reg = BuiltinRegistry()
    reg.restore([_inst()], now=50.0)
    assert reg.expire(52.0) == [] and len(reg.expire(53.5)) == 1


def test_store_epoch_rules_and_instances_survive_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path)
    assert s.next_epoch() == 1
    rules = RulesFile(egress=[EgressRule(name="msgd", host="msgd.example")])
    rev = s.save_rules(rules, {"egress/msgd": "a.toml"}, "push", "a.toml", [("create", "egress", "msgd")])
    s.put_instance(_inst())
    s.close()
    s = SqliteStore(tmp_path)
    assert s.next_epoch() == 2
    stored = s.load_rules()
    assert stored.rules == rules and stored.sources == {"egress/msgd": "a.toml"}
    assert stored.revision == rev == 1
    assert [i.instance_id for i in s.load_instances()] == ["b1"]
    assert s.history()[0].changes == [("create", "egress", "msgd")]
    s.delete_instance("b1")
    assert s.load_instances() == []
    s.close()


def test_store_refuses_newer_schema(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path)
    s._db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    s.close()
    with pytest.raises(ConfigError, match="newer"):
        SqliteStore(tmp_path)
