"""Traffic management measured on real processes: consistent hashing, locality failover with
outlier ejection, fault injection, mirroring and ``rule simulate`` against the live data plane.

Every test starts its own meshd, demo apps and sidecars with ``MeshHarness`` on 127.0.0.1 and
stops them all; every wait is bounded. The numbers asserted are the ones in ``docs/rules.md``.
"""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshd.demo.harness
from meshd.demo.harness import MeshHarness, wait_until

pytestmark = pytest.mark.slow

FLAGS = "x-meshd-response-flags"
POOL = 16  # concurrent callers for the bulk phases


# ---------------------------------------------------------------------------------------------
# helpers


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set[int] = set()
_KERNEL_FREE_PORT = meshd.demo.harness.free_port


def _quiet_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    ``harness.free_port`` binds port 0, i.e. takes a port *from* the ephemeral range, then
    releases it; on a busy host an outgoing connection can be given that port before the
    sidecar binds it (seen here: ``Address already in use`` on an outbound port). Ports below
    the range are never handed out for outgoing connections.
    """
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(10000, max(10001, low))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    return _KERNEL_FREE_PORT()


@pytest.fixture(autouse=True)
def _ports_outside_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshd.demo.harness, "free_port", _quiet_port)


@contextmanager
def harness(tmp_path: Path) -> Iterator[MeshHarness]:
    mesh = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    try:
        mesh.start_meshd()
        yield mesh
    finally:
        mesh.close()


def _cli(mesh: MeshHarness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd.cli.main", "--addr", mesh.meshd_addr,
                           *args], capture_output=True, text=True, timeout=30)


def _snapshot(mesh: MeshHarness, node: str) -> dict[str, Any]:
    snap = mesh.admin_json(node, "/config_dump")["snapshot"]
    return snap if isinstance(snap, dict) else {}


def _endpoints(mesh: MeshHarness, node: str, cluster: str) -> list[str]:
    for ce in _snapshot(mesh, node).get("endpoints", ()):
        if ce["cluster"] == cluster:
            return sorted(e["instance_id"] for e in ce["endpoints"])
    return []


def _cluster(mesh: MeshHarness, node: str, cluster: str) -> dict[str, Any]:
    for c in _snapshot(mesh, node).get("clusters", ()):
        if c["name"] == cluster:
            return dict(c)
    return {}


def _routes(mesh: MeshHarness, node: str, host: str) -> list[dict[str, Any]]:
    for vh in _snapshot(mesh, node).get("virtual_hosts", ()):
        if vh["host"] == host:
            return list(vh["routes"])
    return []


def _wait(check: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    return wait_until(check, timeout, what)


def _proxy(mesh: MeshHarness, node: str) -> httpx.Client:
    return httpx.Client(proxy=f"http://127.0.0.1:{mesh.sidecars[node].outbound}", timeout=15.0)


def _fan_out(fn: Callable[[int], Any], n: int, pool: int = POOL) -> list[Any]:
    """``fn(0..n-1)`` on ``pool`` threads, results in order."""
    with ThreadPoolExecutor(pool) as ex:
        return list(ex.map(fn, range(n)))


def _requests_total(mesh: MeshHarness, node: str, reporter: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.sidecars[node].admin}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "istio_requests_total" and s.labels.get("reporter") == reporter)


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def _instance(resp: httpx.Response) -> str:
    return str(resp.json()["instance"]) if resp.status_code == 200 else f"<{resp.status_code}>"


# ---------------------------------------------------------------------------------------------
# 1. consistent hashing


HASH_RULES = """\
[[destination]]
name = "echo"
host = "echo"
load_balancer = "{lb}"
consistent_hash = {{ header = "x-user" }}
"""


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_consistent_hash_pins_a_key_and_spreads_keys(tmp_path: Path, lb: str) -> None:
    with harness(tmp_path) as mesh:
        mesh.add_service("client-1", "client", None, {"version": "v1"})
        echoes = [f"echo-{i}" for i in range(1, 5)]
        for name in echoes:
            mesh.add_service(name, "echo", "static", {"version": "v1"})
        mesh.wait_ready()
        mesh.wait_synced()
        mesh.push_rules(HASH_RULES.format(lb=lb), "hash.toml")
        _wait(lambda: _endpoints(mesh, "client-1", "outbound||echo") == echoes
              and _cluster(mesh, "client-1", "outbound||echo")["lb_policy"] == lb,
              f"client sees 4 echoes with {lb}")
        mesh.wait_synced()
        users = [f"user-{i}" for i in range(200)]
        with _proxy(mesh, "client-1") as c:

            def as_alice(i: int) -> str:
                return _instance(c.get(f"http://echo/a{i}", headers={"x-user": "alice"}))

            def as_user(i: int) -> str:
                return _instance(c.get("http://echo/u", headers={"x-user": users[i]}))

            # The demo app listens with socketserver's backlog of 5: in a burst of 16 new
            # connections from its sidecar a SYN can be dropped, that connect outlasts the
            # sidecar's 1 s connect timeout, the attempt fails (503 UF) and is retried on the
            # next host of the ring. Fill the sidecars' pools first so that the measured
            # requests reuse connections.
            wait_until(lambda: len(set(_fan_out(as_alice, 64))) == 1, 30, "alice's pool warm")
            _fan_out(as_user, 200)
            alice = _fan_out(as_alice, 1000)
            first = _fan_out(as_user, 200)
            again = _fan_out(lambda i: as_user(199 - i), 200)
        alice_hits = Counter(alice)
        spread = Counter(first)
        print(f"{lb}: alice -> {dict(alice_hits)}; 200 users -> {dict(sorted(spread.items()))}")
        assert len(alice_hits) == 1 and next(iter(alice_hits)) in echoes, alice_hits
        assert all(inst in echoes for inst in first), spread
        assert len(spread) >= 3, spread
        assert again[::-1] == first  # every user stays on its instance


# ---------------------------------------------------------------------------------------------
# 2. locality failover + outlier ejection


LOCALITY_RULES = """\
[[destination]]
name = "echo"
host = "echo"
locality = { enabled = true }

