"""The sidecar's subscription to meshd: long-poll snapshots, ACK/NACK, last-good cache on disk.

Loop: ``GET /v1/snapshot/<node>?version=<known>&wait=30`` — 200 carries a new snapshot, 304
means unchanged. A new snapshot is validated (``state.prepare``); valid ⇒ swap, write to
``<data_dir>/snapshot.json`` (atomic rename) and ACK; invalid ⇒ keep the current one and NACK
with the reason (Envoy xDS semantics). Any meshd failure ⇒ keep serving, back off with full
jitter from ``BACKOFF_MIN`` to ``BACKOFF_MAX`` seconds, and retry forever. At start the disk
cache is applied first, so a sidecar restarted while meshd is down still serves.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import trio

from meshd.errors import ConfigError
from meshd.snapshot.model import Snapshot, decode, encode
from sidecar.bootstrap import Bootstrap
from sidecar.metrics import Metrics
from sidecar.state import State, prepare

log = logging.getLogger("sidecar.control")
LONG_POLL_WAIT = 30.0   # seconds the server may hold a watch
BACKOFF_MIN = 0.2       # seconds
BACKOFF_MAX = 5.0       # seconds; Envoy's xDS retry back-off caps at a few seconds too
CACHE_FILE = "snapshot.json"


def auth_headers(boot: Bootstrap, token: Callable[[], str] | None = None) -> dict[str, str]:
    """Bearer header: ``token()`` (the certificate's session token) or the bootstrap token."""
    value = token() if token is not None else boot.token
    return {"authorization": f"Bearer {value}"} if value else {}


class Subscription:
    def __init__(self, boot: Bootstrap, state: State, metrics: Metrics,
                 client: httpx.AsyncClient, token: Callable[[], str] | None = None) -> None:
        self.boot = boot
        self.token = token
        self.state = state
        self.metrics = metrics
        self.client = client
        self.known = ""          # last version seen (applied or NACKed)
        self.cache_path = Path(boot.data_dir) / CACHE_FILE
        self.ready = trio.Event()

    def load_cache(self) -> bool:
        """Apply the on-disk snapshot, if any and valid; True if applied."""
        try:
            snap = decode(self.cache_path.read_bytes())
            self.state.swap(prepare(snap, "disk-cache"))
        except FileNotFoundError:
            return False
        except (OSError, msgspec.MsgspecError, ConfigError) as exc:
            log.warning("ignoring snapshot cache %s: %s", self.cache_path, exc)
            return False
        self.known = str(snap.version)
        self.metrics.snapshot_applied.set_to_current_time()
        self.ready.set()
        log.info("serving cached snapshot %s from %s", snap.version, self.cache_path)
        return True

    def _write_cache(self, snap: Snapshot) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_bytes(encode(snap))
        os.replace(tmp, self.cache_path)

    def _params(self) -> dict[str, str]:
        b = self.boot
        return {"version": self.known, "wait": str(LONG_POLL_WAIT), "service": b.service,
                "inbound_port": str(b.inbound_port), "outbound_port": str(b.outbound_port),
                "admin_port": str(b.admin_port), "app_port": str(b.app_port)}

    async def _ack(self, version: str, error: str | None) -> None:
        url = f"{self.boot.meshd_addr}/v1/snapshot/{self.boot.node}/ack"
        await self.client.post(url, json={"version": version, "error": error},
                               headers=auth_headers(self.boot, self.token))

    async def _apply(self, body: bytes) -> None:
        try:
            snap = decode(body)
            applied = prepare(snap, "meshd")
        except (msgspec.MsgspecError, ConfigError) as exc:
            version = self._peek_version(body)
            log.error("NACK snapshot %s: %s", version, exc)
            self.metrics.nacks.inc()
            self.known = version
            await self._ack(version, str(exc))
            return
        self.state.swap(applied)
        self.known = str(snap.version)
        self.metrics.snapshot_applied.set_to_current_time()
        self.ready.set()
        try:
            self._write_cache(snap)
        except OSError as exc:
            log.warning("cannot write snapshot cache: %s", exc)
        log.info("applied snapshot %s", snap.version)
        await self._ack(self.known, None)

    @staticmethod
    def _peek_version(body: bytes) -> str:
        try:
            doc = msgspec.json.decode(body)
            epoch, counter = doc["version"]
            return f"{int(epoch)}.{int(counter)}"
        except Exception:
            return "unknown"

    async def poll_once(self) -> None:
        """One long-poll round trip; raises httpx.HTTPError / trio.TooSlowError on failure."""
        url = f"{self.boot.meshd_addr}/v1/snapshot/{self.boot.node}"
        with trio.fail_after(LONG_POLL_WAIT + 10):
            resp = await self.client.get(url, params=self._params(),
                                         headers=auth_headers(self.boot, self.token))
        if resp.status_code == 200:
            await self._apply(resp.content)
        elif resp.status_code != 304:
            raise httpx.HTTPStatusError(f"meshd answered {resp.status_code}",
                                        request=resp.request, response=resp)
        self.metrics.meshd_connected.set(1)

    async def run(self) -> None:
        """Poll forever; never raises for meshd failures."""
        delay = BACKOFF_MIN
        while True:
            try:
                await self.poll_once()
                delay = BACKOFF_MIN
            except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
                self.metrics.meshd_connected.set(0)
                log.warning("meshd unreachable (%s); keeping snapshot %s", exc, self.known or "-")
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX)
