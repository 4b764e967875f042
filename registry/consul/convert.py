"""Consul JSON -> ``Instance`` and the blocking-query index rules — pure code (no I/O).

Inputs are the decoded bodies of Consul's HTTP API (``api-docs/health.mdx``,
``api-docs/catalog.mdx``); shapes are checked here and a wrong shape raises
``RegistryInconsistent`` (the caller reports it with ``sink.error``, never as "no instances").

Mapping of one ``GET /v1/health/service/:name`` entry (ecosystem-conventions §2):

* address = ``Service.Address`` if non-empty, else ``Node.Address``; port = ``Service.Port``;
* instance_id = ``<Node.Node>/<Service.ID>`` (a service ID is unique per *agent* only);
* labels: tags of the form ``key=value`` become labels, a bare tag ``t`` becomes ``t="true"``;
  then ``Service.Meta`` (wins over tags); ``region`` defaults to ``Service.Locality.Region``,
  else the node's datacenter; ``zone`` defaults to ``Service.Locality.Zone``;
* ``Meta.protocol`` (Consul's own service-defaults vocabulary) -> ``Instance.protocol``;
* only entries whose checks are all ``passing`` are kept (the watch also asks ``?passing``).

Blocking-query index rules (``api-docs/features/blocking.mdx``): reset to 0 when the index
goes backwards, and treat an index below 1 as 1 after a read, so a buggy 0 never turns the
loop into a busy loop; ``TokenBucket`` rate-limits the loop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from meshd.errors import RegistryInconsistent
from registry.model import Instance

PROTOCOLS = frozenset({"http", "http2", "grpc", "tcp"})  # Consul service-defaults Protocol values
CONSUL_SELF = "consul"  # the servers register themselves as service "consul"
META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # Consul structs.ValidateServiceMetadata
RATE_BURST = 2  # blocking.mdx "Rate limit": token bucket
RATE_INTERVAL = 1.0  # seconds per token (consul-template rate-limits its API calls similarly)


def tags_to_labels(tags: object) -> dict[str, str]:
    """``["version=v2", "primary"]`` -> ``{"version": "v2", "primary": "true"}``."""
    labels: dict[str, str] = {}
    for tag in tags if isinstance(tags, list) else []:
        if not isinstance(tag, str) or not tag:
            continue
        key, sep, value = tag.partition("=")
        if key:
            labels[key] = value if sep else "true"
    return labels


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


def _all_passing(checks: object) -> bool:
    return all(isinstance(c, Mapping) and c.get("Status") == "passing"
               for c in (checks if isinstance(checks, list) else []))


def health_entry(entry: Mapping[str, object], source: str) -> Instance | None:
    """One health entry -> ``Instance``; None when it is not routable (not passing, no port)."""
    node = entry.get("Node")
    svc = entry.get("Service")
    if not isinstance(node, Mapping) or not isinstance(svc, Mapping):
        raise RegistryInconsistent("consul health entry without Node/Service objects")
    if not _all_passing(entry.get("Checks")):
        return None
    port = svc.get("Port")
    address = svc.get("Address") or node.get("Address")
    if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(address, str) or not address:
        return None
    meta = _str_map(svc.get("Meta"))
    protocol = meta.pop("protocol", "").lower()
    labels = tags_to_labels(svc.get("Tags")) | meta
    locality = svc.get("Locality") if isinstance(svc.get("Locality"), Mapping) else {}
    region = locality.get("Region") or node.get("Datacenter")  # type: ignore[union-attr]
    if isinstance(region, str) and region:
        labels.setdefault("region", region)
    zone = locality.get("Zone")  # type: ignore[union-attr]
    if isinstance(zone, str) and zone:
        labels.setdefault("zone", zone)
    namespace = svc.get("Namespace")
    return Instance(
        service=str(svc.get("Service") or ""),
        instance_id=f"{node.get('Node', '')}/{svc.get('ID') or svc.get('Service')}",
        address=address, port=port, labels=labels, source=source,
        namespace=namespace if isinstance(namespace, str) and namespace else "default",
        protocol=protocol if protocol in PROTOCOLS else "",
    )


def health_service(body: object, source: str) -> list[Instance]:
    """A ``/v1/health/service/:name`` body -> passing instances sorted by id."""
    if not isinstance(body, list):
        raise RegistryInconsistent("consul health/service: expected a JSON array")
    out = [i for e in body if isinstance(e, Mapping) and (i := health_entry(e, source)) is not None]
    return sorted(out, key=lambda i: i.instance_id)


def catalog_services(body: object, only: frozenset[str] | None = None) -> dict[str, tuple[str, ...]]:
    """A ``/v1/catalog/services`` body (name -> tags) -> the services to watch.

    ``only``: watch just these names (None = all). Consul's own ``consul`` service is skipped.
    """
    if not isinstance(body, Mapping):
        raise RegistryInconsistent("consul catalog/services: expected a JSON object")
    return {str(name): tuple(tags) if isinstance(tags, list) else ()
            for name, tags in body.items()
            if name != CONSUL_SELF and (only is None or name in only)}


def next_index(previous: int, returned: object) -> int:
    """The index for the next blocking query after a read returned ``returned``.

    Backwards (lower than ``previous``) -> 0: restart with a non-blocking read. Otherwise at
    least 1 (an index of 0 or garbage would make every query return at once).
    """
    try:
        index = int(str(returned))
    except ValueError:
        index = 0
    if index < previous:
        return 0
    return max(index, 1)


def go_duration(seconds: float) -> str:
    """Seconds -> a Go duration string Consul accepts (``"10s"``, ``"1.5s"``, ``"1m"``)."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


class TokenBucket:
    """Rate limit for a query loop: ``burst`` tokens, one refilled every ``interval`` s.

    ``delay(now)`` takes a token and returns how long to sleep first (0 when one was free).
    """

    def __init__(self, interval: float = RATE_INTERVAL, burst: int = RATE_BURST) -> None:
        self.interval = interval
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def delay(self, now: float) -> float:
        if self._at is not None and self.interval > 0:
            self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
        self._at = now
        if self._tokens >= 1 or self.interval <= 0:
            self._tokens -= 1
            return 0.0
        wait = (1 - self._tokens) * self.interval
        self._tokens = 0.0
        self._at = now + wait
        return wait


def registration(inst: Instance, ttl: float, deregister_after: float) -> dict[str, object]:
    """The ``/v1/agent/service/register`` fields for a sidecar's instance (as py-consul kwargs).

    Labels go to ``Meta`` when their key is a valid Consul meta key, else to a ``key=value``
    tag (Consul rejects meta keys with dots); every label is also a tag so ``tags`` filters
    work. ``Meta.protocol`` carries ``Instance.protocol``.
    """
    meta = {k: v for k, v in inst.labels.items() if META_KEY.match(k) and not k.startswith("consul-")}
    if inst.protocol:
        meta["protocol"] = inst.protocol
    return {
        "name": inst.service, "service_id": inst.instance_id, "address": inst.address,
        "port": inst.port, "tags": [f"{k}={v}" for k, v in sorted(inst.labels.items())],
        "meta": meta,
        "check": {"CheckID": check_id(inst), "Name": "meshd sidecar TTL", "TTL": go_duration(ttl),
                  "Status": "passing", "DeregisterCriticalServiceAfter": go_duration(deregister_after)},
    }


def check_id(inst: Instance) -> str:
    """The TTL check of a registered instance (Consul's own default for a single service check)."""
    return f"service:{inst.instance_id}"