[destination.outlier_detection]
consecutive_local_origin_failures = 2
consecutive_5xx = 2
interval = "0.5s"
base_ejection_time = "2s"
max_ejection_percent = 100
"""
BASE_EJECTION = 2.0
INTERVAL = 0.5


def test_locality_prefers_own_zone_fails_over_and_comes_back(tmp_path: Path) -> None:
    with harness(tmp_path) as mesh:
        mesh.add_service("client-1", "client", None, {"version": "v1", "region": "r1", "zone": "a"})
        zone = {"echo-a1": "a", "echo-a2": "a", "echo-b1": "b", "echo-b2": "b"}
        for name, z in zone.items():
            mesh.add_service(name, "echo", "static", {"version": "v1", "region": "r1", "zone": z})
        mesh.wait_ready()
        mesh.wait_synced()
        mesh.push_rules(LOCALITY_RULES, "locality.toml")
        _wait(lambda: _endpoints(mesh, "client-1", "outbound||echo") == sorted(zone)
              and _cluster(mesh, "client-1", "outbound||echo")["outlier"] is not None
              and _cluster(mesh, "client-1", "outbound||echo")["locality"] is not None,
              "client sees 4 echoes with locality + outlier detection")
        mesh.wait_synced()

        def zones_of(c: httpx.Client, n: int) -> list[str]:
            # 4 callers, not 16: a burst of new connections to a (re)started demo app can lose
            # a SYN in its backlog of 5, and 2 such connect timeouts in a row eject the endpoint
            return _fan_out(lambda i: zone.get(_instance(c.get(f"http://echo/{i}")), "failed"),
                            n, pool=4)

        with _proxy(mesh, "client-1") as c:
            healthy = Counter(zones_of(c, 200))
            print(f"all up: {dict(healthy)}")
            assert healthy == {"a": 200}, healthy

            for name in ("echo-a1", "echo-a2"):  # the apps only: their sidecars answer 503 UF
                app = mesh.sidecars[name].procs[0]
                app.send_signal(signal.SIGKILL)
                app.wait(timeout=10)
            settle = [c.get(f"http://echo/settle{i}") for i in range(20)]
            settle_failed = sum(r.status_code != 200 for r in settle)
            tried_a = sum(_requests_total(mesh, n, "destination") for n in ("echo-a1", "echo-a2"))
            failover = Counter(zones_of(c, 200))
            tried_a = sum(_requests_total(mesh, n, "destination")
                          for n in ("echo-a1", "echo-a2")) - tried_a
            print(f"zone a apps dead: settle failures {settle_failed}/20, then {dict(failover)}, "
                  f"{tried_a:.0f} attempts still sent to zone a")
            assert failover["failed"] <= 2, failover  # >= 99 % succeed
            assert failover["a"] == 0 and failover["b"] >= 198, failover
            # both zone-a endpoints are ejected: one re-probe round (2 failures each) per
            # ejection that runs out during the 200 requests; the ejection time grows, so a
            # slow (loaded CI) box sees at most two rounds
            assert tried_a <= 8, tried_a

            restarted_at = time.monotonic()
            for name in ("echo-a1", "echo-a2"):
                sc = mesh.sidecars[name]
                sc.procs[0] = mesh.start_app(f"{name}-app", "static", sc.app_port, {},
                                             version="v1", instance=name)
            for name in ("echo-a1", "echo-a2"):
                mesh.wait_app(name)
            time.sleep(BASE_EJECTION + INTERVAL)
            # an ejection that ran out while the apps were still dead was renewed for
            # 2 x base_ejection_time (Envoy's back-off): allow that much more, bounded
            extra = wait_until(lambda: zone.get(_instance(c.get("http://echo/probe"))) == "a",
                               2 * BASE_EJECTION + INTERVAL, "traffic back in zone a", period=0.1)
            back = Counter(zones_of(c, 200))
            print(f"zone a apps back {time.monotonic() - restarted_at:.2f}s after the restart "
                  f"(+{extra:.2f}s past base_ejection_time + interval): {dict(back)}")
            assert back["a"] >= 180 and back["failed"] == 0, back


# ---------------------------------------------------------------------------------------------
# 3. fault injection scoped to test traffic


FAULT_RULES = """\
[[route]]
name = "echo"
host = "echo"

