"""Admin listener (Envoy's admin port, 15000): ``/ready``, ``/config_dump``, ``/metrics``.

* ``GET /ready`` — 200 ``LIVE`` once a snapshot is applied (from meshd or the disk cache),
  503 before (Istio's ``/healthz/ready`` meaning); used by Compose healthchecks.
* ``GET /config_dump`` — JSON ``{"version", "source", "applied_at", "node", "snapshot"}``.
* ``GET /metrics`` — Prometheus text exposition (``sidecar.metrics``).
* ``GET /certs`` — the workload certificate (SPIFFE ID, serial, expiry, renewals) and mTLS
  handshake counters.
Any other path is 404. Bind it to localhost only.
"""

from __future__ import annotations

import msgspec

from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.identity.agent import IdentityAgent
from sidecar.identity.tls import TlsContexts
from sidecar.metrics import Metrics
from sidecar.state import State


def _reply(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    head = ResponseHead(status=status, headers=(("content-type", content_type),
                                                ("content-length", str(len(body)))))
    return Response(head=head, body=body)


class Admin:
    def __init__(self, node: str, state: State, metrics: Metrics,
                 agent: IdentityAgent | None = None, tls: TlsContexts | None = None) -> None:
        self.node = node
        self.state = state
        self.metrics = metrics
        self.agent = agent
        self.tls = tls

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        path = head.path.split("?", 1)[0]
        if path in ("/ready", "/healthz/ready"):
            return _reply(200, b"LIVE\n") if self.state.applied else _reply(503, b"NOT READY\n")
        if path == "/config_dump":
            return _reply(200, self._config_dump(), "application/json")
        if path == "/certs":
            return _reply(200, self._certs(), "application/json")
        if path in ("/metrics", "/stats/prometheus"):
            data, ctype = self.metrics.render(head.header("accept"))
            return _reply(200, data, ctype)
        return _reply(404, b"not found\n")

    def _certs(self) -> bytes:
        """Identity, serial, expiry, renewals and handshake counters (Envoy ``/certs`` spirit)."""
        ident = msgspec.to_builtins(self.agent.statistics()) if self.agent else None
        tls = msgspec.to_builtins(self.tls.statistics()) if self.tls else None
        return msgspec.json.encode({"node": self.node, "identity": ident, "tls": tls})

    def _config_dump(self) -> bytes:
        a = self.state.applied
        if a is None:
            return msgspec.json.encode({"node": self.node, "version": None, "snapshot": None})
        return msgspec.json.encode({"node": self.node, "version": str(a.snapshot.version),
                                    "source": a.source, "applied_at": a.applied_at,
                                    "snapshot": a.snapshot})
