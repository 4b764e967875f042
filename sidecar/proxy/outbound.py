"""Outbound listener: app -> route -> (fault, mirror, rewrites) -> cluster -> peer inbound sidecar.

Apps reach it with no code change, either as ``HTTP_PROXY`` (absolute-form ``GET http://svcb/x``)
or by sending to the outbound port with ``Host: svcb``. Per request, in Envoy's filter order:
route match (``core.router``, source = this sidecar's service and labels) -> redirect or direct
response -> fault injection (delay ``DI``, abort ``FI``) -> request header ops and rewrites ->
mirror copy (fire-and-forget) -> ``Forwarder`` (circuit breaker, load balancer, retries,
timeouts, outlier detection) -> response header ops. Hosts outside the mesh go out only if an
egress rule allows them, else 502 (Istio REGISTRY_ONLY). The app is outside the mesh's trust:
its ``x-forwarded-for`` gets the app's address appended, ``x-forwarded-proto`` is set, and its
``x-forwarded-client-cert`` and ``x-meshd-*`` / ``x-envoy-*`` headers are dropped
(``core.headers.forwarded_headers``) before this sidecar adds its own ``x-meshd-peer``.

Request bodies with a known length of at most ``REPLAY_BUFFER_BYTES`` are read whole first so
that retries and mirrors can replay them (Envoy buffers for retries the same way).
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from urllib.parse import parse_qsl

import trio

from meshd.errors import MeshError, NoHealthyUpstream, UpstreamConnectError
from meshd.snapshot.model import Endpoint, Route
from sidecar.bootstrap import Bootstrap
from sidecar.core.hashing import request_hash
from sidecar.core.headers import forwarded_headers
from sidecar.core.ratelimit import (
    LocalLimiter,
    RateDecision,
    request_key,
    retry_after_header,
)
from sidecar.core.rewrite import (
    apply_header_ops,
    fault_decision,
    mirror_decision,
    redirect_location,
    rewrite_path,
)
from sidecar.core.router import EgressTarget, MeshTarget, RequestInfo, split_authority
from sidecar.http.bodies import RecordingBody
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, Handler, RequestHead, Response, body_length
from sidecar.http2.grpc import grpc_local_reply, grpc_reply, grpc_timeout, is_grpc
from sidecar.metrics import Metrics, Peer
from sidecar.proxy.clusters import ClusterRuntimes
from sidecar.proxy.common import (
    PEER_HEADER,
    error_response,
    grpc_status_label,
    local_reply,
    observed,
    peer_header_value,
)
from sidecar.proxy.forward import Forwarder
from sidecar.proxy.global_limits import GlobalLimits
from sidecar.proxy.mirror import Mirror
from sidecar.proxy.mtls import MeshIdentities
from sidecar.state import Applied, State

REPLAY_BUFFER_BYTES = 64 * 1024  # request bodies up to this size are buffered for retry/mirror
EGRESS_CONNECT_ATTEMPTS = 3


class Outbound:
    def __init__(self, boot: Bootstrap, state: State, pool: UpstreamPool, metrics: Metrics,
                 nursery: trio.Nursery | None = None, egress_pool: UpstreamPool | None = None,
                 identities: MeshIdentities | None = None,
                 global_limits: GlobalLimits | None = None) -> None:
        """``pool`` reaches mesh endpoints (mTLS through its connect seam, ``identities`` keeps
        the expected SPIFFE IDs current); ``egress_pool`` reaches hosts outside the mesh."""
        self.boot = boot
        self.state = state
        self.pool = pool
        self.egress_pool = egress_pool or pool
        self.identities = identities
        self.global_limits = global_limits
        self.metrics = metrics
        self.runtimes = ClusterRuntimes(boot.labels)
        self.forwarder = Forwarder(pool)
        self.mirror = Mirror(self.runtimes, nursery) if nursery is not None else None
        self.rand = random.Random()
        self._synced: Applied | None = None
        self.limiter: LocalLimiter | None = None
        self.me = Peer(workload=boot.service, namespace=boot.namespace, app=boot.service,
                       version=boot.labels.get("version", "unknown"), principal=boot.spiffe_id)
        self._peer_value = peer_header_value(boot)
        self.tunnel_handler: Handler | None = None  # CONNECT and Upgrade requests (proxy.tunnels)

    def _applied(self) -> Applied:
        applied = self.state.applied
        if applied is None:
            raise NoHealthyUpstream("no snapshot applied yet")
        if applied is not self._synced:
            self.runtimes.sync(applied, trio.current_time())
            self.limiter = LocalLimiter(applied.snapshot.ratelimits, previous=self.limiter)
            if self.identities is not None:
                self.identities.sync(applied)
            self._synced = applied
        return applied

    def sync(self) -> None:
        """Bring cluster runtimes up to the applied snapshot (no-op before the first one)."""
        if self.state.applied is not None:
            self._applied()

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        if self.tunnel_handler is not None and (head.method == "CONNECT"
                                                or head.header("upgrade") is not None):
            return await self.tunnel_handler(head, body, info)
        start = time.perf_counter()
        host = split_authority(head.authority)[0] if head.authority else "unknown"
        dest, flags = Peer(app=host, workload=host), "-"
        try:
            req = RequestInfo(head.authority, head.method, head.path, head.headers,
                              self.boot.service, self.boot.labels)
            target = self._applied().router.resolve(req)
            if isinstance(target, EgressTarget):
                resp = await self._to_egress(target, self._out_head(head, _remote_ip(info)), body)
            else:
                resp, dest, flags = await self._to_mesh(target, head, body, info)
        except MeshError as exc:
            resp = grpc_local_reply(head, error_response(exc))  # gRPC callers get a grpc-status
            flags = getattr(exc, "response_flag", "-")
            self._observe(dest, host, resp.head.status, flags, start, grpc_status_label(resp))
            return resp
        return observed(resp, lambda code, grpc: self._observe(dest, host, code, flags, start, grpc))

    def _observe(self, dest: Peer, host: str, code: int, flags: str, start: float,
                 grpc: str = "-") -> None:
        self.metrics.observe(reporter="source", source=self.me, destination=dest, service=host,
                             code=code, flags=flags, millis=(time.perf_counter() - start) * 1000,
                             grpc_status=grpc)

    def _out_head(self, head: RequestHead, remote_ip: str | None = None) -> RequestHead:
        """``head`` as it leaves for the upstream: origin-form target, the app's headers
        sanitized at the mesh edge (``forwarded_headers``; ``remote_ip`` = the app's address
        appended to ``x-forwarded-for``), ``x-request-id`` and ``host`` added when missing."""
        headers = list(forwarded_headers(head.headers, remote_ip=remote_ip))
        if head.header("x-request-id") is None:
            headers.append(("x-request-id", str(uuid.uuid4())))
        if head.header("host") is None:
            headers.append(("host", head.authority))
        return head.replace(target=head.path, headers=tuple(headers))

    async def _to_mesh(self, target: MeshTarget, head: RequestHead, body: Body,
                       info: ConnInfo) -> tuple[Response, Peer, str]:
        route = target.policy
        assert route is not None
        limited = self._rate_limit(target, head) or await self._global_limit(target, head)
        if limited is not None:
            return limited, Peer(app=target.host, workload=target.host), "RL"
        local = self._local_action(route, head)
        if local is not None:
            return _with_response_ops(local, route), Peer(app=target.host, workload=target.host), "-"
        fault = fault_decision(route.fault, lambda: self.rand.uniform(0, 100))
        flags = "-"
        if fault.delay is not None:
            await trio.sleep(fault.delay)
            flags = "DI"
        if fault.abort_status is not None:
            return local_reply(fault.abort_status, "fault filter abort", "FI"), Peer(), "FI"
        if fault.abort_grpc_status is not None:
            return grpc_reply(fault.abort_grpc_status, "fault filter abort",
                              (("x-meshd-response-flags", "FI"),)), Peer(), "FI"
        out = self._rewrite(route, self._out_head(head, _remote_ip(info)))
        payload = await _buffer_small(body)
        if route.retry is not None and not isinstance(payload, bytes) and is_grpc(head):
            payload = RecordingBody(payload, REPLAY_BUFFER_BYTES)  # streamed, replayable if small
        self._maybe_mirror(route, out, payload)
        rt = self.runtimes.get(target.cluster)
        if rt is None:
            raise NoHealthyUpstream(f"unknown cluster {target.cluster}")
        resp, ep = await self.forwarder.forward(
            rt, out.replace(headers=(*out.headers, (PEER_HEADER, self._peer_value))), payload,
            timeout=_deadline(route.timeout, head), retry=route.retry,
            hash_key=self._hash_key(rt, head, info))
        return _with_response_ops(resp, route), _peer_of(ep, target.host), flags

    def _rate_limit(self, target: MeshTarget, head: RequestHead) -> Response | None:
        """Local token buckets of the destination/route (Envoy local_ratelimit): 429 + retry-after."""
        if self.limiter is None:
            return None
        principal = self.me.principal if self.me.principal != "unknown" else None
        decision = self.limiter.check(target.host, target.route,
                                      request_key(principal, dict(head.headers)), time.monotonic())
        return None if decision.allowed else self._limited(decision)

    async def _global_limit(self, target: MeshTarget, head: RequestHead) -> Response | None:
        applied = self.state.applied
        if self.global_limits is None or applied is None or not applied.snapshot.ratelimits:
            return None
        principal = self.me.principal if self.me.principal != "unknown" else None
        decision = await self.global_limits.check(
            applied.snapshot.ratelimits, target.host, target.route,
            request_key(principal, dict(head.headers)))
        return None if decision.allowed else self._limited(decision)

    def _limited(self, decision: RateDecision) -> Response:
        self.metrics.rate_limited.labels(decision.limit_name or "-").inc()
        return local_reply(429, f"rate limited by {decision.limit_name}", "RL",
                           extra=(("retry-after", retry_after_header(decision.retry_after)),))

    def _local_action(self, route: Route, head: RequestHead) -> Response | None:
        if route.direct_response is not None:
            d = route.direct_response
            return local_reply(d.status, d.body, "-", content_type="text/plain; charset=utf-8",
                               newline=False)
        if route.redirect is not None:
            location = redirect_location(route.redirect, "http", head.authority, head.path)
            return local_reply(route.redirect.status, "", "-", extra=(("location", location),))
        return None

    def _rewrite(self, route: Route, head: RequestHead) -> RequestHead:
        headers = apply_header_ops(head.headers, route.request_headers)
        target = head.target
        if route.prefix_rewrite is not None:
            target = rewrite_path(target, route.matched_prefix, route.prefix_rewrite)
        if route.authority_rewrite is not None:
            headers = tuple(("host", route.authority_rewrite) if k == "host" else (k, v)
                            for k, v in headers)
        return head.replace(target=target, headers=headers)

    def _maybe_mirror(self, route: Route, head: RequestHead, payload: Body | bytes) -> None:
        if (self.mirror is not None and route.mirror is not None
                and isinstance(payload, bytes)
                and mirror_decision(route.mirror, lambda: self.rand.uniform(0, 100))):
            self.mirror.send(route.mirror.cluster, head, payload)

    def _hash_key(self, rt: object, head: RequestHead, info: ConnInfo) -> int | None:
        policy = rt.cluster.hash_policy  # type: ignore[attr-defined]
        if policy is None:
            return None
        query = dict(parse_qsl(head.path.partition("?")[2], keep_blank_values=True))
        return request_hash(policy, headers=dict(head.headers), query=query,
                            source_ip=info.peer[0] if info.peer else None)

    async def _to_egress(self, target: EgressTarget, head: RequestHead, body: Body) -> Response:
        addrs = [split_authority(e) for e in target.endpoints] or [(target.host, target.port)]
        last: MeshError = NoHealthyUpstream(f"no endpoint for egress {target.host}")
        for host, port in addrs[:EGRESS_CONNECT_ATTEMPTS]:
            try:
                return await self.egress_pool.request(host, port, head, body)
            except UpstreamConnectError as exc:
                last = exc
        raise last


def _remote_ip(info: ConnInfo) -> str | None:
    """The downstream (app) address of a connection, for ``x-forwarded-for``."""
    return info.peer[0] if info.peer else None


def _deadline(route_timeout: float | None, head: RequestHead) -> float | None:
    """The route timeout, shortened to the caller's ``grpc-timeout`` (gRPC deadline)."""
    grpc = grpc_timeout(head.header("grpc-timeout"))
    if grpc is None:
        return route_timeout
    return grpc if route_timeout is None else min(route_timeout, grpc)


async def _buffer_small(body: Body) -> Body | bytes:
    """The whole body as bytes when its declared length is at most REPLAY_BUFFER_BYTES."""
    length = body_length(body)
    if length is None or length > REPLAY_BUFFER_BYTES:
        return body
    if length == 0:
        return b""
    return b"".join([bytes(chunk) async for chunk in body])


def _with_response_ops(resp: Response, route: Route) -> Response:
    """Istio ``headers.response`` applies to every answer of the route, local ones included."""
    if route.response_headers is not None:
        resp.head = dataclasses.replace(
            resp.head, headers=apply_header_ops(resp.head.headers, route.response_headers))
    return resp


def _peer_of(ep: Endpoint, host: str) -> Peer:
    labels = ep.labels
    return Peer(workload=labels.get("app", host), app=labels.get("app", host),
                version=labels.get("version", "unknown"))
