"""Docker discovery source: list running containers, then follow the event stream — trio + httpx.

Talks to the Engine API (1.41, Docker 20.10+) directly with ``httpx`` over the Unix socket
(``unix:///var/run/docker.sock``) or TCP (``tcp://`` / ``http://``), so every call is
cancellable and no thread is needed (``ecosystem-conventions.md`` §4, pattern 2).

One round: read the daemon's clock (``GET /info`` ``SystemTime``), list and inspect the running
containers, report the full view, then stream ``GET /events?since=<that time>`` so nothing that
happened during the listing is lost (events replayed from before the listing's end only
re-inspect, so a container that died and restarted meanwhile does not flap). A
``die``/``stop``/``destroy``/``pause`` event removes the container's instances at once; ``start``,
``health_status``, network ``connect``/``disconnect`` re-inspect it. If the stream ends or
fails, the source reports ``sink.error`` (the merge layer keeps the last good view, stale) and
starts a new round after a back-off; the relist replaces the view.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from registry.config import DOCKER_SOCKET
from registry.docker.convert import EVENT_FILTER, convert, event_action
from registry.model import Instance
from registry.source import SourceSink

log = logging.getLogger("registry.docker")
API = "/v1.41"           # Docker Engine 20.10 (Debian bookworm docker.io)
CALL_TIMEOUT = 10.0      # seconds per list/inspect call
BACKOFF = (0.2, 5.0)     # seconds: first retry, cap (doubling)
SINCE_MARGIN = 1.0       # seconds of events replayed before the listing (harmless: idempotent)
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)")


def daemon_ns(system_time: str) -> int:
    """Docker's RFC 3339 ``SystemTime`` (nanosecond precision) -> Unix time in nanoseconds.
    Raises ValueError on a malformed time."""
    m = _RFC3339.fullmatch(system_time)
    if m is None:
        raise ValueError(f"bad SystemTime {system_time!r}")
    zone = "+00:00" if m.group(3) in ("Z", "z") else m.group(3)
    secs = int(datetime.datetime.fromisoformat(m.group(1) + zone).timestamp())
    return secs * 10**9 + int((m.group(2) or "0").ljust(9, "0"))


def since_param(system_time: str, margin: float = SINCE_MARGIN) -> str:
    """The ``since`` value ``<sec>.<nanos>`` for ``margin`` seconds before ``system_time``."""
    ns = daemon_ns(system_time) - int(margin * 10**9)
    return f"{ns // 10**9}.{ns % 10**9:09d}"


class DockerSource:
    """``DiscoverySource`` over the Docker Engine API (see module doc)."""

    def __init__(self, name: str = "docker", host: str = DOCKER_SOCKET, network: str = "",
                 label_prefix: str = "mesh.") -> None:
        self.name, self.host, self.network, self.prefix = name, host, network, label_prefix
        self.containers: dict[str, list[Instance]] = {}
        self._reasons: dict[str, str] = {}  # container id -> why it was last left out (logged once)
        self.rounds = 0  # completed listings (tests and logs)

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        url = urllib.parse.urlsplit(self.host)
        if url.scheme == "unix":
            transport = httpx.AsyncHTTPTransport(uds=url.path)
            base = "http://docker"
        else:
            transport, base = httpx.AsyncHTTPTransport(), f"http://{url.netloc}"
        timeout = httpx.Timeout(CALL_TIMEOUT, read=None)
        async with httpx.AsyncClient(transport=transport, base_url=base + API, timeout=timeout) as c:
            yield c

    def _view(self) -> list[Instance]:
        return [i for insts in self.containers.values() for i in insts]

    async def _inspect(self, client: httpx.AsyncClient, cid: str) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            resp = await client.get(f"/containers/{cid}/json")
        if resp.status_code == 404:
            self.containers.pop(cid, None)
            return
        resp.raise_for_status()
        instances, reason = convert(resp.json(), self.network, self.name, self.prefix)
        if instances:
            self.containers[cid] = instances
            self._reasons.pop(cid, None)
        else:
            self.containers.pop(cid, None)
            if not reason.startswith("no service name") and self._reasons.get(cid) != reason:
                log.info("container %s left out: %s", cid[:12], reason)  # meshed, but not routable
            self._reasons[cid] = reason

    async def _clock(self, client: httpx.AsyncClient) -> str:
        with trio.fail_after(CALL_TIMEOUT):
            return str((await client.get("/info")).raise_for_status().json()["SystemTime"])

    async def _list(self, client: httpx.AsyncClient) -> tuple[str, int]:
        """List + inspect; returns (``since`` for the event stream, daemon time after, in ns)."""
        before = await self._clock(client)
        with trio.fail_after(CALL_TIMEOUT):
            running = (await client.get("/containers/json")).raise_for_status().json()
        self.containers = {}
        for c in running:
            await self._inspect(client, c["Id"])
        return since_param(before), daemon_ns(await self._clock(client))

    async def _round(self, client: httpx.AsyncClient, sink: SourceSink) -> None:
        since, listed_ns = await self._list(client)
        sink.update(self._view())
        self.rounds += 1
        params = {"since": since, "filters": json.dumps(EVENT_FILTER)}
        async with client.stream("GET", "/events", params=params) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                action, cid = event_action(event)
                if action == "remove" and int(event.get("timeNano") or 0) <= listed_ns:
                    action = "refresh"  # replayed from before the listing: ask for the truth
                before = self.containers.get(cid)
                if action == "remove":
                    self.containers.pop(cid, None)
                    self._reasons.pop(cid, None)
                elif action == "refresh":
                    await self._inspect(client, cid)
                if self.containers.get(cid) != before:
                    sink.update(self._view())

    async def watch(self, sink: SourceSink) -> None:
        delay = BACKOFF[0]
        while True:
            rounds = self.rounds
            try:
                async with self._client() as client:
                    await self._round(client, sink)
                sink.error("docker event stream ended")
            except (httpx.HTTPError, OSError, ValueError, KeyError, trio.TooSlowError) as exc:
                sink.error(f"docker: {type(exc).__name__}: {exc}")
                (log.warning if delay == BACKOFF[0] else log.debug)(
                    "docker source %s: %s; relisting in %.1fs", self.name, exc, delay)
            if self.rounds > rounds:  # the listing worked: the stream broke, relist soon
                delay = BACKOFF[0]
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])