[[route.http]]
name = "chaos"
match = [{ headers = { x-test = { exact = "1" } } }]
destinations = [{ host = "echo" }]
fault = { abort = { status = 503, percentage = 10 } }

[[route.http]]
name = "default"
destinations = [{ host = "echo" }]
"""


def test_fault_abort_percentage_only_on_matched_traffic(tmp_path: Path) -> None:
    with harness(tmp_path) as mesh:
        mesh.add_service("client-1", "client", None, {"version": "v1"})
        for name in ("echo-1", "echo-2"):
            mesh.add_service(name, "echo", "static", {"version": "v1"})
        mesh.wait_ready()
        mesh.wait_synced()
        mesh.push_rules(FAULT_RULES, "fault.toml")
        _wait(lambda: [r["name"] for r in _routes(mesh, "client-1", "echo")] == ["chaos", "default"]
              and _endpoints(mesh, "client-1", "outbound||echo") == ["echo-1", "echo-2"],
              "client has the fault route")
        mesh.wait_synced()

        def outcome(resp: httpx.Response) -> str:
            if resp.status_code == 200:
                return "ok"
            return f"{resp.status_code}/{resp.headers.get(FLAGS, '-')}"

        with _proxy(mesh, "client-1") as c:
            t0 = time.monotonic()
            tests = Counter(_fan_out(lambda i: outcome(c.get(f"http://echo/t{i}",
                                                             headers={"x-test": "1"})), 5000))
            plain = Counter(_fan_out(lambda i: outcome(c.get(f"http://echo/p{i}")), 1000))
            took = time.monotonic() - t0
        share = 100.0 * tests["503/FI"] / 5000
        print(f"fault: with header {dict(tests)} ({share:.2f} % FI); without {dict(plain)}; "
              f"6000 requests in {took:.1f}s")
        assert set(tests) <= {"ok", "503/FI"}, tests
        assert 8.0 <= share <= 12.0, tests
        assert plain == {"ok": 1000}, plain


# ---------------------------------------------------------------------------------------------
# 4. mirroring


MIRROR_RULES = """\
[[destination]]
name = "echo"
host = "echo"
subsets = [
  {{ name = "v1", labels = {{ version = "v1" }} }},
  {{ name = "v2", labels = {{ version = "v2" }} }},
]

[[route]]
name = "echo"
host = "echo"

