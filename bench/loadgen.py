"""Drive a target with ``wrk`` and read its results.

wrk runs with one thread (``-t1``) and ``--latency``. A Lua ``done()`` hook prints one
machine-readable line (``BENCH {json}``) with the request count, the run time and latency
percentiles in microseconds, so nothing depends on wrk's human-readable units. For the
fixed-rate run the same script also defines ``delay()``: every connection waits ``delay_ms``
after each response before it sends the next request, so ``connections / delay`` is the
offered rate (16 connections x 16 ms = 1000 req/s, minus the response time itself).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

DONE_HOOK = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50": %d, "p90": %d, "p99": %d, ' ..
    '"mean": %.1f, "max": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status,
    e.timeout))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: achieved rate, latency percentiles in ms, and error counts."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int       # socket errors: connect, read, write, timeout
    bad_status: int   # responses that were not 2xx/3xx

    @property
    def rps(self) -> float:
        """Achieved requests per second over the whole run."""
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Target:
    """Where wrk sends its requests: a URL and extra headers (``Host: origin``)."""

    name: str
    url: str
    headers: tuple[str, ...] = ()


def write_script(workdir: Path, delay_ms: int | None) -> Path:
    """The Lua script: the ``done()`` hook, plus a constant ``delay()`` when pacing."""
    pacing = f"function delay()\n  return {delay_ms}\nend\n" if delay_ms is not None else ""
    path = workdir / (f"wrk-delay-{delay_ms}ms.lua" if delay_ms is not None else "wrk-max.lua")
    path.write_text(pacing + DONE_HOOK)
    return path


def parse_output(stdout: str) -> WrkResult:
    """The ``BENCH {json}`` line of wrk's output as a ``WrkResult``; raises if it is missing."""
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            d = json.loads(line[len("BENCH "):])
            return WrkResult(
                requests=d["requests"], seconds=d["duration_us"] / 1e6, p50_ms=d["p50"] / 1000,
                p90_ms=d["p90"] / 1000, p99_ms=d["p99"] / 1000, max_ms=d["max"] / 1000,
                mean_ms=d["mean"] / 1000,
                errors=d["connect"] + d["read"] + d["write"] + d["timeout"], bad_status=d["status"])
    raise RuntimeError(f"wrk printed no result line:\n{stdout}")


def run_wrk(target: Target, script: Path, duration: float, connections: int) -> WrkResult:
    """Run ``wrk -t1 -c<connections> -d<duration>s --latency`` against ``target`` (bounded)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "5s", "-s", str(script)]
    for header in target.headers:
        args += ["-H", header]
    proc = subprocess.run([*args, target.url], capture_output=True, text=True,
                          timeout=duration + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed for {target.name} ({proc.returncode}): {proc.stderr}")
    return parse_output(proc.stdout)
