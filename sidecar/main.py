"""``mesh-sidecar``: one data-plane process per service instance.

``mesh-sidecar run --config FILE`` starts, in one trio nursery: the inbound, outbound and
admin listeners (``serve_http1`` per connection), the snapshot subscription (disk cache first)
and the registry heartbeat. SIGTERM/SIGINT: deregister, keep serving for ``drain_seconds`` so
peers receive the new endpoints, then stop (Envoy drain). ``mesh-sidecar ready`` exits 0 if the
local admin ``/ready`` answers 200 (for Compose healthchecks without curl).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import ssl
import sys
import urllib.request
from functools import partial

import click
import httpx
import trio

from meshd.errors import ConfigError, IdentityError
from sidecar import bootstrap
from sidecar.admin import Admin
from sidecar.control import Subscription, auth_headers
from sidecar.http.client import UpstreamPool
from sidecar.http.limits import ClientLimits
from sidecar.http.messages import ConnInfo, Handler
from sidecar.http.server import serve_http1
from sidecar.identity.agent import IdentityAgent
from sidecar.identity.tls import TlsContexts, accept
from sidecar.metrics import Metrics
from sidecar.proxy import health_checks
from sidecar.proxy.global_limits import GlobalLimits
from sidecar.proxy.inbound import Inbound
from sidecar.proxy.mtls import MeshIdentities, mesh_connector
from sidecar.proxy.outbound import Outbound
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


async def _serve_conn(handler: Handler, stream: trio.SocketStream) -> None:
    async with stream:
        await serve_http1(stream, handler, _conn_info(stream))


async def _serve_inbound(handler: Handler, ctxs: TlsContexts, mode: str,
                         stream: trio.SocketStream) -> None:
    """Terminate mTLS (per ``mode``), then serve HTTP with the peer's SPIFFE ID in ConnInfo."""
    info = _conn_info(stream)
    try:
        tls, principal = await accept(stream, ctxs, mode)
    except (IdentityError, trio.BrokenResourceError) as exc:
        log.warning("inbound connection from %s refused: %s", info.peer, exc)
        return
    async with tls:
        await serve_http1(tls, handler, dataclasses.replace(info, principal=principal))


async def _listen(nursery: trio.Nursery, handler: Handler, host: str, port: int) -> None:
    await nursery.start(partial(trio.serve_tcp, partial(_serve_conn, handler), port, host=host))


async def _listen_inbound(nursery: trio.Nursery, handler: Handler, boot: bootstrap.Bootstrap,
                          ctxs: TlsContexts) -> None:
    serve = partial(_serve_inbound, handler, ctxs, boot.mtls_mode)
    await nursery.start(partial(trio.serve_tcp, serve, boot.inbound_port, host=boot.inbound_address))


async def _wait_signal() -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for sig in sigs:
            return int(sig)
    return 0


async def run(boot: bootstrap.Bootstrap) -> None:
    state, metrics = State(), Metrics()
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
        pool_out = UpstreamPool(limits=limits, connect=mesh_connector(ctxs, identities.identity_of))
        pool_egress, pool_in = UpstreamPool(limits=limits), UpstreamPool()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            quota = GlobalLimits(boot.meshd_addr, boot.node, client,
                                 partial(auth_headers, boot, token))
            outbound = Outbound(boot, state, pool_out, metrics, nursery, pool_egress, identities,
                                quota)
            await _listen(nursery, outbound.handle, boot.outbound_address, boot.outbound_port)
            nursery.start_soon(health_checks.run, outbound.runtimes, outbound.sync)
            inbound = Inbound(boot, pool_in, metrics, agent, state)
            await _listen_inbound(nursery, inbound.handle, boot, ctxs)
            await _listen(nursery, Admin(boot.node, state, metrics, agent, ctxs).handle,
                          boot.admin_address, boot.admin_port)
            nursery.start_soon(sub.run)
            nursery.start_soon(reg.run)
            log.info("sidecar %s up: inbound %d (mTLS %s) -> app %d, outbound %d, admin %d",
                     boot.node, boot.inbound_port, boot.mtls_mode, boot.app_port,
                     boot.outbound_port, boot.admin_port)
            sig = await _wait_signal()
            log.info("signal %d: deregistering, draining %.1fs", sig, boot.drain_seconds)
            await reg.deregister()
            await trio.sleep(boot.drain_seconds)
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per long-poll is noise
    try:
        boot = bootstrap.load(config)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    trio.run(run, boot)


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
