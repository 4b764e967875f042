"""Rules + registry -> one immutable snapshot per sidecar, as pure code.

``compile_mesh(rules, instances)`` builds the part every sidecar shares (virtual hosts,
clusters, endpoints, egress); ``for_node(mesh, node, version)`` adds the node's listeners.
Meanings (Istio): a host with a ``route`` rule gets its routes in order; any other service
gets one ``default`` route to all its instances. Each ``destination`` subset becomes a cluster
``outbound|<subset>|<host>`` whose endpoints are the instances carrying all the subset's labels;
``outbound||<host>`` holds every instance. Egress rules for one host are merged (ports and
static endpoints unioned).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshd.rules import schema as rs
from meshd.snapshot import model as sm
from registry.model import Instance

DEFAULT_ROUTE = "default"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a sidecar tells meshd about itself when it subscribes."""

    node: str
    service: str = ""
    inbound_port: int = 0
    outbound_port: int = 0
    admin_port: int = 0
    app_port: int = 0


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The node-independent part of a snapshot."""

    virtual_hosts: tuple[sm.VirtualHost, ...]
    clusters: tuple[sm.Cluster, ...]
    endpoints: tuple[sm.ClusterEndpoints, ...]
    egress: tuple[sm.EgressEntry, ...]


def _string(m: rs.StringMatch | None) -> sm.StringMatch | None:
    return None if m is None else sm.StringMatch(exact=m.exact, prefix=m.prefix, regex=m.regex)


def _match(m: rs.HTTPMatch) -> sm.RouteMatch:
    headers = tuple(
        sm.HeaderMatch(name=k.lower(), match=_string(v))  # type: ignore[arg-type]
        for k, v in sorted(m.headers.items())
    )
    return sm.RouteMatch(path=_string(m.path), method=_string(m.method), headers=headers)


def _route(rule: rs.RouteRule, i: int, http: rs.HTTPRoute) -> sm.Route:
    clusters = tuple(
        sm.WeightedCluster(
            cluster=sm.cluster_name((d.host or rule.host).lower(), d.subset or ""),
            weight=100 if d.weight is None else d.weight,
        )
        for d in http.destinations
    )
    return sm.Route(name=http.name or f"{rule.name}-{i}", matches=tuple(_match(m) for m in http.match),
                    clusters=clusters)


def _default_vhost(host: str) -> sm.VirtualHost:
    route = sm.Route(name=DEFAULT_ROUTE, matches=(),
                     clusters=(sm.WeightedCluster(cluster=sm.cluster_name(host), weight=100),))
    return sm.VirtualHost(host=host, routes=(route,))


def _virtual_hosts(rules: rs.RulesFile, services: Iterable[str]) -> list[sm.VirtualHost]:
    routed = {r.host.lower(): r for r in rules.route}
    hosts = sorted(set(services) | set(routed))
    out = []
    for host in hosts:
        rule = routed.get(host)
        if rule is None:
            out.append(_default_vhost(host))
        else:
            routes = tuple(_route(rule, i, h) for i, h in enumerate(rule.http))
            out.append(sm.VirtualHost(host=host, routes=routes))
    return out


def _endpoint(inst: Instance) -> sm.Endpoint:
    return sm.Endpoint(address=inst.address, port=inst.port, instance_id=inst.instance_id,
                       labels=dict(inst.labels))


def _clusters(rules: rs.RulesFile, vhosts: Sequence[sm.VirtualHost], instances: Sequence[Instance],
              ) -> tuple[list[sm.Cluster], list[sm.ClusterEndpoints]]:
    by_host: dict[str, list[Instance]] = {}
    for inst in instances:
        by_host.setdefault(inst.service.lower(), []).append(inst)
    policies = {d.host.lower(): d for d in rules.destination}
    wanted = {sm.cluster_name(v.host) for v in vhosts}
    wanted |= {c.cluster for v in vhosts for r in v.routes for c in r.clusters}
    clusters, endpoints = [], []
    for name in sorted(wanted):
        _, subset, host = name.split("|", 2)
        dest = policies.get(host)
        labels = next((s.labels for s in dest.subsets if s.name == subset), {}) if dest else {}
        members = [i for i in by_host.get(host, []) if labels.items() <= i.labels.items()]
        lb = dest.load_balancer if dest else "round_robin"
        clusters.append(sm.Cluster(name=name, host=host, subset=subset, lb_policy=lb))
        eps = tuple(_endpoint(i) for i in sorted(members, key=lambda i: i.instance_id))
        endpoints.append(sm.ClusterEndpoints(cluster=name, endpoints=eps))
    return clusters, endpoints


def _egress(rules: rs.RulesFile) -> tuple[sm.EgressEntry, ...]:
    merged: dict[str, tuple[set[int], list[str]]] = {}
    for e in rules.egress:
        ports, eps = merged.setdefault(e.host.lower(), (set(), []))
        ports.update(e.ports)
        eps.extend(x for x in e.endpoints if x not in eps)
    return tuple(sm.EgressEntry(host=h, ports=tuple(sorted(p)), endpoints=tuple(eps))
                 for h, (p, eps) in sorted(merged.items()))


def compile_mesh(rules: rs.RulesFile, instances: Sequence[Instance]) -> MeshConfig:
    """Shared snapshot content for the merged rule set and the merged registry view."""
    vhosts = _virtual_hosts(rules, {i.service.lower() for i in instances})
    clusters, endpoints = _clusters(rules, vhosts, instances)
    return MeshConfig(tuple(vhosts), tuple(clusters), tuple(endpoints), _egress(rules))


def listeners(node: NodeInfo) -> tuple[sm.Listener, ...]:
    out = []
    if node.outbound_port:
        out.append(sm.Listener(name="virtualOutbound", direction="outbound",
                               port=node.outbound_port, route_config="outbound"))
    if node.inbound_port:
        out.append(sm.Listener(name="virtualInbound", direction="inbound", port=node.inbound_port,
                               route_config=f"inbound|{node.app_port}|{node.service}"))
    if node.admin_port:
        out.append(sm.Listener(name="admin", direction="admin", port=node.admin_port))
    return tuple(out)


def for_node(mesh: MeshConfig, node: NodeInfo, version: sm.Version) -> sm.Snapshot:
    return sm.Snapshot(version=version, node=node.node, listeners=listeners(node),
                       virtual_hosts=mesh.virtual_hosts, clusters=mesh.clusters,
                       endpoints=mesh.endpoints, egress=mesh.egress)
