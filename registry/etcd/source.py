"""etcd v3 discovery source: range read, then watch from the next revision — trio + httpx.

Uses etcd's JSON gRPC gateway (``POST /v3/kv/range``, streaming ``POST /v3/watch``; etcd 3.4+)
with ``httpx``: no etcd client library (the Python ``etcd3`` package is unmaintained).

One round: read every key under the prefix (revision R), report the full view, then watch the
prefix from ``R + 1`` — etcd replays everything after the read, so nothing is missed. A watch
that etcd cancels (compaction: ``compact_revision``; or any cancel) ends the round quietly and a
new round relists. A connection failure reports ``sink.error`` (the last good view stays,
stale) and retries with back-off over the configured endpoints in turn. A value that does not
parse is reported for its service (``sink.error(msg, service)``, again after every update
while it stays bad) and its key keeps its last good instance.
"""

from __future__ import annotations

import json
import logging

import httpx
import trio

from registry.config import ETCD_ENDPOINT, ETCD_PREFIX
from registry.etcd.convert import Batch, parse_range, parse_watch, prefix_range
from registry.model import Instance
from registry.source import SourceSink

log = logging.getLogger("registry.etcd")
CALL_TIMEOUT = 5.0    # seconds per unary gateway call
BACKOFF = (0.2, 5.0)  # seconds: first retry, cap (doubling)


class Relist(Exception):
    """etcd cancelled the watch (compaction or otherwise): read again."""


class EtcdSource:
    """``DiscoverySource`` over etcd's v3 JSON gateway (see module doc)."""

    def __init__(self, name: str = "etcd", endpoints: list[str] | None = None,
                 prefix: str = ETCD_PREFIX) -> None:
        self.name = name
        self.endpoints = [e.rstrip("/") for e in (endpoints or [ETCD_ENDPOINT])]
        self.prefix = prefix
        self.kvs: dict[str, Instance] = {}
        self.broken: dict[str, tuple[str, str]] = {}  # key -> (service, problem): last good kept
        self.rounds = 0
        self.relists = 0  # rounds started because etcd cancelled a watch

    def _apply(self, batch: Batch) -> bool:
        changed = False
        for key, inst in batch.changes:
            self.broken.pop(key, None)
            old = self.kvs.pop(key, None) if inst is None else self.kvs.get(key)
            if inst is not None:
                self.kvs[key] = inst
            changed |= old != inst
        for key, service, problem in batch.problems:
            self.broken[key] = (service, problem)
        return changed

    def _report(self, sink: SourceSink, changed: bool) -> None:
        """Publish the view if it changed, then (re-)report every key whose value is bad: an
        update clears a service's staleness, and the service is still stale."""
        if changed:
            sink.update(self._view())
        for service, problem in self.broken.values():
            sink.error(f"etcd: {problem}", service or None)

    def _view(self) -> list[Instance]:
        return list(self.kvs.values())

    async def _round(self, client: httpx.AsyncClient, sink: SourceSink) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            resp = await client.post("/v3/kv/range", json=prefix_range(self.prefix))
        batch = parse_range(resp.raise_for_status().json(), self.prefix, self.name)
        self.kvs, self.broken = {}, {}
        self._apply(batch)
        self._report(sink, True)
        self.rounds += 1
        create = {**prefix_range(self.prefix), "start_revision": str(batch.revision + 1)}
        async with client.stream("POST", "/v3/watch", json={"create_request": create}) as stream:
            stream.raise_for_status()
            async for line in stream.aiter_lines():
                if not line.strip():
                    continue
                msg = parse_watch(json.loads(line), self.prefix, self.name)
                if msg.canceled:
                    raise Relist(msg.cancel_reason or f"compacted at {msg.compact_revision}")
                if msg.changes or msg.problems:
                    self._report(sink, self._apply(msg))
        raise httpx.ReadError("watch stream ended")

    async def watch(self, sink: SourceSink) -> None:
        delay, n = BACKOFF[0], 0
        while True:
            endpoint = self.endpoints[n % len(self.endpoints)]
            rounds = self.rounds
            try:
                async with httpx.AsyncClient(base_url=endpoint,
                                             timeout=httpx.Timeout(CALL_TIMEOUT, read=None)) as client:
                    await self._round(client, sink)
            except Relist as exc:
                self.relists += 1
                log.info("etcd source %s: watch cancelled (%s), relisting", self.name, exc)
            except (httpx.HTTPError, OSError, ValueError, KeyError, trio.TooSlowError) as exc:
                sink.error(f"etcd {endpoint}: {type(exc).__name__}: {exc}")
                (log.warning if delay == BACKOFF[0] else log.debug)(
                    "etcd source %s: %s; retrying in %.1fs", self.name, exc, delay)
                n += 1
            if self.rounds > rounds:
                delay = BACKOFF[0]
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])
