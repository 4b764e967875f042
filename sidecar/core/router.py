"""Route selection, as pure code over a snapshot (no trio, socket or ssl).

``Router(snapshot).resolve(request)`` answers one of:

* ``MeshTarget(host, route, cluster, policy)`` — a mesh service: first matching route wins
  (Istio VirtualService order), then one weighted cluster is drawn (Envoy ``weighted_clusters``);
  ``policy`` is the snapshot ``Route`` carrying timeout/retry/fault/mirror/rewrites; ``cluster``
  is ``""`` for redirect and direct-response routes;
* ``EgressTarget(host, port, endpoints)`` — a host outside the mesh allowed by an egress rule;
* raises ``NoRouteFound`` (host is in the mesh, no route matched: Envoy NR, 404) or
  ``PolicyDenied`` (not in the mesh, no egress rule: Istio REGISTRY_ONLY, 502).

Matching semantics: match blocks of a route are ORed, conditions inside one block ANDed; regexes
use ``re.fullmatch`` (Envoy safe_regex matches the whole value); header names are lower-case;
``present``/``absent`` test existence; ``invert`` negates one condition. ``source`` and
``source_labels`` test the calling service (the sidecar that routes). ``explain`` returns why
each route did or did not match, for ``meshd rule simulate``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from meshd.errors import NoRouteFound, PolicyDenied
from meshd.snapshot.model import (
    EgressEntry,
    HeaderMatch,
    Route,
    RouteMatch,
    Snapshot,
    StringMatch,
    WeightedCluster,
)

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What routing looks at. ``source`` is the calling service, ``source_labels`` its labels."""

    authority: str
    method: str
    path: str  # origin-form, may include "?query"
    headers: Headers = ()
    source: str = ""
    source_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MeshTarget:
    host: str
    route: str
    cluster: str
    policy: Route | None = None


@dataclass(frozen=True, slots=True)
class EgressTarget:
    host: str
    port: int
    endpoints: tuple[str, ...]


class _CompiledString:
    __slots__ = ("absent", "exact", "invert", "prefix", "present", "regex", "suffix")

    def __init__(self, m: StringMatch) -> None:
        self.exact, self.prefix, self.suffix = m.exact, m.prefix, m.suffix
        self.present, self.absent, self.invert = m.present, m.absent, m.invert
        self.regex = re.compile(m.regex) if m.regex is not None else None

    def _test(self, value: str | None) -> bool:
        if self.present:
            return value is not None
        if self.absent:
            return value is None
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.suffix is not None:
            return value.endswith(self.suffix)
        return self.regex is not None and self.regex.fullmatch(value) is not None

    def __call__(self, value: str | None) -> bool:
        return self._test(value) != self.invert


def _named(items: tuple[HeaderMatch, ...]) -> tuple[tuple[str, _CompiledString], ...]:
    return tuple((h.name, _CompiledString(h.match)) for h in items)


class _CompiledMatch:
    """One match block; ``why_not`` names the first failing condition (None = matches)."""

    def __init__(self, m: RouteMatch) -> None:
        self.path = _CompiledString(m.path) if m.path else None
        self.method = _CompiledString(m.method) if m.method else None
        self.authority = _CompiledString(m.authority) if m.authority else None
        self.headers = _named(m.headers)
        self.query = _named(m.query_params)
        self.port, self.source, self.source_labels = m.port, m.source, m.source_labels

    def why_not(self, req: RequestInfo, hdrs: Mapping[str, str], port: int) -> str | None:
        path, _, qs = req.path.partition("?")
        if self.path is not None and not self.path(path):
            return f"path {path!r}"
        if self.method is not None and not self.method(req.method):
            return f"method {req.method}"
        if self.authority is not None and not self.authority(req.authority):
            return f"authority {req.authority!r}"
        if self.port is not None and port != self.port:
            return f"port {port}"
        if self.source is not None and req.source != self.source:
            return f"source {req.source or 'unknown'!r}"
        for k, v in self.source_labels.items():
            if req.source_labels.get(k) != v:
                return f"source label {k}={req.source_labels.get(k)!r}"
        for name, check in self.headers:
            if not check(hdrs.get(name)):
                return f"header {name}={hdrs.get(name)!r}"
        if self.query:
            params = dict(parse_qsl(qs, keep_blank_values=True))
            for name, check in self.query:
                if not check(params.get(name)):
                    return f"query param {name}={params.get(name)!r}"
        return None


class _CompiledRoute:
    __slots__ = ("clusters", "matches", "name", "policy", "total")

    def __init__(self, r: Route) -> None:
        self.name = r.name
        self.policy = r
        self.matches = tuple(_CompiledMatch(m) for m in r.matches)
        self.clusters: tuple[WeightedCluster, ...] = r.clusters
        self.total = sum(c.weight for c in r.clusters)

    def why_not(self, req: RequestInfo, hdrs: Mapping[str, str], port: int) -> str | None:
        """None if the route matches, else the reasons of each match block."""
        if not self.matches:
            return None
        reasons = []
        for i, m in enumerate(self.matches):
            reason = m.why_not(req, hdrs, port)
            if reason is None:
                return None
            reasons.append(f"match[{i}]: {reason}")
        return "; ".join(reasons)


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

    def is_mesh_host(self, host: str) -> bool:
        return host in self._vhosts

    def resolve(self, req: RequestInfo) -> MeshTarget | EgressTarget:
        host, port = split_authority(req.authority)
        routes = self._vhosts.get(host)
        if routes is None:
            return self._egress_target(host, port)
        hdrs = dict(req.headers)
        for route in routes:
            if route.why_not(req, hdrs, port) is None:
                return self._target(host, route)
        raise NoRouteFound(f"no route of {host} matches {req.method} {req.path}")

    def explain(self, req: RequestInfo,
                ) -> tuple[list[tuple[str, str | None]], MeshTarget | EgressTarget | None]:
        """Per route in order ``(name, reason it did not match or None)`` up to the first match,
        and the target (None when nothing matched). Egress/deny decisions raise like resolve."""
        host, port = split_authority(req.authority)
        routes = self._vhosts.get(host)
        if routes is None:
            return [], self._egress_target(host, port)
        hdrs = dict(req.headers)
        trace: list[tuple[str, str | None]] = []
        for route in routes:
            reason = route.why_not(req, hdrs, port)
            trace.append((route.name, reason))
            if reason is None:
                return trace, self._target(host, route)
        return trace, None

    def _egress_target(self, host: str, port: int) -> EgressTarget:
        entry = self._egress.get(host)
        if entry is None or port not in entry.ports:
            raise PolicyDenied(f"egress to {host}:{port} denied: no egress rule allows it")
        return EgressTarget(host, port, entry.endpoints)

    def _target(self, host: str, route: _CompiledRoute) -> MeshTarget:
        if not route.clusters:  # redirect / direct response
            return MeshTarget(host, route.name, "", route.policy)
        if route.total <= 0:
            raise NoRouteFound(f"route {route.name!r} of {host} has no weight")
        cluster = pick_weighted(route.clusters, route.total, self._rand(route.total))
        return MeshTarget(host, route.name, cluster, route.policy)
