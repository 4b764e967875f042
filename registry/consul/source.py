"""Consul discovery source: blocking queries on the catalog and on each service's health.

``ConsulSource(name="consul", address=None, token=None, datacenter=None, services=None,
wait=DEFAULT_WAIT, rate_interval=RATE_INTERVAL, retry_max=RETRY_MAX)``:

* one loop blocks on ``GET /v1/catalog/services`` and starts/stops one loop per service;
* each service loop blocks on ``GET /v1/health/service/:name?passing`` (``index``/``wait``
  as blocking.mdx documents: reset to 0 when the index goes backwards, >= 1 otherwise, a
  token bucket per loop, exponential back-off on errors);
* after the first read of every known service, and after every change, ``sink.update`` gets
  the full view; a service whose last read failed is left out of updates (the merger keeps its
  last good instances) and reported with ``sink.error(msg, service)``; a failed catalog read
  is ``sink.error(msg)`` and holds every update until the catalog reads again. Recovery always
  publishes, so staleness clears.

``address``/``token`` follow the consul CLI (explicit, else ``CONSUL_HTTP_ADDR`` /
``CONSUL_HTTP_TOKEN``); ``datacenter`` = ``?dc=`` (None: the agent's); ``services``: watch
only these names (None: every service in the catalog except ``consul``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio
from consul.exceptions import ConsulException

from meshd.errors import RegistryError
from registry.consul import convert
from registry.consul.transport import TrioConsul
from registry.model import Instance
from registry.source import SourceSink

log = logging.getLogger(__name__)

DEFAULT_WAIT = 300.0  # seconds; Consul's default blocking wait (5m)
MAX_WAIT = 600.0  # seconds; Consul caps wait at 10m
RETRY_MIN = 0.5  # seconds; first back-off after an error
RETRY_MAX = 15.0  # seconds; blocking.mdx suggests degrading to ~15 s polling under trouble


class _Backoff:
    def __init__(self, cap: float) -> None:
        self.cap, self.next = cap, min(RETRY_MIN, cap)

    def fail(self) -> float:
        delay, self.next = self.next, min(self.next * 2, self.cap)
        return delay

    def ok(self) -> None:
        self.next = min(RETRY_MIN, self.cap)


class ConsulSource:
    """A ``DiscoverySource`` over Consul's HTTP API (see the module docstring)."""

    def __init__(self, name: str = "consul", *, address: str | None = None, token: str | None = None,
                 datacenter: str | None = None, services: Iterable[str] | None = None,
                 wait: float = DEFAULT_WAIT, rate_interval: float = convert.RATE_INTERVAL,
                 retry_max: float = RETRY_MAX) -> None:
        self.name = name
        self.address, self.token, self.datacenter = address, token, datacenter
        self.only = frozenset(services) if services is not None else None
        self.wait = min(max(wait, 1.0), MAX_WAIT)
        self.rate_interval, self.retry_max = rate_interval, retry_max
        self._views: dict[str, tuple[Instance, ...]] = {}
        self._errored: set[str] = set()
        self._known: dict[str, trio.CancelScope] = {}
        self._published: tuple[Instance, ...] | None = None
        self._force = False
        self._catalog_failing = False

    async def watch(self, sink: SourceSink) -> None:
        async with TrioConsul(self.address, self.token, self.datacenter) as client:
            async with trio.open_nursery() as nursery:
                await self._catalog_loop(client, sink, nursery)

    async def _blocking(self, query: Callable[..., Awaitable[tuple[str, object]]], index: int,
                        bucket: convert.TokenBucket) -> tuple[str, object]:
        """One rate-limited (blocking when ``index`` > 0) query; every failure -> RegistryError."""
        await trio.sleep(bucket.delay(trio.current_time()))
        kwargs = {"index": index, "wait": convert.go_duration(self.wait)} if index else {}
        try:
            return await query(**kwargs)
        except (ConsulException, RegistryError, ValueError) as err:
            raise RegistryError(str(err) or type(err).__name__) from err

    async def _catalog_loop(self, client: TrioConsul, sink: SourceSink, nursery: trio.Nursery) -> None:
        index = 0
        bucket, backoff = convert.TokenBucket(self.rate_interval), _Backoff(self.retry_max)
        while True:
            try:
                returned, body = await self._blocking(client.catalog.services, index, bucket)
                names = convert.catalog_services(body, self.only)
            except RegistryError as err:
                self._catalog_failing, index = True, 0  # re-read at once on recovery
                sink.error(f"consul catalog: {err}")
                await trio.sleep(backoff.fail())
                continue
            backoff.ok()
            index = convert.next_index(index, returned)
            self._set_services(names, client, sink, nursery)
            if self._catalog_failing:
                self._catalog_failing, self._force = False, True
            self._publish(sink)

    def _set_services(self, names: Iterable[str], client: TrioConsul, sink: SourceSink,
                      nursery: trio.Nursery) -> None:
        wanted = set(names)
        for gone in set(self._known) - wanted:
            self._known.pop(gone).cancel()
            self._views.pop(gone, None)
            self._errored.discard(gone)
        for new in sorted(wanted - set(self._known)):
            scope = trio.CancelScope()
            self._known[new] = scope
            nursery.start_soon(self._service_loop, client, sink, new, scope)

    async def _service_loop(self, client: TrioConsul, sink: SourceSink, service: str,
                            scope: trio.CancelScope) -> None:
        index, bucket, backoff = 0, convert.TokenBucket(self.rate_interval), _Backoff(self.retry_max)
        with scope:
            while True:
                try:
                    returned, body = await self._blocking(
                        lambda **kw: client.health.service(service, passing=True, **kw), index, bucket)
                    view = tuple(convert.health_service(body, self.name))
                except RegistryError as err:
                    self._errored.add(service)
                    index = 0  # re-read at once on recovery, so staleness clears
                    sink.error(f"consul service {service}: {err}", service)
                    await trio.sleep(backoff.fail())
                    continue
                backoff.ok()
                new = convert.next_index(index, returned)
                if new == 0:
                    log.info("consul %s: index went backwards (%s < %s), resetting", service, returned, index)
                index = new
                if service in self._errored:
                    self._errored.discard(service)
                    self._force = True
                self._views[service] = view
                self._publish(sink)

    def _publish(self, sink: SourceSink) -> None:
        """Send the full view once every known service was read at least once (or failed).

        Services whose last read failed are left out (the merger keeps their last good view
        while their errors continue); nothing is sent while every service or the catalog is
        failing (the whole source is stale then).
        """
        if self._catalog_failing:
            return
        if any(s not in self._views and s not in self._errored for s in self._known):
            return
        if self._known and self._errored >= self._known.keys():
            return  # every service failing: nothing to say (an error is never an empty view)
        view = tuple(i for s in sorted(self._views) if s not in self._errored for i in self._views[s])
        if view != self._published or self._force:
            self._published, self._force = view, False
            sink.update(list(view))

    def view(self) -> Sequence[Instance]:
        """The last published view (for ``meshd services`` and tests)."""
        return list(self._published or ())
