#!/usr/bin/env python3
"""Set-up and run commands for a fresh machine with only Python 3.11+.

    python3 dev.py demo    # create .venv, install meshd, run `meshd demo`
    python3 dev.py test    # create .venv, install meshd[test], run the test suite
    python3 dev.py bench   # run bench/run.py (needs haproxy and wrk: see bench/README.md)
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".installed"
TEST_WORKERS = os.environ.get("MESHD_TEST_WORKERS", "2")  # the suite takes ~12 min on one 2-vCPU worker


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py must run on any python3 to say so
        sys.exit(f"meshd needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    pyproject = ROOT / "pyproject.toml"
    if STAMP.exists() and STAMP.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   check=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"],
                   check=True)
    STAMP.touch()


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    rest = sys.argv[2:]
    if cmd not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    ensure_venv()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if cmd == "demo":
        args = [str(BIN / "meshd"), "demo", *rest]
    elif cmd == "test":
        # two workers, one test file each at a time (module fixtures start real meshes once)
        args = [str(BIN / "python"), "-m", "pytest", "-q", "-n", TEST_WORKERS, "--dist", "loadfile", *rest]
    else:
        args = [str(BIN / "python"), str(ROOT / "bench" / "run.py"), *rest]
    return subprocess.call(args, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
