"""The mesh end to end as real processes on loopback: meshd, sidecars, stdlib apps, curl.

Each test starts its own meshd (fresh data dir) and sidecars via ``MeshHarness`` and tears them
down; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.demo.harness import MeshHarness, free_port, wait_until

pytestmark = pytest.mark.slow

EGRESS = """\
[[egress]]
name = "ext"
host = "ext.example"
ports = [80]
endpoints = ["127.0.0.1:{port}"]
"""
BAD_RULES = """\
[[destination]]
name = "echo"
host = "echo"

[[route]]
name = "echo"
host = "echo"

[[route.http]]
destinations = [
  {{ subset = "v1", weight = 60 }},
  {{ subset = "v2", weight = 30 }},
]
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshHarness]:
    h = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        yield h
    finally:
        h.close()


def _echo_pair(mesh: MeshHarness) -> tuple[int, int]:
    """client sidecar (no app) + echo service (msgd demo app behind a sidecar)."""
    client = mesh.add_service("client-1", "client", None, {"version": "v1"})
    mesh.add_service("echo-1", "echo", "msgd", {"version": "v1"})
    mesh.wait_ready()
    mesh.wait_synced()
    wait_until(lambda: _endpoints(mesh, "client-1", "outbound||echo") == ["echo-1"], 10,
               "client sees echo-1")
    return client.outbound, client.admin


def _endpoints(mesh: MeshHarness, node: str, cluster: str) -> list[str]:
    snap = mesh.admin_json(node, "/config_dump")["snapshot"]
    for ce in snap["endpoints"]:  # type: ignore[index]
        if ce["cluster"] == cluster:
            return [e["instance_id"] for e in ce["endpoints"]]
    return []


