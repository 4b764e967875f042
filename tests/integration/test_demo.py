"""The README's main job: ``meshd demo`` runs steps (a)-(e) as real processes and exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_exits_zero_having_shown_every_step() -> None:
    out = subprocess.run([sys.executable, "-m", "meshd.cli.main", "demo"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for marker in ("== (a)", "== (b)", "== (c)", "== (d)", "== (e)", "== (f)",
                   "iPhone: 200/200 reached v2", "answered 403 RBAC",
                   "demo passed"):
        assert marker in text, text
    assert "FAIL" not in text
