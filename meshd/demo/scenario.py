"""``meshd demo``: the seed article's scenario (``shared/seeds/002_*``) as real processes.

svca (``/pay``) calls svcb (``/notify``) through its sidecar; svcb runs as v1 (two instances)
and v2; svcb calls msgd, an external service outside the mesh. Steps, each checked:

(a) ``/pay`` fails: svcb may not reach msgd (egress denied by default);
(b) after ``meshd rule push`` of an egress rule, ``/pay`` succeeds;
(c) after a route rule, ~5 % of N requests reach v2 and every iPhone request reaches v2;
(d) killing one v1 instance drops it from the endpoints within its TTL, with no failed
    requests after that;
(e) ``meshd proxy-status`` shows every sidecar in sync;
(f) traffic between sidecars is mutual TLS with SPIFFE identities, and an authorization DENY
    policy (svca may not call svcb's /notify) takes effect, then is deleted.

Returns 0 only if every step behaved as stated. Processes are always cleaned up.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from meshd.demo.harness import MeshHarness, free_port, wait_until

TTL = 3.0                 # seconds: registry lease of the demo's instances
CONCURRENCY = 16
CANARY_RANGE = (0.03, 0.07)  # accepted share of v2 for a 5 % split (±~3 standard deviations)
IPHONE_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"
DESKTOP_UA = "Mozilla/5.0 (X11; Linux x86_64)"

EGRESS_RULES = """\
[[egress]]
name = "msgd"
host = "msgd.example"
ports = [80]
endpoints = ["127.0.0.1:{port}"]
"""

ROUTE_RULES = """\
[[destination]]
name = "svcb"
host = "svcb"
load_balancer = "round_robin"

[[destination.subsets]]
name = "v1"
labels = { version = "v1" }

[[destination.subsets]]
name = "v2"
labels = { version = "v2" }

[[route]]
name = "svcb"
host = "svcb"

