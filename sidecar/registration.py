"""Register this instance in meshd's built-in registry, keep its lease, deregister on exit.

Heartbeats every ``ttl / HEARTBEAT_DIVISOR`` seconds (Consul convention: pass a TTL check every
TTL/3). A 404 on heartbeat means meshd forgot us (restart, expiry): re-register at once. meshd
being down is retried forever with the heartbeat period; it never stops the data plane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import trio

from sidecar.bootstrap import Bootstrap
from sidecar.control import auth_headers

log = logging.getLogger("sidecar.registration")
HEARTBEAT_DIVISOR = 3
CALL_TIMEOUT = 5.0  # seconds per registry call


class Registration:
    def __init__(self, boot: Bootstrap, client: httpx.AsyncClient,
                 token: Callable[[], str] | None = None) -> None:
        self.boot = boot
        self.token = token
        self.client = client
        self.registered = False
        self._scope = trio.CancelScope()  # cancelled by deregister(): no re-register in drain

    def _instance(self) -> dict[str, object]:
        b = self.boot
        labels = {"app": b.service, **b.labels}
        return {"service": b.service, "instance_id": b.instance_id, "address": b.advertise_address,
                "port": b.inbound_port, "labels": labels, "source": "builtin", "ttl": b.ttl,
                "namespace": b.namespace}

    async def register(self) -> None:
        url = f"{self.boot.meshd_addr}/v1/registry/instances"
        with trio.fail_after(CALL_TIMEOUT):
            resp = await self.client.post(url, json=self._instance(),
                                          headers=auth_headers(self.boot, self.token))
        resp.raise_for_status()
        self.registered = True
        log.info("registered %s as %s", self.boot.service, self.boot.instance_id)

    async def heartbeat(self) -> None:
        url = f"{self.boot.meshd_addr}/v1/registry/instances/{self.boot.instance_id}/heartbeat"
        with trio.fail_after(CALL_TIMEOUT):
            resp = await self.client.put(url, headers=auth_headers(self.boot, self.token))
        if resp.status_code == 404:
            self.registered = False
            await self.register()
            return
        resp.raise_for_status()

    async def run(self) -> None:
        """Register, then heartbeat every ttl/3 until ``deregister`` is called."""
        period = self.boot.ttl / HEARTBEAT_DIVISOR
        with self._scope:
            while True:
                try:
                    await (self.heartbeat() if self.registered else self.register())
                except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
                    log.warning("registry call failed: %s", exc)
                await trio.sleep(period)

    async def deregister(self) -> None:
        """Stop heartbeats, then deregister: best effort, bounded by CALL_TIMEOUT, never raises."""
        self._scope.cancel()
        url = f"{self.boot.meshd_addr}/v1/registry/instances/{self.boot.instance_id}"
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await self.client.delete(url, headers=auth_headers(self.boot, self.token))
            log.info("deregistered %s", self.boot.instance_id)
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            log.warning("deregister failed: %s", exc)
        self.registered = False
