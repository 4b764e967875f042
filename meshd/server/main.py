"""``meshd serve``: the controller process — API server + TTL sweeper, on trio.

Runs hypercorn's trio worker with the Starlette app from ``api.py`` and a task that expires
built-in registry instances every ``EXPIRY_SWEEP_INTERVAL`` seconds. SIGTERM/SIGINT stop both
cleanly (structured concurrency: one nursery, no orphan tasks). The identity service (CA in
``<data-dir>/ca``, join/session tokens) is opened before the API starts; without an operator
token the API is open to anyone who reaches it, which is logged as a warning. The ``httpx`` and
``httpcore`` loggers are set to WARNING (the Docker, Consul, Eureka and etcd adapters would log
every API call at INFO, as the sidecar's long-polls would).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from meshd.identity.service import IdentityConfig, IdentityService
from meshd.sdnotify import Notifier
from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore
from registry import factory
from registry.builtin import EXPIRY_SWEEP_INTERVAL
from registry.config import MeshdConfig
from registry.source import DiscoverySource

log = logging.getLogger("meshd")
DEFAULT_LISTEN = "127.0.0.1:15010"  # Istio pilot's plaintext xDS port
GRACEFUL_TIMEOUT = 3.0  # seconds; hypercorn default
KEEP_ALIVE_TIMEOUT = 330.0  # seconds; longer than the longest long-poll (api.MAX_LONG_POLL)
SOURCE_RESTART_DELAY = 1.0  # seconds before an adapter that raised is started again
QUIET_LOGGERS = ("httpx", "httpcore")  # one line per adapter API call is noise


async def _sweep(cp: ControlPlane) -> None:
    while True:
        await trio.sleep(EXPIRY_SWEEP_INTERVAL)
        cp.expire()
        cp.tick()


async def _run_source(src: DiscoverySource, cp: ControlPlane) -> None:
    """Run one discovery source for meshd's life; a bug in it is a source error, not a crash."""
    sink = cp.sink(src.name)
    while True:
        try:
            await src.watch(sink)
        except Exception as exc:  # an adapter bug: keep the last good view, restart the adapter
            log.exception("source %s failed", src.name)
            sink.error(f"adapter failed: {type(exc).__name__}: {exc}")
        await trio.sleep(SOURCE_RESTART_DELAY)


async def _signals(cancel: trio.CancelScope, shutdown: trio.Event, notifier: Notifier | None = None) -> None:
    """SIGTERM/SIGINT: STOPPING=1, hypercorn stops accepting and finishes in-flight requests for
    GRACEFUL_TIMEOUT, then everything is cancelled. SIGHUP: logged; nothing is reloadable yet."""
    notifier = notifier or Notifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                log.warning("SIGHUP: nothing to reload (listen address, data dir, CA and token "
                            "need a restart: systemctl restart meshd)")
                continue
            log.info("signal %s: shutting down", signal.Signals(sig).name)
            notifier.stopping()
            shutdown.set()
            await trio.sleep(GRACEFUL_TIMEOUT)
            cancel.cancel()
            return


async def _serve(app: Any, config: Config, shutdown: trio.Event, done: trio.CancelScope, *,
                 task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """hypercorn until ``shutdown`` and its graceful close; then cancel ``done`` (the nursery)."""
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
    done.cancel()


async def run(listen: str, data_dir: str | Path, token: str = "",
              identity_config: IdentityConfig | None = None,
              tls: tuple[str, str] | None = None, registry: MeshdConfig | None = None) -> None:
    """Serve until SIGTERM/SIGINT; ``tls`` = (certificate PEM file, key PEM file) serves the API
    over HTTPS; ``registry`` = the discovery sources of ``meshd.toml`` (default: built-in only).
    Raises ConfigError if the store or the CA cannot be opened."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    store = SqliteStore(data_dir)
    cp = ControlPlane(store, config=registry)
    try:
        identity = IdentityService.open(data_dir, identity_config or IdentityConfig(), store)
    except BaseException:
        store.close()
        raise
    identity.on_bundle_change = cp.rebuild
    cp.start()
    if not token:
        log.warning("no operator token (--token/MESHD_TOKEN): the API is open to anyone who can "
                    "reach %s, including rule changes and join-token creation", listen)
    config = Config()
    config.bind = [listen]
    if tls is not None:
        config.certfile, config.keyfile = tls
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.accesslog = None
    shutdown, notifier = trio.Event(), Notifier()
    log.info("meshd epoch %d listening on %s, data in %s", cp.epoch, listen, store.path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep, cp)
            for src in factory.build(cp.config):
                nursery.start_soon(_run_source, src, cp)
            nursery.start_soon(_signals, nursery.cancel_scope, shutdown, notifier)
            nursery.start_soon(notifier.run_watchdog)
            # hypercorn calls started() once bound: READY=1 (store, CA and API are up), Type=notify
            await nursery.start(_serve, build_app(cp, token, identity), config, shutdown,
                                nursery.cancel_scope)
            notifier.ready(f"epoch {cp.epoch}, API on {listen}")
    finally:
        store.close()