[[route.http]]
name = "primary"
destinations = [{{ subset = "v1" }}]
{mirror}
"""
MIRROR_ROUNDS = 3
MIRROR_PACE = 0.005  # seconds between requests: <= ~60 copies/s x 0.5 s stays below 64 in flight


def test_mirror_copies_half_and_leaves_primary_latency_alone(tmp_path: Path) -> None:
    with harness(tmp_path) as mesh:
        mesh.add_service("client-1", "client", None, {"version": "v1"})
        mesh.add_service("echo-v1", "echo", "static", {"version": "v1"})
        mesh.add_service("echo-v2", "echo", "static", {"version": "v2"}, delay="0.5")
        mesh.wait_ready()
        mesh.wait_synced()

        def set_mirror(on: bool) -> None:
            mirror = 'mirror = { subset = "v2", percentage = 50 }' if on else ""
            mesh.push_rules(MIRROR_RULES.format(mirror=mirror), "route.toml")
            want = "outbound|v2|echo" if on else None
            _wait(lambda: _endpoints(mesh, "client-1", "outbound|v1|echo") == ["echo-v1"]
                  and [(r.get("mirror") or {}).get("cluster")
                       for r in _routes(mesh, "client-1", "echo")] == [want],
                  f"client has the route with mirror {'on' if on else 'off'}")
            mesh.wait_synced()

        def run(c: httpx.Client) -> list[float]:
            took = []
            for i in range(400):
                t = time.perf_counter()
                resp = c.get(f"http://echo/m{i}")
                took.append(time.perf_counter() - t)
                assert resp.status_code == 200 and resp.json()["instance"] == "echo-v1"
                time.sleep(MIRROR_PACE)
            return took

        def copies_settled() -> float:
            """v2's inbound request count once the last copies (0.5 s each) are in."""
            last = [-1.0]

            def settled() -> bool:
                now = _requests_total(mesh, "echo-v2", "destination")
                done, last[0] = now == last[0], now
                return done

            wait_until(settled, 15, "mirror copies to finish", period=1.0)
            return last[0]

        set_mirror(False)
        ok, rounds = False, []
        with _proxy(mesh, "client-1") as c:
            for _ in range(20):  # warm the connections of both sidecars
                c.get("http://echo/warm")
            # p99 of 400 requests on a shared host can jump by tens of ms; coupling to the
            # 0.5 s copies would add hundreds of ms every time, so a noisy round is measured
            # again (both halves), at most MIRROR_ROUNDS times
            for rnd in range(MIRROR_ROUNDS):
                if rnd:
                    set_mirror(False)
                before = run(c)
                base = copies_settled()
                if rnd == 0:
                    assert base == 0  # no mirror, no traffic to v2
                set_mirror(True)
                with_mirror = run(c)
                copies = copies_settled() - base
                p99_before, p99_mirror = _p99(before), _p99(with_mirror)
                rounds.append((copies, p99_before * 1000, p99_mirror * 1000))
                print(f"mirror round {rnd}: {copies:.0f}/400 copies ({copies / 4:.1f} %); primary "
                      f"p99 {p99_before * 1000:.2f} ms before, {p99_mirror * 1000:.2f} ms with it")
                assert 168 <= copies <= 232, rounds  # 50 % +- 8 %
                ok = p99_mirror <= max(1.5 * p99_before, p99_before + 0.020)
                if ok:
                    break
        assert ok, rounds


# ---------------------------------------------------------------------------------------------
# 5. rule simulate agrees with the live sidecars


