"""meshd data-plane benchmark: one and two sidecars against HAProxy and a direct connection.

Everything runs on 127.0.0.1 and every load is bounded in time::

    direct      wrk -> nginx
    haproxy     wrk -> HAProxy (nbthread 1, http-reuse always) -> nginx
    sidecar x1  wrk -> origin sidecar inbound -> nginx
    sidecar x2  wrk -> client sidecar outbound (Host: origin) -> origin sidecar inbound -> nginx

1. Full load: per target a warm-up, then ``wrk -t1 -c16 -d<N>s --latency`` (closed loop):
   req/s, ratio to HAProxy, p50/p99.
2. Fixed rate: wrk's Lua ``delay()`` paces each of the 16 connections to ~1000 req/s in
   total; p50/p90/p99 and the added latency vs direct, plus the vCPU of each proxy process
   (``/proc/<pid>/stat``) divided by the achieved thousands of req/s.
3. Idle RSS of the sidecars, HAProxy and meshd, before any load.

``--repeat K`` interleaves the targets K times and reports medians (ratios and added latency
per repetition first). Usage: ``python3 dev.py bench [--duration 10] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import procinfo
import report
import stack
from loadgen import Target, WrkResult, run_wrk, write_script
from report import DIRECT, HAPROXY, ONE, TARGET_ORDER, TWO

QUIET_CORES = 0.25  # host cores busy before the bench above which results are noisy


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    connections: int
    rate: int
    body_size: int
    repeat: int
    json_path: Path | None
    use_nginx: bool
    keep_workdir: bool
    install: bool = True
    wait_quiet: float = 0.0

    @property
    def delay_ms(self) -> int:
        """Per-connection pause after each response that gives ``rate`` req/s in total."""
        return max(1, round(self.connections * 1000 / self.rate))


def parse_args(argv: list[str] | None = None) -> Options:
    """The command line as ``Options``; exits with a usage error on bad values."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument("--rate", type=int, default=1000, help="total req/s of the fixed-rate run (1000)")
    p.add_argument("--body-size", type=int, default=1024, help="origin response body bytes (1024)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; medians (1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    p.add_argument("--no-nginx", action="store_true", help="use bench/tiny_origin.py as origin")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for other load on the host to settle (0)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing wrk/haproxy/nginx (done only as root)")
    a = p.parse_args(argv)
    if a.duration < 1 or a.repeat < 1 or a.connections < 1 or a.rate < 1:
        p.error("--duration, --repeat, --connections and --rate must be >= 1")
    return Options(a.duration, a.warmup, a.connections, a.rate, a.body_size, a.repeat, a.json,
                   not a.no_nginx, a.keep_workdir, not a.no_install, a.wait_quiet)


class Bench:
    """Owns every process of one benchmark run; ``close()`` stops them all."""

    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.procs = stack.Procs(workdir)
        self.mesh = stack.Mesh(workdir)
        self.targets: dict[str, Target] = {}
        self.pids: dict[str, int] = {}
        self.origin_desc = ""
        self.paced_delay = opts.delay_ms

    def start(self) -> None:
        """Start meshd, sidecars, origin and HAProxy; wait until every path answers 200."""
        app_port = self.mesh.start()
        direct_port, haproxy_port = stack.free_port(), stack.free_port()
        origin_proc, self.origin_desc = stack.start_origin(
            self.procs, [direct_port, app_port], self.opts.body_size, self.opts.use_nginx)
        haproxy = stack.start_haproxy(self.procs, haproxy_port, direct_port)
        self.mesh.wait_routable()
        origin, client = self.mesh.origin, self.mesh.client
        assert origin is not None and client is not None and self.mesh.harness.meshd is not None
        self.pids = {"origin": origin_proc.pid, "haproxy": haproxy.pid,
                     "origin-sidecar": self.mesh.pid(origin), "client-sidecar": self.mesh.pid(client),
                     "meshd": self.mesh.harness.meshd.pid}
        self.targets = {
            DIRECT: Target(DIRECT, f"http://127.0.0.1:{direct_port}/"),
            HAPROXY: Target(HAPROXY, f"http://127.0.0.1:{haproxy_port}/"),
            ONE: Target(ONE, f"http://127.0.0.1:{origin.inbound}/"),
            TWO: Target(TWO, f"http://127.0.0.1:{client.outbound}/", ("Host: origin",)),
        }

    def idle_memory(self) -> dict[str, dict[str, float]]:
        """RSS, PSS and USS in MB of the sidecars, HAProxy and meshd (call before any load)."""
        roles = ("origin-sidecar", "client-sidecar", "haproxy", "meshd")
        return {r: procinfo.memory_mb(self.pids[r]) for r in roles}

    @staticmethod
    def background_load(seconds: float = 2.0) -> float:
        """Cores busy on the host while nothing is loaded: other users of the machine."""
        window = procinfo.CpuWindow({})
        window.start()
        time.sleep(seconds)
        return round(window.stop()["host"], 2)

    def wait_quiet(self) -> float:
        """Background load, after waiting up to ``--wait-quiet`` s for it to drop below
        ``QUIET_CORES``; prints a warning if it stays above."""
        deadline = time.monotonic() + self.opts.wait_quiet
        load = self.background_load()
        while load > QUIET_CORES and time.monotonic() < deadline:
            load = self.background_load()
        if load > QUIET_CORES:
            print(f"warning: {load:.2f} cores already busy before the bench: results will be "
                  "noisy (use --repeat, --wait-quiet)", file=sys.stderr)
        return load

    def _cpu_window(self) -> procinfo.CpuWindow:
        """A CPU window over every process the bench started (wrk included when it ends)."""
        return procinfo.CpuWindow(dict(self.pids))

    def calibrate_delay(self) -> int:
        """The per-connection ``delay()`` that paces the *direct* path to ~``rate`` req/s.

        wrk's timers stretch every cycle beyond ``delay()``. A warm-up against the direct
        path with the nominal delay measures that overhead (cycle - delay - response time);
        every target is then paced with ``nominal - overhead`` (whole ms rounded down, so the
        offered rate is at or a little above ``rate``; at least 1 ms), so
        they all get the same offered load and a slow target shows as a lower achieved rate.
        """
        o = self.opts
        if o.warmup <= 0:
            return o.delay_ms
        warm = run_wrk(self.targets[DIRECT], write_script(self.workdir, o.delay_ms), o.warmup,
                       o.connections)
        if not warm.rps:
            return o.delay_ms
        overhead = o.connections * 1000 / warm.rps - o.delay_ms - warm.mean_ms
        nominal = o.connections * 1000 / o.rate
        self.paced_delay = max(1, min(o.delay_ms, math.floor(nominal - overhead)))
        return self.paced_delay

    def measure(self, name: str, paced: bool) -> tuple[WrkResult, dict[str, float]]:
        """Warm up, then one measured wrk run against ``name`` with its CPU window."""
        o, target = self.opts, self.targets[name]
        script = write_script(self.workdir, self.paced_delay if paced else None)
        if o.warmup > 0:
            run_wrk(target, script, o.warmup, o.connections)
        window = self._cpu_window()
        window.start()
        result = run_wrk(target, script, o.duration, o.connections)
        return result, window.stop()

    def close(self) -> None:
        """Stop the mesh (meshd, sidecars), then nginx and HAProxy."""
        try:
            self.mesh.close()
        finally:
            self.procs.close()


