"""Outbound listener: app -> (route, subset, endpoint) -> destination's inbound sidecar.

Apps reach it with no code change, either as ``HTTP_PROXY`` (absolute-form ``GET http://svcb/x``)
or by sending to the outbound port with ``Host: svcb``. Per request: resolve the authority with
the ``Router`` (route match + weighted subset), pick an endpoint with the cluster's load
balancer, forward over a pooled keep-alive connection. A connect failure is retried on another
endpoint up to ``CONNECT_RETRIES`` times — safe because nothing was sent (Istio's default retry
policy includes ``connect-failure``); so is a body-less request whose peer sidecar answered 503
``UF`` (its app refused the connection, e.g. the app stopped before its sidecar). Hosts outside
the mesh go out only if an egress rule allows them, else 502 (Istio REGISTRY_ONLY).
"""

from __future__ import annotations

import time
import uuid

from meshd.errors import MeshError, NoHealthyUpstream, UpstreamConnectError
from meshd.snapshot.model import Endpoint
from sidecar.bootstrap import Bootstrap
from sidecar.core.balancer import Key, key
from sidecar.core.router import EgressTarget, MeshTarget, split_authority
from sidecar.http.client import UpstreamPool
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, body_length
from sidecar.metrics import Metrics, Peer
from sidecar.proxy.common import PEER_HEADER, error_response, observed, peer_header_value
from sidecar.state import Applied, State

CONNECT_RETRIES = 2  # Istio default retry attempts; here only for connect failures


class Outbound:
    def __init__(self, boot: Bootstrap, state: State, pool: UpstreamPool, metrics: Metrics) -> None:
        self.boot = boot
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.me = Peer(workload=boot.service, namespace=boot.namespace, app=boot.service,
                       version=boot.labels.get("version", "unknown"), principal=boot.spiffe_id)
        self._peer_value = peer_header_value(boot)

    def _request_headers(self, head: RequestHead) -> tuple[tuple[str, str], ...]:
        headers = [(k, v) for k, v in head.headers if k != PEER_HEADER]
        if head.header("x-request-id") is None:
            headers.append(("x-request-id", str(uuid.uuid4())))
        if head.header("host") is None:
            headers.append(("host", head.authority))
        headers.append((PEER_HEADER, self._peer_value))
        return tuple(headers)

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        start = time.perf_counter()
        applied = self.state.applied
        host = split_authority(head.authority)[0] if head.authority else "unknown"
        dest = Peer(app=host, workload=host)
        try:
            if applied is None:
                raise NoHealthyUpstream("no snapshot applied yet")
            target = applied.router.resolve(head.authority, head.method, head.path, head.headers)
            out = head.replace(headers=self._request_headers(head))
            if isinstance(target, MeshTarget):
                resp, dest = await self._to_mesh(applied, target, out, body)
            else:
                resp = await self._to_egress(target, out, body)
        except MeshError as exc:
            resp = error_response(exc)
            flags = getattr(exc, "response_flag", "-")
            self._observe(dest, host, resp.head.status, flags, start)
            return resp
        return observed(resp, lambda code: self._observe(dest, host, code, "-", start))

    def _observe(self, dest: Peer, host: str, code: int, flags: str, start: float) -> None:
        self.metrics.observe(reporter="source", source=self.me, destination=dest, service=host,
                             code=code, flags=flags, millis=(time.perf_counter() - start) * 1000)

    async def _to_mesh(self, applied: Applied, target: MeshTarget, head: RequestHead,
                       body: Body) -> tuple[Response, Peer]:
        cluster = applied.clusters[target.cluster]
        endpoints = applied.endpoints.get(target.cluster, ())
        balancer = self.state.balancers.get(cluster.name, cluster.lb_policy)
        tried: set[Key] = set()
        last: MeshError = NoHealthyUpstream(f"no healthy endpoint in {cluster.name}")
        for _ in range(CONNECT_RETRIES + 1):
            ep = balancer.pick(endpoints, tried)
            if ep is None:
                break
            tried.add(key(ep))
            balancer.started(ep)
            try:
                resp = await self.pool.request(ep.address, ep.port, head, body)
            except UpstreamConnectError as exc:
                balancer.finished(ep)
                last = exc
                continue
            except BaseException:
                balancer.finished(ep)
                raise
            if _peer_refused(resp) and body_length(body) == 0:
                # the peer sidecar could not reach its app: nothing was processed, try another
                balancer.finished(ep)
                if resp.aclose is not None:
                    await resp.aclose()
                last = UpstreamConnectError(f"{ep.instance_id or ep.address}: app refused")
                continue
            return self._release_on_close(resp, balancer, ep), _peer_of(ep, target.host)
        raise last

    @staticmethod
    def _release_on_close(resp: Response, balancer: object, ep: Endpoint) -> Response:
        inner = resp.aclose

        async def aclose() -> None:
            balancer.finished(ep)  # type: ignore[attr-defined]
            if inner is not None:
                await inner()

        resp.aclose = aclose
        return resp

    async def _to_egress(self, target: EgressTarget, head: RequestHead, body: Body) -> Response:
        addrs = [split_authority(e) for e in target.endpoints] or [(target.host, target.port)]
        head = head.replace(headers=tuple(h for h in head.headers if h[0] != PEER_HEADER))
        last: MeshError = NoHealthyUpstream(f"no endpoint for egress {target.host}")
        for host, port in addrs[: CONNECT_RETRIES + 1]:
            try:
                return await self.pool.request(host, port, head, body)
            except UpstreamConnectError as exc:
                last = exc
        raise last


def _peer_refused(resp: Response) -> bool:
    """A 503 local reply of the peer's inbound with flag UF: its app refused the connection."""
    return resp.head.status == 503 and resp.head.header("x-meshd-response-flags") == "UF"


def _peer_of(ep: Endpoint, host: str) -> Peer:
    labels = ep.labels
    return Peer(workload=labels.get("app", host), app=labels.get("app", host),
                version=labels.get("version", "unknown"))
