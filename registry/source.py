"""The discovery and registration seams every platform adapter implements.

Discovery: a ``DiscoverySource`` runs ``watch(sink)`` for the life of meshd (inside meshd's
nursery). After its first successful read and after every change it calls
``sink.update(instances)`` with the source's **full** current view (not a delta); when a read
or watch fails it calls ``sink.error(message, service=None)`` and keeps going (retrying with
back-off) — an error is never an empty view. ``watch`` returns only when cancelled; it must not
block the trio loop (blocking libraries run in ``trio.to_thread.run_sync``).

Conversion from each platform's JSON to ``Instance`` is pure code in the adapter's
``convert.py`` (table-tested on documented fixtures); the I/O shell is separate.

Registration: a ``Registrar`` is what a sidecar uses to put its own instance into a platform
(Consul agent service + TTL check, Eureka register/heartbeat/cancel, etcd key + lease, meshd's
built-in API). ``register`` once, ``heartbeat`` every ``heartbeat_interval`` seconds (a
registrar re-registers by itself when the platform forgot the instance: Eureka 404, lease gone),
``deregister`` on drain. All three raise ``RegistryError`` on failure.

Merging, staleness and the mass-disappearance guard live in ``registry.merge`` and see only
``Instance`` values, never a platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from registry.model import Instance


class SourceSink(Protocol):
    """Where a source reports (implemented by ``registry.merge``)."""

    def update(self, instances: Sequence[Instance]) -> None:
        """The source's complete, current view (every ``Instance.source`` = the source name)."""

    def error(self, message: str, service: str | None = None) -> None:
        """A failed read: the whole source (``service=None``) or one service is now stale."""


class DiscoverySource(Protocol):
    name: str  # unique per meshd, e.g. "consul", "consul-dc2", "docker", "etcd", "static"

    async def watch(self, sink: SourceSink) -> None: ...


class Registrar(Protocol):
    heartbeat_interval: float  # seconds

    async def register(self, inst: Instance) -> None: ...

    async def heartbeat(self, inst: Instance) -> None: ...

    async def deregister(self, inst: Instance) -> None: ...
