"""HTTP/2 row of the bench: h2load (multiplexed) direct vs through the sidecars, in one run.

    .venv/bin/python bench/h2.py [--duration 10] [--clients 2] [--streams 50] [--json FILE]

| target | path |
|---|---|
| `direct` | h2load → nginx (h2c, `listen … http2`) |
| `haproxy h2` | h2load → HAProxy (`bind … proto h2`, HTTP/1.1 pooled to nginx) → nginx |
| `sidecar x1` | h2load → origin sidecar inbound (h2c) → nginx (HTTP/1.1, pooled) |
| `sidecar x2` | h2load → client sidecar outbound (h2c, `Host: origin`) → HTTP/2 over mTLS
  (ALPN h2) → origin sidecar inbound → nginx |

Each target: ``h2load -c CLIENTS -m STREAMS -D DURATION`` after a short warm-up; reported:
req/s (and its ratio to direct and to HAProxy in the same run), failed/errored requests, mean
request time, the vCPU of the sidecars (utime+stime over the run / duration) and their CPU
milliseconds per request. Loopback only; every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import procinfo
import stack

H2LOAD = "h2load"


def nginx_h2_config(workdir: Path, h2_port: int, h1_port: int, body_size: int) -> str:
    conf = stack.nginx_config(workdir, [h1_port], body_size)
    # h2load does not reconnect in timed runs: nginx's per-connection cap would end the direct run
    conf = conf.replace("keepalive_requests 100000;", "keepalive_requests 1000000000;")
    return conf.replace(f"    listen 127.0.0.1:{h1_port};\n",
                        f"    listen 127.0.0.1:{h1_port};\n    listen 127.0.0.1:{h2_port} http2;\n")


def haproxy_h2_config(port: int, origin_port: int) -> str:
    return stack.haproxy_config(port, origin_port).replace(
        f"bind 127.0.0.1:{port}\n", f"bind 127.0.0.1:{port} proto h2\n")


def h2load(url: str, clients: int, streams: int, seconds: float, host: str = "") -> dict[str, float]:
    args = [H2LOAD, "-c", str(clients), "-m", str(streams), "-D", f"{max(1, round(seconds))}", url]
    if host:
        args[1:1] = ["-H", f":authority: {host}"]  # h2 refuses a Host that differs from it
    proc = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    out = proc.stdout + proc.stderr
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not rate or not req:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    return {"req_s": float(rate.group(1)), "done": int(req.group(2)), "succeeded": int(req.group(3)),
            "failed": int(req.group(4)), "errored": int(req.group(5)),
            "mean": mean.group(1) if mean else "?"}  # type: ignore[dict-item]


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    procs, mesh = stack.Procs(workdir), stack.Mesh(workdir)
    try:
        app_port = mesh.start()
        h2_port, haproxy_port = stack.free_port(), stack.free_port()
        nginx = stack.find_tool("nginx")
        if nginx is None:
            raise SystemExit("bench/h2.py needs nginx (h2c origin)")
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_h2_config(workdir, h2_port, app_port, opts.body_size))
        procs.spawn("nginx", [nginx, "-p", str(workdir), "-c", str(conf), "-e", "stderr"])
        stack.wait_port(h2_port, stack.START_TIMEOUT, "nginx")
        targets: dict[str, tuple[str, str, list[int]]] = {
            "direct": (f"http://127.0.0.1:{h2_port}/", "", []),
        }
        haproxy = stack.find_tool("haproxy")
        if haproxy is not None:
            cfg = workdir / "haproxy-h2.cfg"
            cfg.write_text(haproxy_h2_config(haproxy_port, app_port))
            procs.spawn("haproxy", [haproxy, "-db", "-f", str(cfg)])
            stack.wait_port(haproxy_port, stack.START_TIMEOUT, "haproxy")
            targets["haproxy h2"] = (f"http://127.0.0.1:{haproxy_port}/", "", [])
        mesh.wait_routable()
        origin, client = mesh.origin, mesh.client
        assert origin is not None and client is not None
        targets["sidecar x1"] = (f"http://127.0.0.1:{origin.inbound}/", "", [mesh.pid(origin)])
        targets["sidecar x2"] = (f"http://127.0.0.1:{client.outbound}/", "origin",
                                 [mesh.pid(client), mesh.pid(origin)])
        results = {}
        for name, (url, host, pids) in targets.items():
            h2load(url, opts.clients, opts.streams, 1.0, host)  # warm-up: connections, caches
            before = [procinfo.cpu_seconds(p) for p in pids]
            row = h2load(url, opts.clients, opts.streams, opts.duration, host)
            used = sum(procinfo.cpu_seconds(p) - b for p, b in zip(pids, before, strict=True))
            row["sidecar_vcpu"] = round(used / opts.duration, 2)
            results[name] = row
        return results
    finally:
        procs.close()
        mesh.close()


def report(results: dict[str, dict[str, float]], opts: argparse.Namespace) -> str:
    direct = results["direct"]["req_s"] or 1.0
    haproxy = results.get("haproxy h2", {}).get("req_s") or 0.0
    lines = [f"HTTP/2 h2load -c {opts.clients} -m {opts.streams} ({opts.clients * opts.streams} concurrent "
             f"streams), {opts.duration:g} s, {opts.body_size} B body",
             f"{'target':<12} {'req/s':>9} {'vs direct':>9} {'vs haproxy':>10} {'failed':>7} {'errored':>7} "
             f"{'mean':>9} {'sidecar vCPU':>12} {'CPU ms/req':>10}"]
    for name, r in results.items():
        vcpu = r.get("sidecar_vcpu", 0)
        per_req = f"{vcpu / r['req_s'] * 1000:.2f}" if vcpu and r["req_s"] else "-"
        vs_haproxy = f"{r['req_s'] / haproxy:.3f}x" if haproxy else "-"
        lines.append(f"{name:<12} {r['req_s']:>9.0f} {r['req_s'] / direct:>8.0%} {vs_haproxy:>10} "
                     f"{r['failed']:>7} {r['errored']:>7} {r['mean']!s:>9} {vcpu or '-':>12} {per_req:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    if stack.find_tool(H2LOAD) is None:
        print("h2load not found (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="meshd-bench-h2-") as tmp:
        results = run(opts, Path(tmp))
    print(report(results, opts))
    if opts.json:
        opts.json.write_text(json.dumps({"options": vars(opts) | {"json": str(opts.json)},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
