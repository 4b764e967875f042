"""``mesh-sidecar``: one data-plane process per service instance.

``mesh-sidecar run --config FILE`` starts, in one trio nursery: the inbound, outbound and
admin listeners (``serve_http1`` per connection; the outbound one and the ``[[upstreams]]``
localhost ports first detect HTTP / h2 / TLS / TCP, ``proxy.listeners``; the inbound pumps ALPN
``meshd-tcp`` to the app, ``proxy.tcp``), the snapshot subscription (disk cache first)
and the registry heartbeat. Every listener serves HTTP/1.1 with the bootstrap's ``[limits]``
(``ServerLimits``) and closes connections over ``max_connections`` before reading a byte
(``sidecar.http.server.gated``). SIGTERM/SIGINT: deregister, keep serving for ``drain_seconds`` so
peers receive the new endpoints, then stop (Envoy drain). ``mesh-sidecar ready`` exits 0 if the
local admin ``/ready`` answers 200 (for Compose healthchecks without curl).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import ssl
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from functools import partial

import click
import httpx
import trio

from meshd.errors import ConfigError, IdentityError
from meshd.sdnotify import Notifier
from sidecar import bootstrap, lifecycle
from sidecar.admin import Admin
from sidecar.control import Subscription, auth_headers
from sidecar.http.client import UpstreamPool
from sidecar.http.limits import ClientLimits, ServerLimits
from sidecar.http.messages import ConnInfo, Handler
from sidecar.http.server import ConnectionGate, gated
from sidecar.http2.client import H2Pool
from sidecar.http2.dispatch import selected_alpn, serve_http
from sidecar.http2.limits import H2_FANOUT_IDLE, H2ClientLimits
from sidecar.http2.transport import Transport, app_h2, app_protocol, mesh_h2
from sidecar.identity.agent import IdentityAgent
from sidecar.identity.tls import ALPN_H2, ALPN_TCP, TlsContexts, accept
from sidecar.metrics import Metrics
from sidecar.proxy import health_checks, listeners
from sidecar.proxy.global_limits import GlobalLimits
from sidecar.proxy.inbound import Inbound
from sidecar.proxy.mtls import MeshIdentities, mesh_connector
from sidecar.proxy.outbound import Outbound
from sidecar.proxy.tcp import TcpProxy
from sidecar.proxy.tunnels import Tunnels, inbound_upgrade
from sidecar.registration import Registration
from sidecar.state import State

log = logging.getLogger("sidecar")
OUTBOUND_RESPONSE_TIMEOUT = 24 * 3600.0  # seconds; the route timeout (default 15 s) decides


def _addr(sockname: object) -> tuple[str, int] | None:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return (str(sockname[0]), int(sockname[1]))
    return None


def _conn_info(stream: trio.SocketStream) -> ConnInfo:
    return ConnInfo(peer=_addr(stream.socket.getpeername()), local=_addr(stream.socket.getsockname()))


async def _serve_conn(handler: Handler, h1: ServerLimits, stream: trio.SocketStream) -> None:
    async with stream:
        await serve_http(stream, handler, _conn_info(stream), h1_limits=h1,
                         wrap_h1=lifecycle.drainable)


async def _serve_inbound(handler: Handler, ctxs: TlsContexts, mode: str, tcp: TcpProxy | None,
                         h1: ServerLimits, stream: trio.SocketStream) -> None:
    """Terminate mTLS (per ``mode``), then serve HTTP with the peer's SPIFFE ID in ConnInfo;
    ALPN ``meshd-tcp`` (or plain text to an app declared ``tcp``) is pumped to the app as TCP."""
    info = _conn_info(stream)
    try:
        tls, principal = await accept(stream, ctxs, mode)
    except (IdentityError, trio.BrokenResourceError) as exc:
        log.warning("inbound connection from %s refused: %s", info.peer, exc)
        return
    if tcp is not None and (selected_alpn(tls) == ALPN_TCP
                            or (principal is None and tcp.boot.app_protocol == "tcp")):
        await tcp.serve_inbound(tls, dataclasses.replace(info, principal=principal))
        return
    async with tls:
        await serve_http(tls, handler, dataclasses.replace(info, principal=principal),
                         h1_limits=h1, wrap_h1=lifecycle.drainable)


Inherited = dict[int, socket.socket]  # systemd socket activation: listening sockets by port


async def _start_group(nursery: trio.Nursery, name: str,
                       serve: Callable[[trio.SocketStream], Awaitable[None]], host: str, port: int,
                       h1: ServerLimits, inherited: Inherited | None = None,
                       ) -> lifecycle.ConnectionGroup:
    """Accept on ``host:port`` in a drainable ``ConnectionGroup``; the gate comes first, so a
    connection over ``h1.max_connections`` is closed before any read or TLS handshake."""
    group = lifecycle.ConnectionGroup(name)
    await nursery.start(group.serve, gated(ConnectionGate(h1.max_connections), serve), host, port,
                        inherited)
    return group


async def _listen(nursery: trio.Nursery, handler: Handler, host: str, port: int, h1: ServerLimits,
                  inherited: Inherited | None = None) -> lifecycle.ConnectionGroup:
    return await _start_group(nursery, f"{host}:{port}", partial(_serve_conn, handler, h1),
                              host, port, h1, inherited)


async def _listen_inbound(nursery: trio.Nursery, handler: Handler, boot: bootstrap.Bootstrap,
                          ctxs: TlsContexts, h1: ServerLimits, inherited: Inherited | None = None,
                          tcp: TcpProxy | None = None) -> lifecycle.ConnectionGroup:
    serve = partial(_serve_inbound, handler, ctxs, boot.mtls_mode, tcp, h1)
    return await _start_group(nursery, f"inbound :{boot.inbound_port}", serve, boot.inbound_address,
                              boot.inbound_port, h1, inherited)


ServeConn = Callable[[trio.abc.Stream, ConnInfo], Awaitable[None]]


async def _serve_detected(serve: ServeConn, stream: trio.SocketStream) -> None:
    async with stream:
        await serve(stream, _conn_info(stream))


async def _listen_detected(nursery: trio.Nursery, serve: ServeConn, host: str, port: int,
                           h1: ServerLimits, inherited: Inherited | None = None,
                           ) -> lifecycle.ConnectionGroup:
    """A listener whose connections pick their protocol from the first bytes (proxy.listeners)."""
    return await _start_group(nursery, f"{host}:{port}", partial(_serve_detected, serve), host, port,
                              h1, inherited)


async def _wait_signal(on_hup: Callable[[], None] | None = None) -> int:
    """The first SIGTERM/SIGINT; every SIGHUP before it calls ``on_hup`` (bootstrap reload)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            if sig != signal.SIGHUP:
                return int(sig)
            if on_hup is not None:
                on_hup()
    return 0


