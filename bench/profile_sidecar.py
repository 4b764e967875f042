"""Profile a sidecar under full load with py-spy and print its hot spots.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_sidecar.py [--target "sidecar x1"] [--duration 10] [--svg out.svg]

Starts the same processes as ``run.py``, drives the chosen target with ``wrk -t1 -c16`` while
``py-spy record --format raw`` samples the sidecar (the origin sidecar for ``sidecar x1``, the
client sidecar for ``sidecar x2``), then prints the functions with the most samples: "self"
(on top of the stack) and "total" (anywhere in the stack, counted once per sample).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import procinfo
from loadgen import WrkResult, run_wrk, write_script
from report import ONE, TWO
from run import Bench, Options


def hot_spots(collapsed: str, top: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(self, total, samples) from py-spy's collapsed stacks (``frame;frame;... count``)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    return own.most_common(top), total.most_common(top), samples


def record(pid: int, seconds: float, out: Path, fmt: str, gil: bool) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (needs ptrace rights: root here)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = [py_spy, "record", "-p", str(pid), "-d", str(round(seconds)), "-r", "250",
            "--nonblocking", "--nolineno", "-f", fmt, "-o", str(out), *(["--gil"] if gil else [])]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def print_report(collapsed: str, top: int) -> None:
    """Print the ``top`` frames by self and by inclusive samples, in percent of all samples."""
    own, total, samples = hot_spots(collapsed, top)
    for title, rows in (("self", own), ("total (inclusive)", total)):
        print(f"\ntop {top} by {title}, {samples} samples")
        for frame, n in rows:
            print(f"  {100 * n / max(1, samples):5.1f}%  {frame}")


def cost_per_request(pid: int, work: Callable[[], WrkResult]) -> tuple[WrkResult, float, float]:
    """Run ``work``; return its result and ``pid``'s user and system CPU µs per request."""
    user0, sys0 = procinfo.cpu_split(pid)
    result = work()
    user1, sys1 = procinfo.cpu_split(pid)
    n = max(1, result.requests)
    return result, (user1 - user0) * 1e6 / n, (sys1 - sys0) * 1e6 / n


def profile(bench: Bench, target: str, seconds: float, svg: Path | None, raw: Path | None,
            top: int, gil: bool) -> None:
    """Start the stack, load ``target`` for ``seconds`` while py-spy samples, print hot spots.

    A first run without py-spy measures the sidecar's user and system CPU per request.
    """
    role = "origin-sidecar" if target == ONE else "client-sidecar"
    bench.start()
    pid, workdir, conns = bench.pids[role], bench.workdir, bench.opts.connections
    script = write_script(workdir, None)
    res, user, system = cost_per_request(
        pid, lambda: run_wrk(bench.targets[target], script, seconds, conns))
    print(f"{role} (pid {pid}) under wrk -t1 -c{conns} on {target}: {res.rps:.0f} req/s, "
          f"CPU per request: user {user:.0f} µs + system {system:.0f} µs (no profiler attached)")
    raw = raw or workdir / "profile.txt"
    spies = [record(pid, seconds, raw, "raw", gil)]
    if svg is not None:
        spies.append(record(pid, seconds, svg, "flamegraph", gil))
    load = threading.Thread(target=run_wrk, args=(bench.targets[target], script, seconds + 2, conns))
    load.start()
    for spy in spies:
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
    load.join(timeout=seconds + 60)
    print_report(raw.read_text(), top)


def main() -> int:
    """Command line: profile one sidecar target, always stopping every process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=(ONE, TWO), default=ONE)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--svg", type=Path, default=None, help="also write a flame graph")
    p.add_argument("--raw", type=Path, default=None, help="keep the collapsed stacks here")
    p.add_argument("--wall", action="store_true",
                   help="sample threads in syscalls too (default: only while holding the GIL, "
                        "i.e. Python CPU time; wall samples also count waiting for a CPU)")
    a = p.parse_args()
    opts = Options(a.duration, 0, 16, 1000, 1024, 1, None, True, False)
    workdir = Path(tempfile.mkdtemp(prefix="meshd-profile-"))
    bench = Bench(opts, workdir)
    try:
        profile(bench, a.target, a.duration, a.svg, a.raw, a.top, not a.wall)
    except KeyboardInterrupt:
        return 130
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
