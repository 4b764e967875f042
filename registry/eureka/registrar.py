"""Eureka registrar: register, renew the lease (heartbeat), cancel.

``EurekaRegistrar(address=DEFAULT_ADDRESS, *, app=None, renewal=DEFAULT_RENEWAL,
duration=DEFAULT_DURATION, data_center="MyOwn", timeout=REQUEST_TIMEOUT)``:

* ``register`` -> ``POST {address}/apps/{APP}`` with ``{"instance": ...}`` (204); APP =
  ``app`` or the service name upper-cased; ``leaseInfo`` carries ``renewal``/``duration``;
* ``heartbeat`` (every ``heartbeat_interval`` = ``renewal`` s, Eureka's 30 s) -> ``PUT
  {address}/apps/{APP}/{id}?status=UP&lastDirtyTimestamp=...``; **404 -> register again**
  (the server evicted or never knew the instance);
* ``deregister`` -> ``DELETE {address}/apps/{APP}/{id}`` (404 is fine: already gone).

``address`` includes the prefix (``.../eureka`` or ``.../eureka/v2``). Failures raise
``RegistryError``.
"""

from __future__ import annotations

import time

import httpx

from meshd.errors import RegistryError, RegistryUnavailable
from registry.eureka import convert
from registry.eureka.source import DEFAULT_ADDRESS, REQUEST_TIMEOUT
from registry.model import Instance

DEFAULT_RENEWAL = 30.0  # seconds; Eureka renewalIntervalInSecs
DEFAULT_DURATION = 90.0  # seconds; Eureka durationInSecs (lease expiry without renewal)
JSON = {"Accept": "application/json", "Content-Type": "application/json"}


class EurekaRegistrar:
    """A ``Registrar`` on a Eureka server (see the module docstring)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, app: str | None = None,
                 renewal: float = DEFAULT_RENEWAL, duration: float = DEFAULT_DURATION,
                 data_center: str = "MyOwn", timeout: float = REQUEST_TIMEOUT) -> None:
        self.address = address.rstrip("/")
        self.app, self.renewal, self.duration = app, renewal, duration
        self.data_center, self.timeout = data_center, timeout
        self.heartbeat_interval = renewal
        self.registrations = 0

    def _app(self, inst: Instance) -> str:
        return (self.app or inst.service).upper()

    async def _call(self, method: str, path: str, **kw: object) -> int:
        try:
            async with httpx.AsyncClient(headers=JSON, timeout=self.timeout) as c:
                r = await c.request(method, self.address + path, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as err:
            raise RegistryUnavailable(f"eureka {method} {path}: {type(err).__name__}: {err}") from err
        return r.status_code

    async def register(self, inst: Instance) -> None:
        now = int(time.time() * 1000)
        body = convert.registration(inst, self._app(inst), max(1.0, self.renewal), max(1.0, self.duration),
                                    now, self.data_center)
        status = await self._call("POST", f"/apps/{self._app(inst)}", json=body)
        if status not in (200, 204):
            raise RegistryError(f"eureka register {inst.instance_id}: HTTP {status}")
        self.registrations += 1

    async def heartbeat(self, inst: Instance) -> None:
        params = {"status": "UP", "lastDirtyTimestamp": str(int(time.time() * 1000))}
        status = await self._call("PUT", f"/apps/{self._app(inst)}/{inst.instance_id}", params=params)
        if status == 404:
            await self.register(inst)
        elif status != 200:
            raise RegistryError(f"eureka heartbeat {inst.instance_id}: HTTP {status}")

    async def deregister(self, inst: Instance) -> None:
        status = await self._call("DELETE", f"/apps/{self._app(inst)}/{inst.instance_id}")
        if status not in (200, 404):
            raise RegistryError(f"eureka cancel {inst.instance_id}: HTTP {status}")
