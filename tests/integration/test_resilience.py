"""Resilience end to end with real sidecars and real upstreams (httpbin from PyPI, demo apps):
retries and the retry budget, outlier ejection, route and per-try timeouts, circuit breaking,
active health checks. Numbers are asserted; every loop is bounded; traffic stays on loopback.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.demo.harness import MeshHarness, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshHarness]:
    h = MeshHarness(tmp_path, ttl=2.0, drain=0.2)
    try:
        h.start_meshd()
        yield h
    finally:
        h.close()


def _client(mesh: MeshHarness) -> httpx.Client:
    port = mesh.sidecars["client-1"].outbound
    return httpx.Client(proxy=f"http://127.0.0.1:{port}", timeout=30.0,
                        limits=httpx.Limits(max_connections=32))


def _start(mesh: MeshHarness, services: dict[str, tuple[str, dict[str, str]]]) -> None:
    """client-1 (no app) plus ``{name: (app, app_opts)}`` instances of service "echo"."""
    mesh.add_service("client-1", "client", None, {"version": "v1"})
    for name, (app, opts) in services.items():
        mesh.add_service(name, "echo", app, {"version": "v1"}, **opts)
    mesh.wait_ready()
    for name in services:
        mesh.wait_app(name)
    mesh.wait_synced()


def _parallel(n: int, fn: Callable[[int], httpx.Response], workers: int = 16) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


def _destination_requests(mesh: MeshHarness, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.sidecars[name].admin}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "istio_requests_total" and s.labels["reporter"] == "destination")


RETRY_RULES = """\
[[destination]]
name = "echo"
host = "echo"
connection_pool = {{ max_retries = 1000 }}
{budget}
[[route]]
name = "echo"
host = "echo"
[[route.http]]
destinations = [{{}}]
retries = {{ attempts = {attempts}, retry_on = "5xx", backoff = "5ms" }}
"""


def test_retries_mask_a_30_percent_failing_destination(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("httpbin", {})})
    mesh.push_rules(RETRY_RULES.format(budget="", attempts=7))
    with _client(mesh) as c:
        codes = Counter(r.status_code for r in _parallel(
            1000, lambda _: c.get("http://echo/status/200:7,503:3"), workers=8))
    assert codes[200] >= 999, codes  # >= 99.9 % success; 0.3**8 per request to fail


def test_retry_budget_caps_retries_when_everything_fails(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("httpbin", {})})
    mesh.push_rules(RETRY_RULES.format(budget="", attempts=5))
    with _client(mesh) as c:
        codes = Counter(r.status_code for r in _parallel(100, lambda _: c.get("http://echo/status/503")))
    unbudgeted = _destination_requests(mesh, "echo-1")
    assert codes[503] == 100 and unbudgeted == 600  # 1 try + 5 retries each
    mesh.push_rules(RETRY_RULES.format(
        budget="retry_budget = { percent = 20.0, min_concurrency = 1 }", attempts=5))
    with _client(mesh) as c:
        _parallel(100, lambda _: c.get("http://echo/status/503"))
    budgeted = _destination_requests(mesh, "echo-1") - unbudgeted
    assert budgeted / 100 < 2.5, budgeted  # the budget keeps retries under 20 % of active


OUTLIER_RULES = """\
[[destination]]
name = "echo"
host = "echo"
outlier_detection = {{ consecutive_5xx = 3, interval = "0.2s", base_ejection_time = "4s", \
max_ejection_percent = {max_percent}, min_health_percent = 0.0 }}
"""


def test_outlier_ejects_after_consecutive_5xx_and_returns(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("static", {}), "echo-2": ("static", {}),
                  "echo-bad": ("static", {"status": "500"})})
    mesh.push_rules(OUTLIER_RULES.format(max_percent=100.0))
    with _client(mesh) as c:
        first = [c.get("http://echo/x").status_code for _ in range(30)]
        ejected_at = time.monotonic()
        assert first.count(500) == 3, first  # ejected after exactly 3 consecutive 5xx
        assert [c.get("http://echo/x").status_code for _ in range(30)] == [200] * 30
        assert time.monotonic() - ejected_at < 3.5  # all of that inside the ejection time
        time.sleep(max(0.0, ejected_at + 4.5 - time.monotonic()))  # 4 s later: back in the pool
        back = [c.get("http://echo/x").status_code for _ in range(30)]
    assert back.count(500) >= 1, back


def test_max_ejection_percent_is_respected(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("static", {}), "bad-1": ("static", {"status": "500"}),
                  "bad-2": ("static", {"status": "500"})})
    mesh.push_rules(OUTLIER_RULES.format(max_percent=34.0))  # one host of three
    with _client(mesh) as c:
        [c.get("http://echo/x") for _ in range(60)]
        later = [c.get("http://echo/x") for _ in range(60)]
    failing = {r.json()["instance"] for r in later if r.status_code == 500}
    assert len(failing) == 1, failing  # the other bad host stays: ejection capped at 34 %


TIMEOUT_RULES = """\
[[route]]
name = "echo"
host = "echo"
[[route.http]]
name = "per-try"
match = [{ path = { prefix = "/delay/1" } }]
destinations = [{}]
timeout = "3s"
retries = { attempts = 2, per_try_timeout = "0.5s", retry_on = "5xx", backoff = "10ms" }
[[route.http]]
name = "rest"
destinations = [{}]
timeout = "1s"
"""


def test_hung_upstream_gets_504_at_the_route_timeout(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("httpbin", {})})
    mesh.push_rules(TIMEOUT_RULES)
    with _client(mesh) as c:
        start = time.monotonic()
        resp = c.get("http://echo/delay/3")
        took = time.monotonic() - start
        assert resp.status_code == 504 and resp.headers["x-meshd-response-flags"] == "UT"
        assert 0.9 <= took <= 1.1, took  # route timeout 1 s, +-10 %
        start = time.monotonic()
        resp = c.get("http://echo/delay/1")
        took = time.monotonic() - start
    assert resp.status_code == 504 and 1.45 <= took <= 2.0, took  # 3 tries x 0.5 s + back-off


BREAKER_RULES = """\
[[destination]]
name = "echo"
host = "echo"
connection_pool = { max_connections = 2, max_pending_requests = 2 }
"""


def test_circuit_breaker_overflow_gives_503_uo(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("httpbin", {})})
    mesh.push_rules(BREAKER_RULES)
    with _client(mesh) as c:
        responses = _parallel(12, lambda _: c.get("http://echo/delay/1"), workers=12)
    flags = Counter(r.headers.get("x-meshd-response-flags", "-") for r in responses)
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 4, 503: 8} and flags["UO"] == 8, (codes, flags)


HEALTH_RULES = """\
[[destination]]
name = "echo"
host = "echo"
health_check = { path = "/health", interval = "0.2s", timeout = "0.5s", unhealthy_threshold = 2, \
healthy_threshold = 1 }
"""


def test_active_health_check_removes_a_sick_endpoint(mesh: MeshHarness) -> None:
    _start(mesh, {"echo-1": ("static", {}), "echo-sick": ("static", {"status": "503"})})
    mesh.push_rules(HEALTH_RULES)
    with _client(mesh) as c:
        wait_until(lambda: all(c.get("http://echo/x").status_code == 200 for _ in range(10)),
                   5.0, "the sick endpoint to be marked unhealthy")
        codes = Counter(c.get("http://echo/x").status_code for _ in range(100))
    assert codes == {200: 100}, codes
