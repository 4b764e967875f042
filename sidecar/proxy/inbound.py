"""Inbound listener: mesh traffic from other sidecars -> the local app on ``app_port``.

Forwards every request to ``app_address:app_port`` over a pooled keep-alive connection,
strips the ``x-meshd-peer`` metadata (after reading it for ``reporter="destination"`` metrics)
and answers 503 (``UF``) when the app refuses connections. mTLS termination and authorization
policy plug in here in later issues.
"""

from __future__ import annotations

import dataclasses
import time

from meshd.errors import MeshError
from sidecar.bootstrap import Bootstrap
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response
from sidecar.identity.agent import IdentityAgent
from sidecar.metrics import Metrics, Peer
from sidecar.proxy.common import PEER_HEADER, error_response, observed, parse_peer


class Inbound:
    def __init__(self, boot: Bootstrap, pool: UpstreamPool, metrics: Metrics,
                 agent: IdentityAgent | None = None) -> None:
        self.boot = boot
        self.pool = pool
        self.metrics = metrics
        self.agent = agent
        self.me = Peer(workload=boot.service, namespace=boot.namespace, app=boot.service,
                       version=boot.labels.get("version", "unknown"), principal=boot.spiffe_id)

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        start = time.perf_counter()
        source = parse_peer(head.header(PEER_HEADER))
        if info.principal is not None:  # mTLS: the certificate, not a header, names the caller
            source = dataclasses.replace(source, principal=info.principal)
        out = head.replace(headers=tuple(h for h in head.headers if h[0] != PEER_HEADER))
        try:
            resp = await self.pool.request(self.boot.app_address, self.boot.app_port, out, body)
        except MeshError as exc:
            resp = error_response(exc)
            self._observe(source, resp.head.status, getattr(exc, "response_flag", "-"), start)
            return resp
        return observed(resp, lambda code: self._observe(source, code, "-", start))

    def _observe(self, source: Peer, code: int, flags: str, start: float) -> None:
        me = self.me
        if self.agent is not None and self.agent.current is not None:
            me = dataclasses.replace(me, principal=self.agent.current.spiffe_id)
        self.metrics.observe(reporter="destination", source=source, destination=me,
                             service=self.boot.service, code=code, flags=flags,
                             millis=(time.perf_counter() - start) * 1000)
