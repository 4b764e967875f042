"""Tunnels through the outbound listener: HTTP ``CONNECT``, ``Upgrade`` (WebSocket) and TLS
passthrough routed by SNI (egress without terminating TLS).

* ``CONNECT host:port`` (``HTTPS_PROXY`` clients such as curl): ``host:port`` must be a mesh
  service (tcp routes apply) or allowed by an egress rule listing the port, else the usual 502
  (``NR``, Istio REGISTRY_ONLY) and close. Allowed: ``200`` and the connection becomes a TCP
  tunnel. When the client then speaks TLS, its ClientHello's SNI must name the CONNECT host
  (no SNI is accepted): a different name is a domain-fronting attempt and the tunnel is reset.
* ``Upgrade`` requests are routed like HTTP (route match, weighted cluster, endpoint) and sent on
  a fresh connection (mTLS to the peer inbound, which forwards the Upgrade to its app); after the
  101 both hops are byte pumps (``proxy.upgrade``).
* TLS on the outbound port without CONNECT (``sniff`` saw a ClientHello): the SNI names the host,
  the port is ``EGRESS_TLS_PORT``; allowed hosts are reached as with CONNECT, anything else —
  no SNI, a name no egress rule allows — is reset. The TLS bytes are forwarded untouched.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import trio

from meshd.errors import MeshError, NoHealthyUpstream, UpstreamConnectError
from sidecar.core.balancer import Key, key
from sidecar.core.router import EgressTarget, MeshTarget, RequestInfo, split_authority
from sidecar.core.sni import ClientHello, NotClientHello, parse_client_hello
from sidecar.core.sniff import DETECTION_TIMEOUT
from sidecar.http.client import Connect
from sidecar.http.messages import Body, ConnInfo, RequestHead, Response, ResponseHead
from sidecar.http.upgrade import TunnelResponse
from sidecar.identity.tls import HANDSHAKE_TIMEOUT, PrefixedStream
from sidecar.metrics import Peer
from sidecar.proxy.common import PEER_HEADER, error_response, observed
from sidecar.proxy.outbound import Outbound
from sidecar.proxy.pump import abort, tunnel_stream
from sidecar.proxy.tcp import TCP_CONNECT_ATTEMPTS, TcpProxy, first_connect
from sidecar.proxy.upgrade import UPGRADE_RESPONSE_TIMEOUT, forward_upgrade

log = logging.getLogger("sidecar.tunnels")
EGRESS_TLS_PORT = 443  # the port of CONNECT-less TLS egress (the sidecar cannot see the original one)
_HELLO_READ = 16 * 1024  # Envoy tls_inspector's initial read buffer


async def read_client_hello(stream: trio.abc.Stream, timeout: float,  # noqa: ASYNC109
                            ) -> tuple[ClientHello | None, str, trio.abc.Stream]:
    """``(hello, what, stream)``: read until a whole ClientHello, bytes that are not one, EOF or
    ``timeout`` s. ``what``: ``"hello"``, ``"not-tls"``, ``"incomplete"`` (part of a hello) or
    ``"nothing"`` (no byte); ``stream`` delivers every byte read again."""
    buf = bytearray()
    hello, what = None, "nothing"
    with trio.move_on_after(timeout):
        try:
            while hello is None:
                data = await stream.receive_some(_HELLO_READ)
                if not data:
                    break
                buf += data
                hello = parse_client_hello(bytes(buf))
        except NotClientHello:
            what = "not-tls"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if hello is not None:
        what = "hello"
    elif buf and what == "nothing":
        what = "incomplete"
    return hello, what, PrefixedStream(stream, bytes(buf))


class Tunnels:
    def __init__(self, outbound: Outbound, tcp: TcpProxy, connect: Connect) -> None:
        """``connect(host, port)``: the mesh connector (mTLS, HTTP/1.1 ALPN) for Upgrades."""
        self.outbound = outbound
        self.tcp = tcp
        self.connect = connect

    async def handle(self, head: RequestHead, body: Body, info: ConnInfo) -> Response:
        """The outbound handler for CONNECT and Upgrade requests."""
        start = time.perf_counter()
        host = split_authority(head.authority)[0] if head.authority else "unknown"
        remote_ip = info.peer[0] if info.peer else None
        try:
            resp = self._connect(head) if head.method == "CONNECT" else await self._upgrade(head, remote_ip)
        except MeshError as exc:
            resp = error_response(exc)
            self.outbound._observe(Peer(app=host, workload=host), host, resp.head.status,
                                   getattr(exc, "response_flag", "-"), start)
            return resp
        return observed(resp, lambda code, *_: self.outbound._observe(
            Peer(app=host, workload=host), host, code, "-", start))

    def _connect(self, head: RequestHead) -> Response:
        host, port = split_authority(head.target)
        self.tcp.router().resolve(host, port)  # raises when neither mesh nor allowed egress
        return TunnelResponse(head=ResponseHead(200, ()), tunnel=partial(self._connect_tunnel, host, port))

    async def _connect_tunnel(self, host: str, port: int, downstream: trio.abc.Stream,
                              buffered: bytes) -> None:
        stream: trio.abc.Stream = PrefixedStream(tunnel_stream(downstream), buffered)
        hello, what, stream = await read_client_hello(stream, DETECTION_TIMEOUT)
        if what == "incomplete" or (hello is not None and hello.sni not in (None, host)):
            log.warning("CONNECT %s:%d carried TLS for %s: reset", host, port,
                        hello.sni if hello else "(an incomplete ClientHello)")
            await abort(stream)
            return
        await self.tcp.proxy(stream, host, port)

    async def sni_passthrough(self, stream: trio.abc.Stream) -> None:
        """TLS from an app straight to the outbound port: route by SNI (see module doc)."""
        hello, _, stream = await read_client_hello(stream, HANDSHAKE_TIMEOUT)
        if hello is None or hello.sni is None:
            log.info("TLS without a readable SNI on the outbound port: reset")
            await abort(stream)
            return
        await self.tcp.proxy(stream, hello.sni, EGRESS_TLS_PORT)

    async def _upgrade(self, head: RequestHead, remote_ip: str | None = None) -> Response:
        out, boot = self.outbound, self.outbound.boot
        target = out._applied().router.resolve(
            RequestInfo(head.authority, head.method, head.path, head.headers, boot.service, boot.labels))
        if isinstance(target, EgressTarget):
            addrs = [split_authority(e) for e in target.endpoints] or [(target.host, target.port)]
            stream = await first_connect(addrs[:TCP_CONNECT_ATTEMPTS], HANDSHAKE_TIMEOUT)
            return await forward_upgrade(stream, out._out_head(head, remote_ip))
        route = target.policy
        assert route is not None
        local = out._local_action(route, head)
        if local is not None:
            return local
        stream, idle = await self._open_mesh(target)
        sent = out._rewrite(route, out._out_head(head, remote_ip))
        sent = sent.replace(headers=(*sent.headers, (PEER_HEADER, out._peer_value)))
        return await forward_upgrade(stream, sent, timeout=route.timeout or UPGRADE_RESPONSE_TIMEOUT,
                                     idle_timeout=idle)

    async def _open_mesh(self, target: MeshTarget) -> tuple[trio.abc.Stream, float]:
        rt = self.outbound.runtimes.get(target.cluster)
        if rt is None:
            raise NoHealthyUpstream(f"unknown cluster {target.cluster}")
        tried: set[Key] = set()
        last: Exception = NoHealthyUpstream(f"no healthy endpoint in {target.cluster}")
        for _ in range(TCP_CONNECT_ATTEMPTS):
            ep = rt.pick(trio.current_time(), None, tried)
            if ep is None or key(ep) in tried:
                break
            tried.add(key(ep))
            try:
                with trio.fail_after(rt.cluster.connect_timeout):
                    stream = await self.connect(ep.address, ep.port)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                rt.record(ep, trio.current_time(), local_failure=True)
                last = exc
                continue
            return stream, rt.cluster.idle_timeout
        if isinstance(last, MeshError):
            raise last
        raise UpstreamConnectError(f"upgrade: connect to {target.cluster}: {last!r}")


async def inbound_upgrade(app_address: str, app_port: int, head: RequestHead) -> Response:
    """The inbound side: forward the (authorized) Upgrade request to the local app."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await trio.open_tcp_stream(app_address, app_port)
    except (OSError, trio.TooSlowError) as exc:
        raise UpstreamConnectError(f"connect {app_address}:{app_port}: {exc!r}") from exc
    return await forward_upgrade(stream, head)
