"""TCP routing and port protocols over a snapshot, as pure code (no trio, socket or ssl).

``TcpRouter(snapshot).resolve(host, port)`` answers where a TCP connection for ``host:port``
goes, the way Istio's tcp routes do:

* a mesh service: its ``tcp_routes`` in order, the first whose ``ports`` contain ``port`` (or
  that names no port) wins, and one weighted cluster is drawn (``router.pick_weighted``, the
  HTTP split core); no tcp route at all -> the default cluster ``outbound||<host>``; tcp routes
  none of which matches -> ``NoRouteFound`` (Envoy closes the connection);
* a host outside the mesh: an egress rule must list the port (``EgressTarget``), else
  ``PolicyDenied`` (Istio REGISTRY_ONLY).

``protocol(host)`` is the declared protocol of a mesh host: the destination rule's
``protocol`` wins, else the registry's when all endpoints agree, else ``""`` (undeclared: the
listener detects it from the first bytes, ``core.sniff``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from meshd.errors import NoRouteFound, PolicyDenied
from meshd.snapshot.model import EgressEntry, Snapshot, TcpRoute, cluster_name
from sidecar.core.router import EgressTarget, pick_weighted

TOTAL_WEIGHT = 100


@dataclass(frozen=True, slots=True)
class TcpTarget:
    host: str
    route: str      # tcp route name, "default" without tcp routes
    cluster: str


class TcpRouter:
    def __init__(self, snapshot: Snapshot, rand: Callable[[int], int] | None = None) -> None:
        self._routes: dict[str, tuple[TcpRoute, ...]] = {
            v.host: v.tcp_routes for v in snapshot.virtual_hosts}
        self._egress: dict[str, EgressEntry] = {e.host: e for e in snapshot.egress}
        self._rand = rand or (lambda n: random.randrange(n))
        clusters = {c.name: c for c in snapshot.clusters}
        endpoints = {e.cluster: e.endpoints for e in snapshot.endpoints}
        self._protocols: dict[str, str] = {}
        for host in self._routes:
            cluster = clusters.get(cluster_name(host))
            declared = {ep.protocol for ep in endpoints.get(cluster_name(host), ())}
            registry = declared.pop() if len(declared) == 1 else ""
            self._protocols[host] = (cluster.protocol if cluster is not None else "") or registry

    def is_mesh_host(self, host: str) -> bool:
        return host in self._routes

    def protocol(self, host: str) -> str:
        """``"http"``, ``"http2"``, ``"grpc"``, ``"tcp"`` or ``""`` (undeclared / not in the mesh)."""
        return self._protocols.get(host, "")

    def resolve(self, host: str, port: int) -> TcpTarget | EgressTarget:
        """See the module docstring; ``host`` lower case."""
        routes = self._routes.get(host)
        if routes is None:
            entry = self._egress.get(host)
            if entry is None or port not in entry.ports:
                raise PolicyDenied(f"egress to {host}:{port} denied: no egress rule allows it")
            return EgressTarget(host, port, entry.endpoints)
        if not routes:
            return TcpTarget(host, "default", cluster_name(host))
        for route in routes:
            if not route.ports or port in route.ports:
                total = sum(c.weight for c in route.clusters)
                if total <= 0:
                    raise NoRouteFound(f"tcp route {route.name!r} of {host} has no weight")
                return TcpTarget(host, route.name,
                                 pick_weighted(route.clusters, total, self._rand(total)))
        raise NoRouteFound(f"no tcp route of {host} matches port {port}")
