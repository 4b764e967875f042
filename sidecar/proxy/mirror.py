"""Traffic mirroring (Istio ``mirror``/``mirrorPercentage``, Envoy request_mirror_policies).

Fire-and-forget: ``Mirror.send`` returns at once; the copy runs in the sidecar's background
nursery on its own connection pool, its response is read and dropped, and it never touches the
primary response or its latency. The ``Host`` gets Envoy's ``-shadow`` suffix so the receiver
can tell copies apart. At most ``MAX_IN_FLIGHT`` copies run at once; beyond that copies are
dropped (counted), never queued. Only requests with a buffered body are mirrored.
"""

from __future__ import annotations

import logging

import trio

from meshd.errors import MeshError
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import RequestHead, drain
from sidecar.proxy.clusters import ClusterRuntimes

log = logging.getLogger("sidecar.mirror")
MAX_IN_FLIGHT = 64      # copies at once per sidecar
MIRROR_TIMEOUT = 10.0   # seconds for one copy, head and body
SHADOW_SUFFIX = "-shadow"  # Envoy appends this to the mirrored request's authority


def shadow_headers(head: RequestHead) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in head.headers:
        if k == "host":
            host, sep, port = v.partition(":")
            v = f"{host}{SHADOW_SUFFIX}{sep}{port}"
        out.append((k, v))
    return tuple(out)


class Mirror:
    def __init__(self, runtimes: ClusterRuntimes, nursery: trio.Nursery,
                 pool: UpstreamPool | None = None) -> None:
        self.runtimes = runtimes
        self.nursery = nursery
        self.pool = pool or UpstreamPool()
        self.in_flight = 0
        self.sent = self.dropped = self.failed = 0

    def send(self, cluster: str, head: RequestHead, body: bytes) -> bool:
        """Start one copy unless MAX_IN_FLIGHT are running; True if started."""
        if self.in_flight >= MAX_IN_FLIGHT:
            self.dropped += 1
            return False
        self.in_flight += 1
        self.nursery.start_soon(self._copy, cluster, head.replace(headers=shadow_headers(head)), body)
        return True

    async def _copy(self, cluster: str, head: RequestHead, body: bytes) -> None:
        try:
            with trio.move_on_after(MIRROR_TIMEOUT):
                rt = self.runtimes.get(cluster)
                ep = rt.pick(trio.current_time(), None, ()) if rt is not None else None
                if ep is None:
                    self.failed += 1
                    return
                await drain(await self.pool.request(ep.address, ep.port, head, body))
                self.sent += 1
        except (MeshError, trio.BrokenResourceError, OSError) as exc:
            self.failed += 1
            log.debug("mirror copy to %s failed: %s", cluster, exc)
        finally:
            self.in_flight -= 1