def _order(rep: int) -> list[str]:
    """Target order of repetition ``rep``: rotated, so no target always runs first."""
    k = rep % len(TARGET_ORDER)
    return [*TARGET_ORDER[k:], *TARGET_ORDER[:k]]


Runs = dict[str, list[WrkResult]]            # target -> one result per repetition
CpuRuns = dict[str, list[dict[str, float]]]  # target -> vCPU per process, per repetition


def run_phase(bench: Bench, paced: bool) -> tuple[Runs, CpuRuns]:
    """All targets, ``repeat`` times interleaved (rotated order each time): results and CPU."""
    results: Runs = {n: [] for n in TARGET_ORDER}
    cpu: CpuRuns = {n: [] for n in TARGET_ORDER}
    kind = f"paced {bench.paced_delay} ms" if paced else "full load"
    for rep in range(bench.opts.repeat):
        for name in _order(rep):
            res, used = bench.measure(name, paced)
            results[name].append(res)
            cpu[name].append(used)
            print(f"  {kind:11} {name:10} {res.rps:7.0f} req/s  p50 {res.p50_ms:.3f} ms  "
                  f"p99 {res.p99_ms:.3f} ms  errors {res.errors + res.bad_status}", file=sys.stderr)
    return results, cpu


def versions(origin: str) -> dict[str, str]:
    """Versions of everything measured, for the JSON record."""
    import h11
    import trio
    return {
        "origin": origin, "haproxy": stack.tool_version([stack.find_tool("haproxy") or "haproxy", "-v"]),
        "wrk": stack.tool_version(["wrk", "-v"]), "python": platform.python_version(),
        "trio": trio.__version__, "h11": h11.__version__, "kernel": platform.release(),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def run_all(bench: Bench) -> dict[str, Any]:
    """Start everything, run both phases, and return the summary (JSON-ready)."""
    o = bench.opts
    bench.start()
    memory = bench.idle_memory()
    background = bench.wait_quiet()
    print(f"started; measuring {len(TARGET_ORDER)} targets x {o.repeat} ...", file=sys.stderr)
    full, full_cpu = run_phase(bench, paced=False)
    delay = bench.calibrate_delay()
    paced, paced_cpu = run_phase(bench, paced=True)
    summary: dict[str, Any] = {
        "config": {"duration": o.duration, "warmup": o.warmup, "connections": o.connections,
                   "rate": o.rate, "nominal_delay_ms": o.delay_ms, "delay_ms": delay,
                   "body_size": o.body_size, "repeat": o.repeat, "wrk_threads": 1},
        "versions": versions(bench.origin_desc),
        "throughput": report.summarize_full(full, full_cpu),
        "fixed_rate": report.summarize_paced(paced, paced_cpu, o.rate),
        "idle_memory_mb": memory,
        "idle_rss_mb": {role: m["rss"] for role, m in memory.items()},
        "background_host_cores": background,
    }
    summary["targets"] = report.target_checks(summary)
    return summary


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every ``finally`` stops its processes."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, optionally write JSON; 0 on success, 130 on Ctrl-C."""
    opts = parse_args(argv)
    if opts.install:
        stack.install_missing(["wrk", "haproxy", *(["nginx"] if opts.use_nginx else [])])
    missing = [t for t in ("wrk", "haproxy") if stack.find_tool(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (see bench/README.md)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    bench = Bench(opts, workdir)
    keep = opts.keep_workdir
    try:
        summary = run_all(bench)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    except Exception:
        keep = True  # the process logs explain most failures
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.close()
        if keep:
            print(f"work directory (configs, process logs) kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render(summary))
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
