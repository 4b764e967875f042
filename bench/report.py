"""Summaries (medians over repetitions), the printed tables and the MISSION.md target checks."""

from __future__ import annotations

from statistics import median
from typing import Any

from loadgen import WrkResult

DIRECT, HAPROXY, ONE, TWO = "direct", "haproxy", "sidecar x1", "sidecar x2"
TARGET_ORDER = (DIRECT, HAPROXY, ONE, TWO)
SIDECAR_ROLES = {ONE: ("origin-sidecar",), TWO: ("client-sidecar", "origin-sidecar")}
PROXY_ROLES = {HAPROXY: ("haproxy",), **SIDECAR_ROLES}
BELOW_RATE = 0.9  # achieved < 90 % of the offered rate: the latency includes queueing


def _r(x: float, digits: int = 3) -> float:
    """Round for the JSON and the tables."""
    return round(x, digits)


def summarize_full(runs: dict[str, list[WrkResult]],
                   cpu: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per target: median req/s and latency, median of per-repetition ratios to HAProxy, and
    the vCPU of the host and of each proxy process (a saturated proxy shows ~1.0)."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        used = cpu[name]
        ratios = [r.rps / h.rps for r, h in zip(results, runs[HAPROXY], strict=True) if h.rps]
        out[name] = {
            "rps": _r(median(r.rps for r in results), 1),
            "ratio_to_haproxy": _r(median(ratios)) if ratios else None,
            "p50_ms": _r(median(r.p50_ms for r in results)),
            "p99_ms": _r(median(r.p99_ms for r in results)),
            "host_cpu_cores": _r(median(c["host"] for c in used), 2),
            "wrk_vcpu": _r(median(c["wrk"] for c in used), 2),
            "other_cpu_cores": _r(median(c["other"] for c in used), 2),
            "proxy_vcpu": {role: _r(median(c[role] for c in used), 2)
                           for role in PROXY_ROLES.get(name, ())},
            "errors": sum(r.errors for r in results),
            "non_2xx": sum(r.bad_status for r in results),
            "runs_rps": [_r(r.rps, 1) for r in results],
        }
    return out


def _per_1000(cpu: list[dict[str, float]], results: list[WrkResult], role: str) -> float:
    """Median over repetitions of ``role``'s vCPU divided by the achieved thousands of req/s."""
    return _r(median(c[role] / (r.rps / 1000) for c, r in zip(cpu, results, strict=True)))


def summarize_paced(runs: dict[str, list[WrkResult]], cpu: dict[str, list[dict[str, float]]],
                    rate: int) -> dict[str, Any]:
    """Per target: median rate and p50/p90/p99, added latency vs direct, vCPU per 1000 req/s."""
    out: dict[str, Any] = {}
    for name, results in runs.items():
        row: dict[str, Any] = {
            "rps": _r(median(r.rps for r in results), 1),
            "below_offered_rate": median(r.rps for r in results) < BELOW_RATE * rate,
            **{f"p{q}_ms": _r(median(getattr(r, f"p{q}_ms") for r in results)) for q in (50, 90, 99)},
            "errors": sum(r.errors for r in results),
            "non_2xx": sum(r.bad_status for r in results),
            "other_cpu_cores": _r(median(c["other"] for c in cpu[name]), 2),
        }
        for q in (50, 90, 99):
            deltas = [getattr(r, f"p{q}_ms") - getattr(d, f"p{q}_ms")
                      for r, d in zip(results, runs[DIRECT], strict=True)]
            row[f"added_p{q}_ms"] = _r(median(deltas))
        row["vcpu_per_1000rps"] = {role: _per_1000(cpu[name], results, role)
                                   for role in PROXY_ROLES.get(name, ())}
        out[name] = row
    return out


def target_checks(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``{what, measured, met}`` for each MISSION.md target this bench covers."""
    full, paced = summary["throughput"], summary["fixed_rate"]
    ratio = full[ONE]["ratio_to_haproxy"] or 0.0
    added = paced[TWO]["added_p99_ms"]
    cpu = max(max(paced[n]["vcpu_per_1000rps"].values()) for n in (ONE, TWO))
    rss = max(summary["idle_rss_mb"][r] for r in ("origin-sidecar", "client-sidecar"))
    checks = [
        ("throughput, one sidecar >= 0.5 x HAProxy", f"{ratio:.3f} x", ratio >= 0.5),
        ("added p99, two sidecars with mTLS <= +1 ms", f"{added:+.3f} ms", added <= 1.0),
        ("CPU per 1000 req/s per sidecar <= 0.20 vCPU", f"{cpu:.3f} vCPU (worst)", cpu <= 0.20),
        ("idle RSS per sidecar <= 30 MB", f"{rss:.1f} MB (worst)", rss <= 30.0),
    ]
    return [{"what": w, "measured": m, "met": ok} for w, m, ok in checks]


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def full_table(full: dict[str, Any]) -> str:
    """The full-load table: req/s, ratio to HAProxy, latency, CPU of proxy, wrk and others."""
    rows = [[n, f"{r['rps']:.0f}", f"{r['ratio_to_haproxy']:.3f}", f"{r['p50_ms']:.3f}",
             f"{r['p99_ms']:.3f}", " + ".join(f"{v:.2f}" for v in r["proxy_vcpu"].values()) or "-",
             f"{r['wrk_vcpu']:.2f}", f"{r['other_cpu_cores']:.2f}", str(r["errors"] + r["non_2xx"])]
            for n, r in full.items()]
    return _table(["target", "req/s", "ratio to HAProxy", "p50 ms", "p99 ms", "proxy vCPU",
                   "wrk vCPU", "other load", "errors"], rows)


def paced_table(paced: dict[str, Any]) -> str:
    """The fixed-rate table: achieved rate, latency, added latency, proxy vCPU per 1000 req/s."""
    rows = []
    for n, r in paced.items():
        cpu = r["vcpu_per_1000rps"]
        rate = f"{r['rps']:.0f}" + (" (< offered)" if r["below_offered_rate"] else "")
        rows.append([n, rate, f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                     f"{r['p99_ms']:.3f}", f"{r['added_p50_ms']:+.3f}", f"{r['added_p90_ms']:+.3f}",
                     f"{r['added_p99_ms']:+.3f}",
                     " + ".join(f"{v:.3f}" for v in cpu.values()) or "-",
                     f"{r['other_cpu_cores']:.2f}", str(r["errors"] + r["non_2xx"])])
    return _table(["target", "req/s", "p50 ms", "p90 ms", "p99 ms", "added p50", "added p90",
                   "added p99", "proxy vCPU/1000 req/s", "other load", "errors"], rows)


def render(summary: dict[str, Any]) -> str:
    """The whole human-readable report."""
    cfg, paced = summary["config"], summary["fixed_rate"]
    mem = summary["idle_memory_mb"]
    parts = [
        f"origin: {summary['versions']['origin']}; body {cfg['body_size']} B; "
        f"{cfg['connections']} connections; {cfg['duration']} s per run after {cfg['warmup']} s "
        f"warm-up; median of {cfg['repeat']} run(s); host cores busy before the bench: "
        f"{summary['background_host_cores']:.2f}",
        "",
        f"Full load (wrk -t1 -c{cfg['connections']} -d{cfg['duration']}s, closed loop)",
        full_table(summary["throughput"]),
        "",
        f"Fixed rate (~{cfg['rate']} req/s offered: wrk delay() {cfg['delay_ms']} ms per connection, "
        "calibrated on direct), added = target - direct, in ms",
        paced_table(paced),
        "",
        f"CPU per 1000 req/s: one sidecar {paced[ONE]['vcpu_per_1000rps']['origin-sidecar']:.3f} vCPU; "
        f"two sidecars: client {paced[TWO]['vcpu_per_1000rps']['client-sidecar']:.3f} + origin "
        f"{paced[TWO]['vcpu_per_1000rps']['origin-sidecar']:.3f} vCPU; "
        f"HAProxy {paced[HAPROXY]['vcpu_per_1000rps']['haproxy']:.3f} vCPU",
        "Idle memory, MB (RSS / PSS / USS): " + "; ".join(
            f"{role} {m['rss']:.1f} / {m['pss']:.1f} / {m['uss']:.1f}" for role, m in mem.items()),
        "",
        "Targets (MISSION.md):",
    ]
    for c in summary["targets"]:
        parts.append(f"  [{'met' if c['met'] else 'MISSED'}] {c['what']}: {c['measured']}")
    return "\n".join(parts)
