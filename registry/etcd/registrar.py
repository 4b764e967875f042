"""etcd v3 registrar: the sidecar's instance as a key on a lease it keeps alive — httpx.

``register``: ``POST /v3/lease/grant {"TTL": ceil(inst.ttl)}``, then ``POST /v3/kv/put`` of
``<prefix><service>/<instance_id>`` with that lease. ``heartbeat`` (every ``ttl / 3`` s, the
Consul TTL-check convention): ``POST /v3/lease/keepalive {"ID": lease}``; a reply without a
``TTL`` means etcd forgot the lease (expired during a partition, etcd data lost): register
again at once. ``deregister``: ``POST /v3/lease/revoke`` (deletes the key with the lease). A
sidecar killed without deregistering stops renewing: etcd expires the lease after ``ttl``
seconds and deletes the key, which every meshd watching the prefix sees as a ``DELETE``.

Every failure raises ``RegistryUnavailable`` (the caller retries on its heartbeat period).
"""

from __future__ import annotations

import math

import httpx
import trio

from meshd.errors import RegistryUnavailable
from registry.config import ETCD_ENDPOINT, ETCD_PREFIX
from registry.etcd.convert import b64, key_of, value_of
from registry.model import Instance

CALL_TIMEOUT = 5.0    # seconds per gateway call
HEARTBEAT_DIVISOR = 3  # keepalive every ttl/3 (Consul TTL-check convention)


class EtcdRegistrar:
    """``Registrar`` over etcd's v3 JSON gateway; tries ``endpoints`` in turn."""

    def __init__(self, endpoints: list[str] | None = None, prefix: str = ETCD_PREFIX,
                 ttl: float = 10.0, client: httpx.AsyncClient | None = None) -> None:
        self.endpoints = [e.rstrip("/") for e in (endpoints or [ETCD_ENDPOINT])]
        self.prefix = prefix
        self.heartbeat_interval = ttl / HEARTBEAT_DIVISOR
        self.client = client or httpx.AsyncClient(timeout=CALL_TIMEOUT)
        self.lease = ""  # int64 as the gateway writes it

    async def _call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        last: Exception | None = None
        for endpoint in self.endpoints:
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    resp = await self.client.post(endpoint + path, json=body)
                resp.raise_for_status()
                return dict(resp.json())
            except (httpx.HTTPError, trio.TooSlowError, OSError, ValueError) as exc:
                last = exc
        raise RegistryUnavailable(f"etcd {path}: {type(last).__name__}: {last}")

    async def register(self, inst: Instance) -> None:
        grant = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(inst.ttl)))})
        lease = str(grant.get("ID") or "")
        if not lease:
            raise RegistryUnavailable(f"etcd refused a lease: {grant.get('error') or grant}")
        await self._call("/v3/kv/put", {"key": b64(key_of(self.prefix, inst)), "value": value_of(inst),
                                        "lease": lease})
        self.lease = lease

    async def heartbeat(self, inst: Instance) -> None:
        if not self.lease:
            await self.register(inst)
            return
        reply = await self._call("/v3/lease/keepalive", {"ID": self.lease})
        result = reply.get("result")
        ttl = int(result.get("TTL") or 0) if isinstance(result, dict) else 0
        if ttl <= 0:  # lease gone: etcd expired it or lost it
            self.lease = ""
            await self.register(inst)

    async def deregister(self, inst: Instance) -> None:
        lease, self.lease = self.lease, ""
        if lease:
            await self._call("/v3/lease/revoke", {"ID": lease})
        else:
            await self._call("/v3/kv/deleterange", {"key": b64(key_of(self.prefix, inst))})