SIM_RULES = """\
[[destination]]
name = "echo"
host = "echo"
subsets = [
  { name = "v1", labels = { version = "v1" } },
  { name = "v2", labels = { version = "v2" } },
  { name = "v3", labels = { version = "v3" } },
]

[[route]]
name = "echo"
host = "echo"

[[route.http]]
name = "canary-header"
match = [{ headers = { x-canary = { exact = "1" } } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "beta-callers"
match = [{ source_labels = { tier = "beta" } }]
destinations = [{ subset = "v3" }]

[[route.http]]
name = "variant-query"
match = [{ query_params = { variant = { exact = "b" } } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "old-path"
match = [{ path = { exact = "/old" } }]
redirect = { path = "/new", status = 308 }

[[route.http]]
name = "maintenance"
match = [{ path = { prefix = "/maint" } }]
direct_response = { status = 503, body = "down for maintenance" }

[[route.http]]
name = "ops-caller"
match = [{ source = "ops" }]
destinations = [{ subset = "v3" }]

[[route.http]]
name = "default"
destinations = [{ subset = "v1" }]
"""
CALLERS = {  # sidecar node -> (service, labels)
    "client-1": ("client", {"version": "v1"}),
    "beta-1": ("beta", {"version": "v1", "tier": "beta"}),
    "ops-1": ("ops", {"version": "v1"}),
}
# (caller node, path, headers) -> expected (route, outcome): subset name, or status for local replies
SIM_CASES: list[tuple[str, str, dict[str, str], str, str]] = [
    ("client-1", "/x", {}, "default", "v1"),
    ("client-1", "/x", {"x-canary": "1"}, "canary-header", "v2"),
    ("beta-1", "/x", {}, "beta-callers", "v3"),
    ("beta-1", "/x", {"x-canary": "1"}, "canary-header", "v2"),
    ("client-1", "/x?variant=b", {}, "variant-query", "v2"),
    ("client-1", "/x?variant=c", {}, "default", "v1"),
    ("client-1", "/old?q=1", {}, "old-path", "308"),
    ("beta-1", "/old", {}, "beta-callers", "v3"),
    ("client-1", "/maint/now", {}, "maintenance", "503"),
    ("ops-1", "/x", {}, "ops-caller", "v3"),
    ("ops-1", "/x", {"x-canary": "0"}, "ops-caller", "v3"),
]


def _simulate(mesh: MeshHarness, node: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    service, labels = CALLERS[node]
    args = ["rule", "simulate", "--json", "--host", "echo", "--path", path, "--source", service]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    for k, v in labels.items():
        args += ["--source-label", f"{k}={v}"]
    out = _cli(mesh, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


def test_rule_simulate_matches_the_live_sidecar(tmp_path: Path) -> None:
    with harness(tmp_path) as mesh:
        for node, (service, labels) in CALLERS.items():
            mesh.add_service(node, service, None, labels)
        version_of = {"echo-v1": "v1", "echo-v2": "v2", "echo-v3": "v3"}
        for name, version in version_of.items():
            mesh.add_service(name, "echo", "static", {"version": version})
        mesh.wait_ready()
        mesh.wait_synced()
        mesh.push_rules(SIM_RULES, "sim.toml")
        for node in CALLERS:
            _wait(lambda n=node: len(_routes(mesh, n, "echo")) == 7
                  and all(_endpoints(mesh, n, f"outbound|{v}|echo") == [f"echo-{v}"]
                          for v in ("v1", "v2", "v3")), f"{node} has the rules")
        mesh.wait_synced()

        sims = _fan_out(lambda i: _simulate(mesh, *SIM_CASES[i][:3]), len(SIM_CASES))
        rows = []
        for (node, path, headers, want_route, want), sim in zip(SIM_CASES, sims, strict=True):
            assert sim["outcome"] == "route", sim
            policies = sim["policies"]
            if "redirect" in policies:
                sim_says = str(policies["redirect"]["status"])
            elif "direct_response" in policies:
                sim_says = str(policies["direct_response"]["status"])
            else:
                assert len(sim["destinations"]) == 1, sim
                sim_says = sim["destinations"][0]["subset"]
            with _proxy(mesh, node) as c:
                resp = c.get(f"http://echo{path}", headers=headers)
            if resp.status_code == 200:
                live = version_of[resp.json()["instance"]]
                if sim_says.startswith("v"):
                    assert resp.json()["instance"] in sim["destinations"][0]["endpoints"]
            else:
                live = str(resp.status_code)
            rows.append((node, path, headers, sim["route"], sim_says, live))
            assert (sim["route"], sim_says) == (want_route, want), (node, path, headers, sim)
            assert live == sim_says, (node, path, headers, sim_says, resp.status_code, resp.text)
            if "redirect" in policies:
                assert resp.headers["location"] == "http://echo/new"
            if "direct_response" in policies:
                assert resp.text == policies["direct_response"]["body"] == "down for maintenance"
                assert FLAGS not in resp.headers
        for row in rows:
            print("simulate vs live: {} {} {} -> route {}: simulate {}, live {}".format(*row))
