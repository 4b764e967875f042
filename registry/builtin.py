"""The built-in meshd registry: register, heartbeat, deregister, TTL expiry — pure code.

Times are monotonic seconds supplied by the caller (so tests drive the clock). An instance
whose last heartbeat is older than its ``ttl`` is removed by ``expire(now)``; callers run it
at least every ``EXPIRY_SWEEP_INTERVAL`` so a dead instance is gone within one TTL plus that
sweep (Consul TTL checks turn critical after TTL; here the instance is removed outright).

Persistence is the caller's job: ``records()`` gives what to store, ``restore()`` reloads it
with a fresh lease of one TTL (meshd was down, the sidecars were not: they re-heartbeat).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshd.errors import ConfigError
from registry.model import Instance

EXPIRY_SWEEP_INTERVAL = 0.25  # seconds
MIN_TTL = 1.0
MAX_TTL = 3600.0


@dataclass(frozen=True, slots=True)
class Lease:
    instance: Instance
    expires_at: float  # monotonic seconds


class BuiltinRegistry:
    """In-memory TTL registry. ``name`` is the source name used in ``Instance.source``."""

    name = "builtin"

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}

    def register(self, inst: Instance, now: float) -> bool:
        """Add or replace; returns True if the visible instance set changed.

        Raises ConfigError for a TTL outside [MIN_TTL, MAX_TTL] or a bad port.
        """
        if not MIN_TTL <= inst.ttl <= MAX_TTL:
            raise ConfigError(f"ttl must be within {MIN_TTL}..{MAX_TTL} s", field="ttl")
        if not 0 < inst.port < 65536 or not inst.service or not inst.instance_id:
            raise ConfigError("service, instance_id and a port in 1..65535 are required")
        old = self._leases.get(inst.instance_id)
        self._leases[inst.instance_id] = Lease(inst, now + inst.ttl)
        return old is None or old.instance != inst

    def heartbeat(self, instance_id: str, now: float) -> bool:
        """Renew the lease; False if the instance is unknown (caller answers 404 -> re-register)."""
        lease = self._leases.get(instance_id)
        if lease is None:
            return False
        self._leases[instance_id] = Lease(lease.instance, now + lease.instance.ttl)
        return True

    def deregister(self, instance_id: str) -> bool:
        return self._leases.pop(instance_id, None) is not None

    def expire(self, now: float) -> list[Instance]:
        """Remove and return every instance whose lease ended before ``now``."""
        gone = [lease.instance for lease in self._leases.values() if lease.expires_at < now]
        for inst in gone:
            del self._leases[inst.instance_id]
        return gone

    def instances(self) -> list[Instance]:
        return sorted((lease.instance for lease in self._leases.values()),
                      key=lambda i: (i.service, i.instance_id))

    def expires_in(self, instance_id: str, now: float) -> float | None:
        lease = self._leases.get(instance_id)
        return None if lease is None else max(0.0, lease.expires_at - now)

    def restore(self, instances: list[Instance], now: float) -> None:
        """Reload persisted instances, each with a fresh lease of one TTL."""
        for inst in instances:
            self._leases[inst.instance_id] = Lease(inst, now + inst.ttl)
