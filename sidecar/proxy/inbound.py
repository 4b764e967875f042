"""Inbound listener: mesh traffic from other sidecars -> the local app on ``app_port``.

Checks authorization first (Istio AuthorizationPolicy, ``core.authz``: DENY before ALLOW,
principal = the caller's SPIFFE ID from mTLS): a denied request gets 403 ``RBAC: access denied``
and never reaches the app. Then it forwards to ``app_address:app_port`` over a pooled keep-alive
connection, strips the ``x-meshd-peer`` metadata (after reading it for ``reporter="destination"``
metrics) and answers 503 (``UF``) when the app refuses connections.

``x-forwarded-*`` (``core.headers.forwarded_headers``, Envoy/Istio): a caller verified by mTLS
is a trusted sidecar — its ``x-forwarded-for`` passes, ``x-forwarded-proto`` is set to ``https``
if absent and ``By=<our SPIFFE ID>;URI=<caller's>`` is appended to ``x-forwarded-client-cert``;
a plain-text caller (PERMISSIVE/DISABLE) is treated like an app at the edge: its address is
appended to ``x-forwarded-for`` and its ``x-forwarded-client-cert`` and internal headers dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from meshd.errors import MeshError
from sidecar.bootstrap import Bootstrap
from sidecar.core.authz import Authorizer, AuthzRequest, normalize_path
from sidecar.core.headers import forwarded_headers
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response
from sidecar.http2.grpc import grpc_local_reply
from sidecar.identity.agent import IdentityAgent
from sidecar.metrics import Metrics, Peer
from sidecar.proxy.common import (
    PEER_HEADER,
    error_response,
    grpc_status_label,
    local_reply,
    observed,
    parse_peer,
)
from sidecar.state import Applied, State

log = logging.getLogger("sidecar.inbound")


def _normalized(path: str) -> str:
    """Forward the path the policy checked (Envoy normalize_path + merge_slashes), query kept."""
    raw, sep, query = path.partition("?")
    return normalize_path(raw) + sep + query


class Inbound:
    def __init__(self, boot: Bootstrap, pool: UpstreamPool, metrics: Metrics,
                 agent: IdentityAgent | None = None, state: State | None = None) -> None:
        self.boot = boot
        self.pool = pool
        self.metrics = metrics
        self.agent = agent
        self.state = state
        self._authz: tuple[Applied | None, Authorizer] = (None, Authorizer((), boot.service))
        self.me = Peer(workload=boot.service, namespace=boot.namespace, app=boot.service,
                       version=boot.labels.get("version", "unknown"), principal=boot.spiffe_id)
        # Upgrade requests (WebSocket): (app address, app port, head) -> 101 tunnel or answer
        self.upgrade: Callable[[str, int, RequestHead], Awaitable[Response]] | None = None

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        start = time.perf_counter()
        source = parse_peer(head.header(PEER_HEADER))
        if info.principal is not None:  # mTLS: the certificate, not a header, names the caller
            source = dataclasses.replace(source, principal=info.principal)
        denied = self._authorize(head, info)
        if denied is not None:
            self._observe(source, 403, "RBAC", start)
            return denied
        mtls = info.principal is not None
        headers = forwarded_headers(head.headers, remote_ip=info.peer[0] if info.peer else None,
                                    scheme="https" if mtls else "http", peer_id=info.principal,
                                    own_id=self._me().principal if mtls else None)
        out = head.replace(target=_normalized(head.path),
                           headers=tuple(h for h in headers if h[0] != PEER_HEADER))
        try:
            if self.upgrade is not None and out.header("upgrade") is not None:
                resp = await self.upgrade(self.boot.app_address, self.boot.app_port, out)
            else:
                resp = await self.pool.request(self.boot.app_address, self.boot.app_port, out, body)
        except MeshError as exc:
            resp = grpc_local_reply(head, error_response(exc))
            self._observe(source, resp.head.status, getattr(exc, "response_flag", "-"), start,
                          grpc_status_label(resp))
            return resp
        return observed(resp, lambda code, grpc: self._observe(source, code, "-", start, grpc))

    def _authorizer(self) -> Authorizer:
        applied = self.state.applied if self.state is not None else None
        if applied is not self._authz[0]:
            policies = applied.snapshot.authorization if applied is not None else ()
            self._authz = (applied, Authorizer(policies, self.boot.service))
        return self._authz[1]

    def _authorize(self, head: RequestHead, info: ConnInfo) -> Response | None:
        """Istio AuthorizationPolicy on the caller's SPIFFE ID (mTLS), IP, method, path, port,
        headers: None to go on, else the 403 reply. Audits and dry-run denials are logged."""
        authorizer = self._authorizer()
        if authorizer.empty:
            return None
        req = AuthzRequest(principal=info.principal, source_ip=info.peer[0] if info.peer else "",
                           method=head.method, path=head.path,
                           port=info.local[1] if info.local else self.boot.inbound_port,
                           headers=dict(head.headers))
        decision = authorizer.decide(req)
        for name in decision.audited:
            log.info("AUDIT policy %s: %s %s from %s", name, head.method, head.path, req.principal)
        for name in decision.dry_run_denials:
            log.info("dry-run policy %s would deny %s %s from %s", name, head.method, head.path,
                     req.principal)
            self.metrics.authz_dry_run.labels(name).inc()
        if decision.allowed:
            return None
        policy = decision.policy or "default-deny"
        log.warning("403 %s %s from %s: %s", head.method, head.path, req.principal or req.source_ip,
                    decision.reason)
        self.metrics.authz_denied.labels(policy).inc()
        return local_reply(403, "RBAC: access denied", "RBAC",
                           extra=(("x-meshd-denied-by", policy),))

    def _me(self) -> Peer:
        """This workload as metrics see it; the principal follows the current certificate."""
        creds = self.agent.current if self.agent is not None else None
        if creds is not None and creds.spiffe_id != self.me.principal:
            self.me = dataclasses.replace(self.me, principal=creds.spiffe_id)
        return self.me

    def _observe(self, source: Peer, code: int, flags: str, start: float, grpc: str = "-") -> None:
        self.metrics.observe(reporter="destination", source=source, destination=self._me(),
                             service=self.boot.service, code=code, flags=flags,
                             millis=(time.perf_counter() - start) * 1000, grpc_status=grpc)
