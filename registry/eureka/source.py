"""Eureka discovery source: full fetch, then a delta fetch every ``poll`` seconds.

``EurekaSource(name="eureka", address=DEFAULT_ADDRESS, poll=DEFAULT_POLL, retry_max=RETRY_MAX,
timeout=REQUEST_TIMEOUT)``:

* ``address`` is the Eureka service URL with its prefix, as Eureka clients take it:
  ``http://host:8761/eureka`` (Spring Cloud) or ``http://host:8080/eureka/v2`` (Netflix). With
  no path (``http://host:8761``) the source probes ``/eureka`` then ``/eureka/v2``;
* ``GET {address}/apps`` then every ``poll`` s ``GET {address}/apps/delta`` (JSON,
  ``Accept: application/json``), applied to the local copy and checked against the delta's
  ``apps__hashcode`` — on a mismatch (missed deltas) a full fetch follows, as Netflix's
  ``DiscoveryClient`` does;
* ``sink.update`` after the first fetch and after every change (only ``UP`` instances);
  a failed fetch is ``sink.error(msg)`` with exponential back-off, and the next successful
  cycle is a full fetch that always publishes (so staleness clears).
"""

from __future__ import annotations

import logging
import urllib.parse

import httpx
import trio

from meshd.errors import RegistryError, RegistryUnavailable
from registry.eureka import convert
from registry.model import Instance
from registry.source import SourceSink

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8761/eureka"  # py-eureka-client / Spring Cloud default
DEFAULT_POLL = 30.0  # seconds; Netflix registryFetchIntervalSeconds
RETRY_MIN = 0.5  # seconds
RETRY_MAX = 30.0  # seconds; never slower than one normal poll when the server is back
REQUEST_TIMEOUT = 10.0  # seconds per request
PREFIXES = ("/eureka", "/eureka/v2")  # Spring Cloud Netflix, Netflix Eureka
JSON = {"Accept": "application/json"}


class EurekaSource:
    """A ``DiscoverySource`` over Eureka's REST API (see the module docstring)."""

    def __init__(self, name: str = "eureka", *, address: str = DEFAULT_ADDRESS, poll: float = DEFAULT_POLL,
                 retry_max: float = RETRY_MAX, timeout: float = REQUEST_TIMEOUT) -> None:
        self.name = name
        self.address = address.rstrip("/")
        self.poll, self.retry_max, self.timeout = poll, retry_max, timeout
        self.full_fetches = 0
        self.delta_fetches = 0
        bare = urllib.parse.urlsplit(self.address).path in ("", "/")
        self._base: str | None = None if bare else self.address
        self._published: list[Instance] | None = None

    async def watch(self, sink: SourceSink) -> None:
        registry: convert.Registry | None = None  # None: the next cycle is a full fetch
        delay = RETRY_MIN
        async with httpx.AsyncClient(headers=JSON, timeout=self.timeout) as client:
            while True:
                force = registry is None
                try:
                    registry = await self._cycle(client, registry)
                except RegistryError as err:
                    registry = None
                    sink.error(f"eureka {self.address}: {err}")
                    await trio.sleep(delay)
                    delay = min(delay * 2, self.retry_max)
                    continue
                delay = RETRY_MIN
                view = convert.instances(registry, self.name)
                if force or view != self._published:
                    self._published = view
                    sink.update(view)
                await trio.sleep(self.poll)

    async def _cycle(self, client: httpx.AsyncClient, registry: convert.Registry | None) -> convert.Registry:
        if registry is not None:
            self.delta_fetches += 1
            new, server_hash = convert.apply_delta(registry, await self._get(client, "/apps/delta"))
            if convert.reconcile_hashcode(new) == server_hash:
                return new
            log.info("eureka %s: hash %s != %s after delta, full fetch", self.address,
                     convert.reconcile_hashcode(new), server_hash)
        self.full_fetches += 1
        full, _ = convert.parse_full(await self._get(client, "/apps"))
        return full

    async def _get(self, client: httpx.AsyncClient, path: str) -> object:
        if self._base is None:
            self._base = await self._probe(client)
        try:
            r = await client.get(self._base + path)
        except httpx.HTTPError as err:
            raise RegistryUnavailable(f"GET {path}: {type(err).__name__}: {err}") from err
        if r.status_code != 200:
            raise RegistryUnavailable(f"GET {path}: HTTP {r.status_code}")
        try:
            return r.json()
        except ValueError as err:
            raise RegistryError(f"GET {path}: not JSON ({r.headers.get('content-type')})") from err

    async def _probe(self, client: httpx.AsyncClient) -> str:
        """Find the prefix of a server given as bare ``scheme://host:port``."""
        for prefix in PREFIXES:
            try:
                r = await client.get(f"{self.address}{prefix}/apps")
            except httpx.HTTPError as err:
                raise RegistryUnavailable(f"probe {prefix}: {type(err).__name__}: {err}") from err
            if r.status_code == 200:
                return self.address + prefix
        raise RegistryUnavailable(f"no Eureka API under {' or '.join(PREFIXES)}")

    def view(self) -> list[Instance]:
        return list(self._published or ())