def _requests_total(url: str) -> dict[tuple[str, str, str, str], float]:
    """istio_requests_total by (reporter, source_workload, destination_service_name, code)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url).text):
        for s in family.samples:
            if s.name == "istio_requests_total":
                lab = s.labels
                out[(lab["reporter"], lab["source_workload"], lab["destination_service_name"],
                     lab["response_code"])] = s.value
    return out




def test_sidecar_pair_forwards_over_keepalive_and_reports_istio_metrics(mesh: MeshHarness) -> None:
    outbound, admin = _echo_pair(mesh)
    with httpx.Client(proxy=f"http://127.0.0.1:{outbound}") as c:
        for _ in range(20):
            resp = c.get("http://echo/send")
            assert resp.status_code == 200 and resp.json()["sent"] is True
    # Host-header mode: send straight to the outbound port
    resp = httpx.get(f"http://127.0.0.1:{outbound}/send", headers={"host": "echo"})
    assert resp.status_code == 200
    source = _requests_total(f"http://127.0.0.1:{admin}/metrics")
    key = ("source", "client", "echo", "200")
    assert source[key] == 21.0, source
    inbound_url = f"http://127.0.0.1:{mesh.sidecars['echo-1'].admin}/metrics"
    assert _requests_total(inbound_url)[("destination", "client", "echo", "200")] == 21.0
    inbound = httpx.get(inbound_url).text
    assert "istio_request_duration_milliseconds_bucket" in inbound


@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="no curl")
def test_curl_through_http_proxy(mesh: MeshHarness) -> None:
    outbound, _ = _echo_pair(mesh)
    out = subprocess.run(["curl", "-sS", "-x", f"http://127.0.0.1:{outbound}",
                          "-w", "\n%{http_code}", "http://echo/send"],
                         capture_output=True, text=True, timeout=10)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200" and '"sent": true' in body


def test_egress_denied_by_default_then_allowed(mesh: MeshHarness, tmp_path: Path) -> None:
    outbound, _ = _echo_pair(mesh)
    ext_port = free_port()
    mesh.start_app("ext", "msgd", ext_port)
    proxy = f"http://127.0.0.1:{outbound}"
    with httpx.Client(proxy=proxy) as c:
        denied = c.get("http://ext.example/send")
        assert denied.status_code == 502 and "denied" in denied.text
        rules = tmp_path / "egress.toml"
        rules.write_text(EGRESS.format(port=ext_port))
        assert mesh.cli("rule", "push", str(rules)).returncode == 0
        mesh.wait_synced()
        wait_until(lambda: c.get("http://ext.example/send").status_code == 200, 10,
                   "egress allowed")
        assert c.get("http://ext.example:8080/send").status_code == 502  # port not listed


def test_rejected_push_changes_nothing(mesh: MeshHarness, tmp_path: Path) -> None:
    _echo_pair(mesh)
    before = mesh.admin_json("client-1", "/config_dump")["version"]
    intended = {r["node"]: r["intended"] for r in mesh.proxy_status()}
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_RULES.format())
    out = mesh.cli("rule", "push", str(bad))
    assert out.returncode == 2
    assert f"{bad}:10: route[0].http[0].destinations: weights sum to 90, must be 100" \
        in out.stderr
    assert mesh.cli("rule", "list").stdout.strip() == ""
    assert {r["node"]: r["intended"] for r in mesh.proxy_status()} == intended
    assert mesh.admin_json("client-1", "/config_dump")["version"] == before


def test_dead_instance_expires_within_ttl(mesh: MeshHarness) -> None:
    _echo_pair(mesh)
    mesh.add_service("echo-2", "echo", "msgd", {"version": "v1"})
    mesh.wait_ready(["echo-2"])
    wait_until(lambda: len(_endpoints(mesh, "client-1", "outbound||echo")) == 2, 10, "2 echoes")
    mesh.kill("echo-2")
    took = wait_until(lambda: _endpoints(mesh, "client-1", "outbound||echo") == ["echo-1"],
                      10, "echo-2 expired")
    assert took <= mesh.ttl + 1.0  # lease + sweep + push
    with httpx.Client(proxy=f"http://127.0.0.1:{mesh.sidecars['client-1'].outbound}") as c:
        assert all(c.get("http://echo/send").status_code == 200 for _ in range(30))


def test_meshd_restart_sidecars_keep_serving_then_resync_newer(mesh: MeshHarness,
                                                               tmp_path: Path) -> None:
    outbound, _ = _echo_pair(mesh)
    old = mesh.admin_json("client-1", "/config_dump")["version"]
    mesh.stop_meshd(signal.SIGKILL)
    proxy = f"http://127.0.0.1:{outbound}"
    with httpx.Client(proxy=proxy) as c:
        assert all(c.get("http://echo/send").status_code == 200 for _ in range(20))
    # the sidecar itself restarts while meshd is down: it serves from its disk cache
    mesh.restart_sidecar("client-1")
    mesh.wait_ready(["client-1"])
    dump = mesh.admin_json("client-1", "/config_dump")
    assert dump["source"] == "disk-cache" and dump["version"] == old
    with httpx.Client(proxy=proxy) as c:
        assert all(c.get("http://echo/send").status_code == 200 for _ in range(20))
    mesh.start_meshd()
    wait_until(lambda: mesh.admin_json("client-1", "/config_dump")["source"] == "meshd", 15,
               "client-1 resync")
    new = str(mesh.admin_json("client-1", "/config_dump")["version"])
    assert int(new.split(".")[0]) > int(str(old).split(".")[0]), (old, new)
    mesh.wait_synced()
    with httpx.Client(proxy=proxy) as c:
        assert c.get("http://echo/send").status_code == 200


def test_sigterm_deregisters_then_drains(tmp_path: Path) -> None:
    mesh = MeshHarness(tmp_path, ttl=2.0, drain=1.5)  # drain spans two heartbeat periods
    try:
        mesh.start_meshd()
        _echo_pair(mesh)
        proc = mesh.sidecars["echo-1"].procs[-1]
        proc.send_signal(signal.SIGTERM)

        def registered() -> bool:
            services = mesh.api("GET", "/v1/registry/services").json()["services"]
            return any(i["instance_id"] == "echo-1" for s in services for i in s["instances"])

        wait_until(lambda: not registered(), 1.0, "echo-1 deregistered at SIGTERM")
        # deregistered at once, not after the TTL: the client's endpoints are already empty
        wait_until(lambda: _endpoints(mesh, "client-1", "outbound||echo") == [], 2.0, "echo gone")
        seen_again = False
        while proc.poll() is None:  # draining: it must not register itself again
            seen_again |= registered()
        assert not seen_again and proc.returncode == 0
        resp = httpx.get(f"http://127.0.0.1:{mesh.sidecars['client-1'].outbound}/send",
                         headers={"host": "echo"})
        # with no instance left the host is no longer a mesh service: egress policy answers
        assert resp.status_code == 502 and "denied" in resp.text
    finally:
        mesh.close()


def test_app_stopped_before_its_sidecar_is_retried_elsewhere(mesh: MeshHarness) -> None:
    outbound, _ = _echo_pair(mesh)
    mesh.add_service("echo-2", "echo", "msgd", {"version": "v1"})
    mesh.wait_ready(["echo-2"])
    wait_until(lambda: len(_endpoints(mesh, "client-1", "outbound||echo")) == 2, 10, "2 echoes")
    app = mesh.sidecars["echo-2"].procs[0]
    app.send_signal(signal.SIGKILL)  # the app dies, its sidecar still answers (503 UF)
    app.wait(timeout=10)
    with httpx.Client(proxy=f"http://127.0.0.1:{outbound}") as c:
        codes = [c.get("http://echo/send").status_code for _ in range(40)]
    assert codes == [200] * 40


def test_join_token(tmp_path: Path) -> None:
    h = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    try:
        h.start_meshd(token="s3cret")
        h.add_service("echo-1", "echo", "msgd")
        h.wait_ready()
        h.wait_synced()
        denied = h.cli("services")
        assert denied.returncode == 1
        assert denied.stderr.strip() == "error: meshd refused the join token (set MESHD_TOKEN)"
        ok = h.cli("--token", "s3cret", "services")
        assert ok.returncode == 0 and "echo-1" in ok.stdout
    finally:
        h.close()
