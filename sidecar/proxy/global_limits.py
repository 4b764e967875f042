"""Global rate limits at the caller's outbound: slices of quota from meshd (``POST /v1/quota``).

Per (limit, key value) one ``SliceBucket``: when it runs low the request that notices asks meshd
for the next slice (about 10 % of the limit), so most requests only decrement a counter. If
meshd cannot be reached the bucket degrades (requests pass; the local limits still apply) and
asks again after ``RETRY_IN`` seconds — a control-plane outage never blocks traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import httpx
import trio

from meshd.snapshot.model import RateLimit
from sidecar.core.ratelimit import QuotaGrant, RateDecision, SliceBucket

log = logging.getLogger("sidecar.quota")
RETRY_IN = 1.0         # seconds before asking meshd again after a failure
ASK_TIMEOUT = 2.0      # seconds for one quota call
KeySource = Callable[[str], str | None]


class GlobalLimits:
    def __init__(self, meshd_addr: str, node: str, client: httpx.AsyncClient,
                 headers: Callable[[], Mapping[str, str]]) -> None:
        self.url = f"{meshd_addr}/v1/quota"
        self.node = node
        self.client = client
        self.headers = headers
        self._buckets: dict[tuple[str, str], SliceBucket] = {}

    async def check(self, limits: tuple[RateLimit, ...], host: str, route: str,
                    key_source: KeySource) -> RateDecision:
        """Take one token from every global limit on (host, route), asking meshd as needed."""
        for limit in limits:
            if limit.scope != "global" or limit.host != host or limit.route not in ("", route):
                continue
            key = (key_source(limit.key) or "") if limit.key else ""
            bucket = self._buckets.setdefault((limit.name, key), SliceBucket())
            now = trio.current_time()
            if bucket.needs_more(now):
                bucket.begin_request(now)
                await self._ask(bucket, limit.name, key, now)
            if not bucket.take(trio.current_time()):
                return RateDecision(False, limit.name, bucket.retry_after(trio.current_time()))
        return RateDecision(True)

    async def _ask(self, bucket: SliceBucket, name: str, key: str, now: float) -> None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                resp = await self.client.post(self.url, headers=dict(self.headers()),
                                              json={"limit": name, "client": self.node, "key": key})
            resp.raise_for_status()
            doc = resp.json()
            bucket.add(QuotaGrant(int(doc["tokens"]), int(doc["window"]),
                                  float(doc["expires_in"])), requested_at=now)
        except (httpx.HTTPError, trio.TooSlowError, KeyError, ValueError) as exc:
            log.warning("global limit %s: meshd quota unavailable (%s); passing traffic", name, exc)
            bucket.failed(trio.current_time(), RETRY_IN)
