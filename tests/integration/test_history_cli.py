"""``meshd rule history / diff / rollback`` end to end: real meshd, a real sidecar, the CLI as a
subprocess. The rolled-back rules must reach the sidecar (SYNCED) and the history must survive
a meshd crash and restart."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.demo.harness import MeshHarness, wait_until

pytestmark = pytest.mark.slow

R1 = """\
[[egress]]
name = "ext"
host = "ext.example"
ports = [80]
"""
R2 = """\
[[egress]]
name = "ext"
host = "ext.example"
ports = [80, 8080]

[[egress]]
name = "ext2"
host = "two.example"
ports = [443]
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshHarness]:
    h = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        yield h
    finally:
        h.close()


def _ok(mesh: MeshHarness, *args: str) -> list[str]:
    out = mesh.cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _egress(mesh: MeshHarness, node: str) -> list[tuple[str, list[int]]]:
    snap = mesh.admin_json(node, "/config_dump")["snapshot"]
    return [(e["host"], e["ports"]) for e in snap["egress"]]  # type: ignore[index]


def test_history_diff_rollback_reach_the_sidecar(mesh: MeshHarness, tmp_path: Path) -> None:
    mesh.add_service("client-1", "client", None, {"version": "v1"})
    mesh.wait_ready()
    (tmp_path / "r1.toml").write_text(R1)
    (tmp_path / "r2.toml").write_text(R2)
    assert "revision 1" in _ok(mesh, "rule", "push", "--author", "alice@ops",
                               str(tmp_path / "r1.toml"))
    assert "revision 2" in _ok(mesh, "rule", "push", str(tmp_path / "r2.toml"))
    wait_until(lambda: len(_egress(mesh, "client-1")) == 2, 10, "client-1 has revision 2")

    history = _ok(mesh, "rule", "history")
    assert history[0].split() == ["REV", "TIME", "AUTHOR", "ACTION", "FILE", "CHANGES"]
    rev2, rev1 = history[1].split(), history[2].split()
    assert rev2[0] == "2" and rev2[3:5] == ["push", str(tmp_path / "r2.toml")]
    assert "@" in rev2[2] and rev2[5:] == ["~egress/ext", "+egress/ext2"]
    assert rev1[0] == "1" and rev1[2] == "alice@ops" and rev1[5:] == ["+egress/ext"]

    diff = _ok(mesh, "rule", "diff", "1", "2")
    assert diff[:3] == ["--- egress/ext @1", "+++ egress/ext @2", "@@ -1,4 +1,4 @@"]
    assert "-ports = [80]" in diff and "+ports = [80, 8080]" in diff
    assert "+host = \"two.example\"" in diff

    rolled = _ok(mesh, "rule", "rollback", "1", "--author", "bob@ops")
    assert rolled[:3] == ["egress/ext updated", "egress/ext2 deleted", "revision 3 (rollback to 1)"]
    wait_until(lambda: _egress(mesh, "client-1") == [("ext.example", [80])], 10,
               "client-1 has the rolled-back rules")
    mesh.wait_synced()
    assert _ok(mesh, "rule", "diff", "1") == ["no differences between revisions 1 and 3"]

    missing = mesh.cli("rule", "rollback", "9")
    assert missing.returncode == 1 and "no rule revision 9" in missing.stderr

    mesh.stop_meshd(signal.SIGKILL)  # a crash: every accepted revision was committed
    mesh.start_meshd()
    after = _ok(mesh, "rule", "history", "--limit", "1")
    assert len(after) == 2 and after[1].split()[:5:2] == ["3", "bob@ops", "rollback"]
    assert _ok(mesh, "rule", "list") == [f"egress/ext\text.example\t{tmp_path / 'r1.toml'}"]
