"""Register this instance, keep its lease, deregister on exit — in the registry the bootstrap's
``[registry]`` table names (``registry.config.RegistrarConfig``; default meshd's built-in one).

``make_registrar`` picks a ``registry.source.Registrar``: ``MeshdRegistrar`` (meshd's API),
``ConsulRegistrar`` (agent service + TTL check), ``EurekaRegistrar`` (register/renew/cancel) or
``EtcdRegistrar`` (key on a lease). ``Registration`` drives it: register, then heartbeat every
``registrar.heartbeat_interval`` s (meshd: ``ttl / HEARTBEAT_DIVISOR``, Consul convention: pass
a TTL check every TTL/3); each registrar re-registers by itself when the registry forgot the
instance (meshd 404, Eureka 404, etcd lease gone). A registry being down is retried forever
with the heartbeat period; it never stops the data plane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import msgspec
import trio

from meshd.errors import RegistryError
from registry.model import Instance
from registry.source import Registrar
from sidecar.bootstrap import Bootstrap
from sidecar.control import auth_headers

log = logging.getLogger("sidecar.registration")
HEARTBEAT_DIVISOR = 3
CALL_TIMEOUT = 5.0  # seconds per registry call


def instance_of(boot: Bootstrap) -> Instance:
    """This sidecar's instance: its inbound listener, labels (+ ``app``), TTL, namespace."""
    return Instance(service=boot.service, instance_id=boot.instance_id, address=boot.advertise_address,
                    port=boot.inbound_port, labels={"app": boot.service, **boot.labels},
                    ttl=boot.ttl, namespace=boot.namespace, protocol=boot.app_protocol)


class MeshdRegistrar:
    """``Registrar`` on meshd's built-in registry (``/v1/registry/instances``)."""

    def __init__(self, boot: Bootstrap, client: httpx.AsyncClient,
                 token: Callable[[], str] | None = None) -> None:
        self.boot, self.client, self.token = boot, client, token
        self.heartbeat_interval = boot.ttl / HEARTBEAT_DIVISOR
        self._base = f"{boot.meshd_addr}/v1/registry/instances"

    async def register(self, inst: Instance) -> None:
        body = {**msgspec.to_builtins(inst), "source": "builtin"}
        with trio.fail_after(CALL_TIMEOUT):
            resp = await self.client.post(self._base, json=body,
                                          headers=auth_headers(self.boot, self.token))
        resp.raise_for_status()

    async def heartbeat(self, inst: Instance) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            resp = await self.client.put(f"{self._base}/{inst.instance_id}/heartbeat",
                                         headers=auth_headers(self.boot, self.token))
        if resp.status_code == 404:  # meshd forgot us (restart, expiry)
            await self.register(inst)
            return
        resp.raise_for_status()

    async def deregister(self, inst: Instance) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            await self.client.delete(f"{self._base}/{inst.instance_id}",
                                     headers=auth_headers(self.boot, self.token))


def make_registrar(boot: Bootstrap, client: httpx.AsyncClient,
                   token: Callable[[], str] | None = None) -> Registrar:
    """The registrar the bootstrap's ``[registry]`` names (adapters imported when used)."""
    cfg = boot.registry
    if cfg.kind == "etcd":
        from registry.etcd.registrar import EtcdRegistrar
        return EtcdRegistrar(list(cfg.endpoints), cfg.prefix, ttl=boot.ttl, client=client)
    if cfg.kind == "consul":
        from registry.consul.registrar import ConsulRegistrar
        return ConsulRegistrar(cfg.address or None, cfg.token or None, ttl=boot.ttl)
    if cfg.kind == "eureka":
        from registry.config import EUREKA_URL
        from registry.eureka.registrar import EurekaRegistrar
        return EurekaRegistrar(cfg.address or EUREKA_URL, app=cfg.app or None)
    return MeshdRegistrar(boot, client, token)


class Registration:
    def __init__(self, boot: Bootstrap, client: httpx.AsyncClient,
                 token: Callable[[], str] | None = None) -> None:
        self.boot = boot
        self.token = token
        self.client = client
        self.registrar = make_registrar(boot, client, token)
        self.instance = instance_of(boot)
        self.registered = False
        self._scope = trio.CancelScope()  # cancelled by deregister(): no re-register in drain

    async def register(self) -> None:
        await self.registrar.register(self.instance)
        self.registered = True
        log.info("registered %s as %s (%s)", self.boot.service, self.boot.instance_id,
                 self.boot.registry.kind)

    async def heartbeat(self) -> None:
        await self.registrar.heartbeat(self.instance)

    async def run(self) -> None:
        """Register, then heartbeat every ``heartbeat_interval`` until ``deregister``."""
        period = self.registrar.heartbeat_interval
        with self._scope:
            while True:
                try:
                    await (self.heartbeat() if self.registered else self.register())
                except (httpx.HTTPError, trio.TooSlowError, OSError, RegistryError) as exc:
                    log.warning("registry call failed: %s", exc)
                await trio.sleep(period)

    async def deregister(self) -> None:
        """Stop heartbeats, then deregister: best effort, bounded by CALL_TIMEOUT, never raises."""
        self._scope.cancel()
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await self.registrar.deregister(self.instance)
            log.info("deregistered %s", self.boot.instance_id)
        except (httpx.HTTPError, trio.TooSlowError, OSError, RegistryError) as exc:
            log.warning("deregister failed: %s", exc)
        self.registered = False
