"""TCP proxying: app -> (tcp route, endpoint) -> mTLS "meshd-tcp" -> peer inbound -> its app.

Outbound (``TcpProxy.proxy``): ``core.tcp_routes`` picks the cluster (weighted tcp routes of the
host, else its default cluster; egress rules for hosts outside the mesh), the cluster runtime
picks an endpoint (health checks, outlier ejection, load balancer — the same as HTTP), and the
connection to the peer's inbound listener is mTLS offering only ALPN ``meshd-tcp`` and checked
against the endpoint's SPIFFE ID. A failed connect (refused, timeout, TLS/identity) counts as a
local-origin failure for outlier detection and the next endpoint is tried, up to
``TCP_CONNECT_ATTEMPTS`` (nothing was sent yet). Times come from the destination rule's
``connection_pool``: ``connect_timeout`` per attempt and ``idle_timeout`` for the pump.

Inbound (``TcpProxy.serve_inbound``): a connection whose ALPN is ``meshd-tcp`` (or plain text to
an app declared ``app_protocol = "tcp"``) is authorized as TCP (Istio: HTTP-only conditions
never match) and pumped to ``app_address:app_port``; denied -> closed.

When a connection cannot be routed (no route, denied egress, no healthy endpoint, every connect
failed) the downstream is closed with a reset, as Envoy's tcp_proxy does; the reason is logged.

Circuit breaking (Envoy tcp_proxy: ``resourceManager().connections().canCreate()``): a mesh
cluster's ``connection_pool.max_connections`` caps its concurrent outbound TCP connections; one
over the cap is reset at once, response flag ``UO``. The slots are the cluster breaker's active
count (``core.circuit``), shared with the cluster's HTTP requests, held until the pump ends.

Metrics: every connection (refused ones too, with their response flag) counts once in
``istio_tcp_connections_opened_total`` and ``..._closed_total``; the pump's bytes go to
``istio_tcp_received_bytes_total`` (downstream -> upstream) and ``istio_tcp_sent_bytes_total``
(upstream -> downstream) chunk by chunk. Outbound reports ``reporter="source"`` (destination
from the endpoint's labels), inbound ``reporter="destination"`` (source from the peer's SPIFFE ID).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from meshd.errors import IdentityError, MeshError, NoHealthyUpstream, UpstreamConnectError
from meshd.identity import parse_spiffe_id
from meshd.snapshot.model import Endpoint
from sidecar.core.authz import Authorizer, AuthzRequest
from sidecar.core.balancer import Key, key
from sidecar.core.router import EgressTarget, split_authority
from sidecar.core.tcp_routes import TcpRouter
from sidecar.http.messages import ConnInfo
from sidecar.identity.tls import ALPN_TCP, TlsContexts, connect_mtls
from sidecar.metrics import UNKNOWN, Peer, TcpChildren
from sidecar.proxy.clusters import ClusterRuntime
from sidecar.proxy.forward import Overflow
from sidecar.proxy.outbound import Outbound
from sidecar.proxy.pump import DEFAULT_IDLE_TIMEOUT, OnBytes, PumpResult, abort, pump
from sidecar.state import Applied

log = logging.getLogger("sidecar.tcp")
TCP_CONNECT_ATTEMPTS = 3  # endpoints tried per connection: Istio's default retries connect failures twice
DEFAULT_CONNECT_TIMEOUT = 1.0  # seconds; egress and the local app (mesh clusters use their own)
_CONNECT_ERRORS = (OSError, trio.BrokenResourceError, trio.TooSlowError, MeshError)


@dataclass
class Upstream:
    """A connected upstream: its stream, the idle timeout to apply, the destination as metrics
    see it, and the cluster runtime whose connection slot it holds (None: egress)."""

    stream: trio.abc.Stream
    idle_timeout: float
    destination: Peer
    runtime: ClusterRuntime | None = None


class TcpProxy:
    def __init__(self, outbound: Outbound, ctxs: TlsContexts | None,
                 authorizer: Callable[[], Authorizer] | None = None) -> None:
        self.outbound = outbound
        self.boot = outbound.boot
        self.ctxs = ctxs
        self.authorizer = authorizer
        self._cached: tuple[Applied | None, TcpRouter | None] = (None, None)

    def router(self) -> TcpRouter:
        """The TCP router of the applied snapshot; NoHealthyUpstream before the first one."""
        applied = self.outbound.state.applied
        if applied is None:
            raise NoHealthyUpstream("no snapshot applied yet")
        if applied is not self._cached[0]:
            self._cached = (applied, TcpRouter(applied.snapshot))
        router = self._cached[1]
        assert router is not None
        return router

    def protocol(self, host: str) -> str:
        """Declared protocol of ``host`` (``""``: undeclared or no snapshot yet)."""
        try:
            return self.router().protocol(host)
        except MeshError:
            return ""

    async def proxy(self, downstream: trio.abc.Stream, host: str, port: int) -> PumpResult | None:
        """Route ``downstream`` to ``host:port`` and pump until both sides are done; None (and
        the downstream reset) when no upstream connection could be made."""
        host = host.lower()
        try:
            up = await self.connect(host, port)
        except MeshError as exc:
            flag = str(getattr(exc, "response_flag", "-"))
            log.info("tcp %s:%d: %s (flag %s)", host, port, exc, flag)
            _refused(self._counters("source", self.outbound.me, Peer(app=host, workload=host),
                                    host, flag))
            await abort(downstream)
            return None
        counters = self._counters("source", self.outbound.me, up.destination, host, "-")
        counters.opened.inc()
        try:
            result = await pump(downstream, up.stream, idle_timeout=up.idle_timeout,
                                on_bytes=_counting(counters))
        finally:
            counters.closed.inc()
            if up.runtime is not None:
                up.runtime.breaker.finish_request()
                up.runtime.release()  # HTTP requests queued on the same breaker may go
        log.debug("tcp %s:%d done: %s", host, port, result)
        return result

    def _counters(self, reporter: str, source: Peer, destination: Peer, service: str,
                  flags: str) -> TcpChildren:
        return self.outbound.metrics.tcp(reporter=reporter, source=source,
                                         destination=destination, service=service, flags=flags)

    async def connect(self, host: str, port: int) -> Upstream:
        """A connected upstream for ``host:port``; raises MeshError (``Overflow`` when the
        cluster's ``max_connections`` is reached). A mesh upstream holds a connection slot of
        its cluster: the caller gives it back (``breaker.finish_request(); release()``)."""
        target = self.router().resolve(host, port)
        if isinstance(target, EgressTarget):
            addrs = [split_authority(e) for e in target.endpoints] or [(target.host, target.port)]
            stream = await first_connect(addrs[:TCP_CONNECT_ATTEMPTS], DEFAULT_CONNECT_TIMEOUT)
            return Upstream(stream, DEFAULT_IDLE_TIMEOUT, Peer(app=host, workload=host))
        self.outbound.sync()
        rt = self.outbound.runtimes.get(target.cluster)
        if rt is None:
            raise NoHealthyUpstream(f"unknown cluster {target.cluster}")
        if rt.breaker.statistics().active_requests >= rt.cluster.circuit_breakers.max_connections:
            raise Overflow(f"max_connections {rt.cluster.circuit_breakers.max_connections} "
                           f"reached for {target.cluster}")
        rt.breaker.start_request()
        try:
            stream, ep = await self._connect_cluster(rt, target.cluster)
        except BaseException:
            rt.breaker.finish_request()
            rt.release()
            raise
        return Upstream(stream, rt.cluster.idle_timeout, _peer_of(ep, host), rt)

    async def _connect_cluster(self, rt: ClusterRuntime, cluster: str,
                               ) -> tuple[trio.abc.Stream, Endpoint]:
        """The first endpoint of ``rt`` that accepts, up to TCP_CONNECT_ATTEMPTS tried."""
        tried: set[Key] = set()
        last: Exception = NoHealthyUpstream(f"no healthy endpoint in {cluster}")
        for _ in range(TCP_CONNECT_ATTEMPTS):
            now = trio.current_time()
            ep = rt.pick(now, None, tried)
            if ep is None or key(ep) in tried:
                break
            tried.add(key(ep))
            try:
                stream = await self._connect_peer(ep.address, ep.port, rt.cluster.connect_timeout)
            except _CONNECT_ERRORS as exc:
                rt.record(ep, trio.current_time(), local_failure=True)
                last = exc
                continue
            rt.record(ep, trio.current_time(), status=200)
            return stream, ep
        if isinstance(last, MeshError) and not isinstance(last, UpstreamConnectError):
            raise last
        raise UpstreamConnectError(f"tcp connect to {cluster}: {last!r}")

    async def _connect_peer(self, host: str, port: int, timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
        identities = self.outbound.identities
        want = identities.identity_of(host, port) if identities is not None else None
        if want is None or self.ctxs is None:  # no certificate yet: plain text (PERMISSIVE peers)
            with trio.fail_after(timeout):
                return await trio.open_tcp_stream(host, port)
        tls = await connect_mtls(self.ctxs, host, port, want, timeout, (ALPN_TCP,))
        if tls.selected_alpn_protocol() != ALPN_TCP:  # an older peer would serve HTTP on it
            await trio.aclose_forcefully(tls)
            raise UpstreamConnectError(f"{host}:{port} did not accept ALPN {ALPN_TCP}")
        return tls

    async def serve_inbound(self, stream: trio.abc.Stream, info: ConnInfo) -> PumpResult | None:
        """Authorize (TCP) and pump ``stream`` to the local app; None if refused or unreachable."""
        service = self.boot.service
        source = _source_of(info.principal)
        if not await self._authorized(stream, info):
            _refused(self._counters("destination", source, self.outbound.me, service, "RBAC"))
            return None
        try:
            app = await first_connect([(self.boot.app_address, self.boot.app_port)],
                                       DEFAULT_CONNECT_TIMEOUT)
        except UpstreamConnectError as exc:
            log.info("tcp from %s: local app: %s", info.peer, exc)
            _refused(self._counters("destination", source, self.outbound.me, service,
                                    exc.response_flag))
            await abort(stream)
            return None
        counters = self._counters("destination", source, self.outbound.me, service, "-")
        counters.opened.inc()
        try:
            return await pump(stream, app, on_bytes=_counting(counters))
        finally:
            counters.closed.inc()

    async def _authorized(self, stream: trio.abc.Stream, info: ConnInfo) -> bool:
        """Istio authorization as TCP; a denied ``stream`` is reset and False returned."""
        if self.authorizer is not None:
            authorizer = self.authorizer()
            if not authorizer.empty:
                req = AuthzRequest(principal=info.principal,
                                   source_ip=info.peer[0] if info.peer else "", method="", path="",
                                   port=info.local[1] if info.local else self.boot.inbound_port,
                                   tcp=True)
                decision = authorizer.decide(req)
                if not decision.allowed:
                    log.warning("tcp from %s denied by %s", req.principal or req.source_ip,
                                decision.policy or "default-deny")
                    await abort(stream)
                    return False
        return True


def _counting(counters: TcpChildren) -> OnBytes:
    """The pump's byte callback: downstream -> upstream is ``received``, the other way ``sent``."""
    received, sent = counters.received, counters.sent

    def on_bytes(a_to_b: bool, n: int) -> None:
        (received if a_to_b else sent).inc(n)

    return on_bytes


def _refused(counters: TcpChildren) -> None:
    """A connection closed at once (no upstream, denied, overflow): opened and closed, no bytes."""
    counters.opened.inc()
    counters.closed.inc()


def _peer_of(ep: Endpoint, host: str) -> Peer:
    """The destination of an outbound connection as metrics see it (as HTTP's outbound)."""
    app = ep.labels.get("app", host)
    return Peer(workload=app, app=app, version=ep.labels.get("version", UNKNOWN))


def _source_of(principal: str | None) -> Peer:
    """The caller of an inbound connection from its SPIFFE ID (TCP has no peer header)."""
    if principal is None:
        return Peer()
    try:
        _, namespace, service = parse_spiffe_id(principal)
    except IdentityError:
        return Peer(principal=principal)
    return Peer(workload=service, namespace=namespace, app=service, principal=principal)


async def first_connect(addrs: list[tuple[str, int]], timeout: float) -> trio.abc.Stream:  # noqa: ASYNC109
    """The first of ``addrs`` that accepts a TCP connection within ``timeout`` s each."""
    last: Exception | None = None
    for host, port in addrs:
        try:
            with trio.fail_after(timeout):
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            last = exc
    raise UpstreamConnectError(f"tcp connect to {addrs}: {last!r}")