[[route.http]]
name = "iphone-users"
match = [{ headers = { user-agent = { regex = ".*iPhone.*" } } }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "canary"
destinations = [
  { subset = "v1", weight = 95 },
  { subset = "v2", weight = 5 },
]
"""


class Step:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"   {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failures.append(what)
        return ok


def cli(mesh: MeshHarness, *args: str) -> subprocess.CompletedProcess[str]:
    print(f"   $ meshd {' '.join(args)}", flush=True)
    out = mesh.cli(*args)
    for line in (out.stdout + out.stderr).strip().splitlines():
        print(f"     {line}", flush=True)
    return out


def pay(client: httpx.Client, port: int, ua: str = DESKTOP_UA) -> tuple[int, dict[str, object]]:
    resp = client.get(f"http://127.0.0.1:{port}/pay", headers={"host": "svca", "user-agent": ua})
    try:
        return resp.status_code, dict(resp.json())
    except ValueError:
        return resp.status_code, {"error": resp.text}


def versions(client: httpx.Client, port: int, n: int, ua: str) -> tuple[Counter[str], int]:
    """Send n /pay requests; count svcb versions (and instances) of the 200s; return failures."""
    def one(_: int) -> tuple[int, str, str]:
        status, doc = pay(client, port, ua)
        notify = doc.get("downstream") if status == 200 else None
        if isinstance(notify, dict):
            return status, str(notify.get("version")), str(notify.get("instance"))
        return status, "", ""

    counts: Counter[str] = Counter()
    failed = 0
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for status, version, instance in pool.map(one, range(n)):
            if status != 200:
                failed += 1
            else:
                counts[version] += 1
                counts[f"instance:{instance}"] += 1
    return counts, failed


def start_mesh(mesh: MeshHarness) -> int:
    print("== starting meshd, msgd (outside the mesh), svca, svcb v1 x2, svcb v2", flush=True)
    mesh.start_meshd()
    msgd_port = free_port()
    mesh.start_app("msgd", "msgd", msgd_port)
    mesh.add_service("svca-1", "svca", "svca", {"version": "v1"})
    mesh.add_service("svcb-v1-a", "svcb", "svcb", {"version": "v1"})
    mesh.add_service("svcb-v1-b", "svcb", "svcb", {"version": "v1"})
    mesh.add_service("svcb-v2", "svcb", "svcb", {"version": "v2"})
    mesh.wait_ready()
    mesh.wait_synced()
    wait_until(lambda: len(_svcb_endpoints(mesh, "svca-1")) == 3, 20, "svca sees 3 svcb endpoints")
    cli(mesh, "services")
    return msgd_port


def _svcb_endpoints(mesh: MeshHarness, node: str) -> list[str]:
    snap = mesh.admin_json(node, "/config_dump")["snapshot"]
    for ce in snap["endpoints"]:  # type: ignore[index]
        if ce["cluster"] == "outbound||svcb":
            return [e["instance_id"] for e in ce["endpoints"]]
    return []


def steps_a_b(mesh: MeshHarness, step: Step, client: httpx.Client, msgd_port: int) -> None:
    port = mesh.sidecars["svca-1"].inbound
    print("== (a) /pay with no egress rule: svcb may not reach msgd", flush=True)
    status, doc = pay(client, port)
    inner = doc.get("downstream") if isinstance(doc.get("downstream"), dict) else {}
    step.check(status == 502 and inner.get("downstream_status") == 502,  # type: ignore[union-attr]
               f"/pay -> {status}, svcb -> msgd answered "
               f"{inner.get('downstream_status')} (egress denied)")  # type: ignore[union-attr]
    print("== (b) push an egress rule for msgd.example", flush=True)
    rules = mesh.workdir / "egress.toml"
    rules.write_text(EGRESS_RULES.format(port=msgd_port))
    step.check(cli(mesh, "rule", "push", str(rules)).returncode == 0, "rule push egress.toml")
    mesh.wait_synced()
    status, doc = pay(client, port)
    step.check(status == 200, f"/pay -> {status} after the egress rule")


def step_c(mesh: MeshHarness, step: Step, client: httpx.Client, n: int) -> None:
    port = mesh.sidecars["svca-1"].inbound
    print(f"== (c) route rule: 5 % of traffic and all iPhone users to svcb v2 ({n} requests)",
          flush=True)
    rules = mesh.workdir / "route.toml"
    rules.write_text(ROUTE_RULES)
    step.check(cli(mesh, "rule", "push", str(rules)).returncode == 0, "rule push route.toml")
    mesh.wait_synced()
    counts, failed = versions(client, port, n, DESKTOP_UA)
    share = counts["v2"] / max(1, n)
    step.check(failed == 0, f"{n - failed}/{n} requests succeeded")
    step.check(CANARY_RANGE[0] <= share <= CANARY_RANGE[1],
               f"v2 got {counts['v2']}/{n} = {share:.1%} (expected ~5 %), v1 got {counts['v1']}")
    m = max(100, n // 10)
    iphone, failed = versions(client, port, m, IPHONE_UA)
    step.check(failed == 0 and iphone["v2"] == m, f"iPhone: {iphone['v2']}/{m} reached v2")


def step_d(mesh: MeshHarness, step: Step, client: httpx.Client) -> None:
    port = mesh.sidecars["svca-1"].inbound
    print(f"== (d) kill -9 svcb-v1-b (app and sidecar); TTL is {TTL:.0f}s", flush=True)
    killed_at = time.monotonic()
    mesh.kill("svcb-v1-b")

    def gone() -> bool:
        svcs = mesh.api("GET", "/v1/registry/services").json()["services"]
        return all(i["instance_id"] != "svcb-v1-b" for s in svcs for i in s["instances"])

    wait_until(gone, TTL * 3, "svcb-v1-b to leave the registry")
    took = time.monotonic() - killed_at
    step.check(took <= TTL + 0.5, f"svcb-v1-b removed from the registry {took:.2f}s after kill")
    mesh.wait_synced([n for n in mesh.sidecars if n != "svcb-v1-b"])
    took = time.monotonic() - killed_at
    step.check("svcb-v1-b" not in _svcb_endpoints(mesh, "svca-1"),
               f"svca's sidecar endpoints no longer list it ({took:.2f}s after kill)")
    counts, failed = versions(client, port, 300, DESKTOP_UA)
    step.check(failed == 0 and counts["instance:svcb-v1-b"] == 0,
               f"after removal: {300 - failed}/300 requests succeeded, "
               f"{counts['instance:svcb-v1-b']} reached the dead instance")


DENY_RULES = """\
[[authorization]]
name = "svca-may-not-notify"
host = "svcb"
action = "DENY"
[[authorization.rules]]
from = { principals = ["spiffe://cluster.local/ns/default/sa/svca"] }
to = { paths = ["/notify"] }
"""


def step_f(mesh: MeshHarness, step: Step, client: httpx.Client) -> None:
    port = mesh.sidecars["svca-1"].inbound
    print("== (f) mTLS between sidecars, and an authorization DENY policy", flush=True)
    certs = mesh.admin_json("svcb-v2", "/certs")
    ident = certs["identity"]
    print(f"   svcb-v2 certificate: {ident['spiffe_id']} serial {ident['serial'][:12]}...",
          flush=True)
    metrics = mesh.http.get(f"http://127.0.0.1:{mesh.sidecars['svcb-v2'].admin}/metrics").text
    mtls = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")
            and 'connection_security_policy="mutual_tls"' in line
            and 'source_principal="spiffe://cluster.local/ns/default/sa/svca"' in line]
    step.check(bool(mtls), "svcb's sidecar saw svca's requests over mTLS with svca's SPIFFE ID")
    rules = mesh.workdir / "deny.toml"
    rules.write_text(DENY_RULES)
    step.check(cli(mesh, "rule", "push", str(rules)).returncode == 0, "rule push deny.toml")
    mesh.wait_synced([n for n in mesh.sidecars if n != "svcb-v1-b"])
    status, doc = pay(client, port)
    inner = doc.get("downstream")
    step.check(status == 502 and isinstance(inner, str) and "RBAC: access denied" in inner,
               f"/pay -> {status}: svcb's sidecar answered 403 RBAC to svca")
    step.check(cli(mesh, "rule", "delete", "authorization", "svca-may-not-notify").returncode == 0,
               "rule delete authorization svca-may-not-notify")
    mesh.wait_synced([n for n in mesh.sidecars if n != "svcb-v1-b"])
    step.check(pay(client, port)[0] == 200, "/pay -> 200 again")


def step_e(mesh: MeshHarness, step: Step) -> None:
    print("== (e) proxy-status", flush=True)
    alive = [n for n in mesh.sidecars if n != "svcb-v1-b"]
    wait_until(lambda: {str(r["node"]) for r in mesh.proxy_status()} == set(alive), 20,
               "the dead sidecar to leave proxy-status")
    out = cli(mesh, "proxy-status")
    step.check(out.returncode == 0 and mesh.synced(alive),
               f"all {len(alive)} live sidecars SYNCED (applied = intended version)")


def run_demo(n: int = 2000, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    mesh = MeshHarness(workdir, ttl=TTL)
    step = Step()
    try:
        msgd_port = start_mesh(mesh)
        with httpx.Client(timeout=15.0, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
            steps_a_b(mesh, step, c, msgd_port)
            step_c(mesh, step, c, n)
            step_d(mesh, step, c)
            step_e(mesh, step)
            step_f(mesh, step, c)
    except (TimeoutError, httpx.HTTPError, OSError) as exc:
        step.check(False, f"demo aborted: {exc} (logs in {workdir})")
        keep = True
    finally:
        mesh.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if step.failures:
        print(f"demo FAILED: {len(step.failures)} check(s) failed", flush=True)
        return 1
    print("demo passed: every step behaved as stated", flush=True)
    return 0
