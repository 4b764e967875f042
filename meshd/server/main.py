"""``meshd serve``: the controller process — API server + TTL sweeper, on trio.

Runs hypercorn's trio worker with the Starlette app from ``api.py`` and a task that expires
built-in registry instances every ``EXPIRY_SWEEP_INTERVAL`` seconds. SIGTERM/SIGINT stop both
cleanly (structured concurrency: one nursery, no orphan tasks). The identity service (CA in
``<data-dir>/ca``, join/session tokens) is opened before the API starts; without an operator
token the API is open to anyone who reaches it, which is logged as a warning.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from meshd.identity.service import IdentityConfig, IdentityService
from meshd.server.api import build_app
from meshd.server.control import ControlPlane
from meshd.store.sqlite import SqliteStore
from registry.builtin import EXPIRY_SWEEP_INTERVAL

log = logging.getLogger("meshd")
DEFAULT_LISTEN = "127.0.0.1:15010"  # Istio pilot's plaintext xDS port
GRACEFUL_TIMEOUT = 3.0  # seconds; hypercorn default
KEEP_ALIVE_TIMEOUT = 330.0  # seconds; longer than the longest long-poll (api.MAX_LONG_POLL)


async def _sweep(cp: ControlPlane) -> None:
    while True:
        await trio.sleep(EXPIRY_SWEEP_INTERVAL)
        cp.expire()


async def _signals(cancel: trio.CancelScope, shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for sig in sigs:
            log.info("signal %s: shutting down", signal.Signals(sig).name)
            shutdown.set()
            await trio.sleep(GRACEFUL_TIMEOUT)
            cancel.cancel()
            return


async def run(listen: str, data_dir: str | Path, token: str = "",
              identity_config: IdentityConfig | None = None,
              tls: tuple[str, str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; ``tls`` = (certificate PEM file, key PEM file) serves the API
    over HTTPS. Raises ConfigError if the store or the CA cannot be opened."""
    store = SqliteStore(data_dir)
    cp = ControlPlane(store)
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
    shutdown = trio.Event()
    log.info("meshd epoch %d listening on %s, data in %s", cp.epoch, listen, store.path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep, cp)
            nursery.start_soon(_signals, nursery.cancel_scope, shutdown)
            await serve(build_app(cp, token, identity), config, shutdown_trigger=shutdown.wait)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
