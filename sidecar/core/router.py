"""Route selection, as pure code over a snapshot (no trio, socket or ssl).

``Router(snapshot).resolve(authority, method, path, headers)`` answers one of:

* ``MeshTarget(host, route, cluster)`` — a mesh service: first matching route wins (Istio
  VirtualService order), then one weighted cluster is drawn (Envoy ``weighted_clusters``);
* ``EgressTarget(host, port, endpoints)`` — a host outside the mesh allowed by an egress rule;
* raises ``NoRouteFound`` (host is in the mesh, no route matched: Envoy NR, 404) or
  ``PolicyDenied`` (not in the mesh, no egress rule: Istio REGISTRY_ONLY, 502).

Matching semantics: match blocks of a route are ORed, conditions inside one block ANDed; header
and path regexes use ``re.fullmatch`` (Envoy safe_regex matches the whole value); header names
are lower-case. Hosts are compared lower-case without the port; ``svcb``, ``svcb:80`` and
``svcb.<namespace>`` style suffixes are not aliased in v1.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshd.errors import NoRouteFound, PolicyDenied
from meshd.snapshot.model import (
    EgressEntry,
    Route,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class MeshTarget:
    host: str
    route: str
    cluster: str


@dataclass(frozen=True, slots=True)
class EgressTarget:
    host: str
    port: int
    endpoints: tuple[str, ...]


class _CompiledString:
    __slots__ = ("exact", "prefix", "regex")

    def __init__(self, m: StringMatch) -> None:
        self.exact = m.exact
        self.prefix = m.prefix
        self.regex = re.compile(m.regex) if m.regex is not None else None

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        return self.regex is not None and self.regex.fullmatch(value) is not None


class _CompiledMatch:
    __slots__ = ("headers", "method", "path")

    def __init__(self, m: RouteMatch) -> None:
        self.path = _CompiledString(m.path) if m.path else None
        self.method = _CompiledString(m.method) if m.method else None
        self.headers = tuple((h.name, _CompiledString(h.match)) for h in m.headers)

    def __call__(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.path is not None and not self.path(path.split("?", 1)[0]):
            return False
        if self.method is not None and not self.method(method):
            return False
        return all(check(headers.get(name)) for name, check in self.headers)


class _CompiledRoute:
    __slots__ = ("clusters", "matches", "name", "total")

    def __init__(self, r: Route) -> None:
        self.name = r.name
        self.matches = tuple(_CompiledMatch(m) for m in r.matches)
        self.clusters: tuple[WeightedCluster, ...] = r.clusters
        self.total = sum(c.weight for c in r.clusters)

    def matches_request(self, method: str, path: str, headers: dict[str, str]) -> bool:
        return not self.matches or any(m(method, path, headers) for m in self.matches)


def pick_weighted(clusters: Sequence[WeightedCluster], total: int, draw: int) -> str:
    """Cluster for ``draw`` in ``[0, total)``: cumulative weights, zero weights never chosen."""
    acc = 0
    for c in clusters:
        acc += c.weight
        if draw < acc:
            return c.cluster
    return clusters[-1].cluster


def split_authority(authority: str) -> tuple[str, int]:
    """``"svcb:8080"`` -> ``("svcb", 8080)``; default port 80; IPv6 ``"[::1]:80"`` supported."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    return host, int(port) if port.isdigit() else 80


class Router:
    """Compiled routing table of one snapshot; build once per applied snapshot."""

    def __init__(self, snapshot: Snapshot, rand: Callable[[int], int] | None = None) -> None:
        self._vhosts: dict[str, tuple[_CompiledRoute, ...]] = {
            v.host: tuple(_CompiledRoute(r) for r in v.routes) for v in snapshot.virtual_hosts
        }
        self._egress: dict[str, EgressEntry] = {e.host: e for e in snapshot.egress}
        self._rand = rand or (lambda n: random.randrange(n))

    @staticmethod
    def compile_check(vhosts: Sequence[VirtualHost]) -> None:
        """Raise ``re.error`` if any regex fails to compile (sidecar-side re-validation)."""
        for v in vhosts:
            for r in v.routes:
                _CompiledRoute(r)

    def is_mesh_host(self, host: str) -> bool:
        return host in self._vhosts

    def resolve(self, authority: str, method: str, path: str, headers: Headers) -> MeshTarget | EgressTarget:
        host, port = split_authority(authority)
        routes = self._vhosts.get(host)
        if routes is None:
            entry = self._egress.get(host)
            if entry is None or port not in entry.ports:
                raise PolicyDenied(f"egress to {host}:{port} denied: no egress rule allows it")
            return EgressTarget(host, port, entry.endpoints)
        hdrs = dict(headers)
        for route in routes:
            if route.matches_request(method, path, hdrs):
                if route.total <= 0:
                    raise NoRouteFound(f"route {route.name!r} of {host} has no weight")
                cluster = pick_weighted(route.clusters, route.total, self._rand(route.total))
                return MeshTarget(host, route.name, cluster)
        raise NoRouteFound(f"no route of {host} matches {method} {path}")