async def run(boot: bootstrap.Bootstrap, config: str = "") -> None:
    """Serve until SIGTERM/SIGINT, then drain (``lifecycle.drain``); SIGHUP re-reads ``config``.
    Speaks sd_notify (READY after listeners and a first snapshot, WATCHDOG, STOPPING) and adopts
    systemd's listening sockets (``lifecycle.inherited_sockets``)."""
    inherited, notifier = lifecycle.inherited_sockets(), Notifier()
    socket_activated = boot.inbound_port in inherited
    state, metrics = State(), Metrics()
    h1 = boot.server_limits()  # [limits]; checked when the bootstrap was parsed
    # an https meshd_addr is verified against meshd_ca_file when set, else the system roots
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=boot.meshd_ca_file)
                                     if boot.meshd_ca_file else True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0), verify=verify) as client:
        agent, ctxs = IdentityAgent(boot, client, boot.data_dir), TlsContexts()
        agent.on_change(ctxs.update)  # first: an OpenSSL refusal vetoes a bad certificate
        agent.load_cached()
        token = partial(_bearer, boot, agent)
        sub = Subscription(boot, state, metrics, client, token)
        sub.load_cache()
        reg = Registration(boot, client, token)
        identities = MeshIdentities(agent)
        # route timeouts (forwarder) bound the outbound wait for a response head, not the pool
        limits = ClientLimits(response_timeout=OUTBOUND_RESPONSE_TIMEOUT)
        pool_out = Transport(  # HTTP/1.1 or HTTP/2 (ALPN h2) per request: sidecar.http2.transport
            UpstreamPool(limits=limits, connect=mesh_connector(ctxs, identities.identity_of)),
            H2Pool(limits=H2ClientLimits(response_timeout=OUTBOUND_RESPONSE_TIMEOUT),
                   connect=mesh_connector(ctxs, identities.identity_of, alpn=(ALPN_H2,))), mesh_h2)
        pool_egress = UpstreamPool(limits=limits)
        pool_in = Transport(UpstreamPool(limits=ClientLimits(max_idle_per_endpoint=H2_FANOUT_IDLE)),
                            H2Pool(), app_h2(app_protocol(boot)))
        async with trio.open_nursery() as nursery:
            await nursery.start(pool_out.run)
            await nursery.start(pool_in.run)
            nursery.start_soon(agent.run)
            quota = GlobalLimits(boot.meshd_addr, boot.node, client,
                                 partial(auth_headers, boot, token))
            outbound = Outbound(boot, state, pool_out, metrics, nursery, pool_egress, identities,
                                quota)
            tcp = TcpProxy(outbound, ctxs)
            tunnels = Tunnels(outbound, tcp, mesh_connector(ctxs, identities.identity_of))
            outbound.tunnel_handler = tunnels.handle
            out_group = await _listen_detected(
                nursery, partial(listeners.serve_outbound, outbound.handle, tunnels, h1_limits=h1),
                boot.outbound_address, boot.outbound_port, h1, inherited)
            nursery.start_soon(health_checks.run, outbound.runtimes, outbound.sync)
            inbound = Inbound(boot, pool_in, metrics, agent, state)
            inbound.upgrade = inbound_upgrade
            tcp.authorizer = inbound._authorizer
            in_group = await _listen_inbound(nursery, inbound.handle, boot, ctxs, h1, inherited, tcp)
            for up in boot.upstreams:  # localhost ports for mesh services (Consul local_bind_port)
                await _listen_detected(nursery, partial(listeners.serve_upstream, up, outbound.handle, tcp,
                                                        h1_limits=h1),
                                       up.local_address, up.local_port, h1)
            await _listen(nursery, Admin(boot.node, state, metrics, agent, ctxs).handle,
                          boot.admin_address, boot.admin_port, h1)
            lifecycle.warn_unused(inherited)
            nursery.start_soon(sub.run)
            nursery.start_soon(reg.run)
            nursery.start_soon(notifier.run_watchdog)
            nursery.start_soon(lifecycle.notify_ready, notifier, lambda: state.applied is not None,
                               boot.node)
            log.info("sidecar %s up: inbound %d (mTLS %s) -> app %d, outbound %d, admin %d",
                     boot.node, boot.inbound_port, boot.mtls_mode, boot.app_port,
                     boot.outbound_port, boot.admin_port)
            def on_hup() -> None:  # sets .boot of each holder to the reloaded bootstrap
                if config:
                    lifecycle.reload(config, reg.boot, (reg, sub, agent), notifier)

            sig = await _wait_signal(on_hup)
            log.info("signal %d: draining (drain_seconds %.1f)", sig, reg.boot.drain_seconds)
            await lifecycle.drain(reg.boot, notifier, reg.deregister, in_group, out_group,
                                  socket_activated)
            nursery.cancel_scope.cancel()
        for pool in (pool_out, pool_egress, pool_in):
            await pool.aclose()


def _bearer(boot: bootstrap.Bootstrap, agent: IdentityAgent) -> str:
    """The session token of the current certificate, else the bootstrap's join token."""
    creds = agent.current
    return creds.session_token if creds is not None and creds.session_token else boot.token


@click.group()
def main() -> None:
    """mesh-sidecar: the meshd data plane."""


@main.command("run")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False),
              help="bootstrap TOML file")
@click.option("--log-level", default="info", show_default=True)
def run_cmd(config: str, log_level: str) -> None:
    """Run the sidecar for one service instance."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    for name in ("httpx", "httpcore"):  # one line per long-poll is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        boot = bootstrap.load(config)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    trio.run(run, boot, config)


@main.command("ready")
@click.option("--admin", default="127.0.0.1:15000", show_default=True, help="admin host:port")
def ready_cmd(admin: str) -> None:
    """Exit 0 if the sidecar at ADMIN is ready (has a snapshot), 1 otherwise."""
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as resp:
            sys.exit(0 if resp.status == 200 else 1)
    except OSError as exc:
        click.echo(f"not ready: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
