"""Active health checking and outlier sweeps for every cluster of one sidecar (I/O shell).

Every ``TICK`` seconds: for each cluster with a ``health_check``, start a check for each endpoint
whose next check is due (interval + jitter, ``core.health.next_check_delay``); an HTTP check is a
``GET <path>`` through the endpoint's inbound sidecar to its app (2xx = healthy, Envoy), a TCP
check a connect; each is bounded by the check's ``timeout``. Results go to the pure
``HealthTracker`` (healthy/unhealthy thresholds). The same loop runs ``OutlierDetector.sweep``
so ejected endpoints come back when their ejection time is over.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from meshd.errors import MeshError
from meshd.snapshot.model import Endpoint, HealthCheck
from sidecar.core.balancer import key
from sidecar.core.health import next_check_delay
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import RequestHead, drain
from sidecar.proxy.clusters import ClusterRuntime, ClusterRuntimes

log = logging.getLogger("sidecar.health")
TICK = 0.1  # seconds between scheduler passes
USER_AGENT = "meshd-health-check"


async def _probe(pool: UpstreamPool, rt: ClusterRuntime, ep: Endpoint, hc: HealthCheck) -> bool:
    with trio.move_on_after(hc.timeout):
        try:
            if hc.tcp or hc.path is None:
                stream = await trio.open_tcp_stream(ep.address, ep.port)
                await stream.aclose()
                return True
            head = RequestHead("GET", hc.path, (("host", rt.cluster.host),
                                                ("user-agent", USER_AGENT)))
            resp = await pool.request(ep.address, ep.port, head)
            await drain(resp)
            return 200 <= resp.head.status < 300
        except (MeshError, OSError, trio.BrokenResourceError):
            return False
    return False


async def _check(pool: UpstreamPool, rt: ClusterRuntime, ep: Endpoint, hc: HealthCheck) -> None:
    ok = await _probe(pool, rt, ep, hc)
    if rt.health is not None and rt.health.observe(key(ep), ok):
        log.info("endpoint %s of %s is now %s", ep.instance_id or ep.address, rt.cluster.name,
                 "healthy" if ok else "UNHEALTHY")


async def run(runtimes: ClusterRuntimes, sync: Callable[[], None],
              rand: random.Random | None = None) -> None:
    """Run forever; cancel to stop. ``sync()`` brings runtimes up to the applied snapshot.
    Checks run in a child nursery (no orphans)."""
    rand = rand or random.Random()
    pool = UpstreamPool()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                sync()
                for rt in runtimes.all():
                    rt.outlier.sweep(now)
                    _schedule(nursery, pool, rt, now, rand)
                await trio.sleep(TICK)
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


def _schedule(nursery: trio.Nursery, pool: UpstreamPool, rt: ClusterRuntime, now: float,
              rand: random.Random) -> None:
    hc = rt.cluster.health_check
    if hc is None or rt.health is None:
        return
    for ep in rt.endpoints:
        k = key(ep)
        if rt.next_check.get(k, 0.0) <= now:
            rt.next_check[k] = now + next_check_delay(hc, lambda hi: rand.uniform(0, hi))
            nursery.start_soon(_check, pool, rt, ep, hc)
