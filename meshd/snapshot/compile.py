"""Rules + registry -> one immutable snapshot per sidecar, as pure code.

``compile_mesh(rules, instances)`` builds the part every sidecar shares (virtual hosts,
clusters, endpoints, egress); ``for_node(mesh, node, version)`` adds the node's listeners.
Meanings (Istio): a host with a ``route`` rule gets its routes in order; any other service
gets one ``default`` route to all its instances. Each ``destination`` subset becomes a cluster
``outbound|<subset>|<host>`` whose endpoints are the instances carrying all the subset's labels;
``outbound||<host>`` holds every instance. Egress rules for one host are merged (ports and
static endpoints unioned). Authorization policies and rate limits are compiled by
``security``; a node gets the policies its inbound enforces and every rate limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshd.rules import schema as rs
from meshd.rules.units import duration, optional_duration
from meshd.snapshot import model as sm
from meshd.snapshot import security
from meshd.snapshot.routes import virtual_hosts
from registry.model import Instance


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
    authorization: tuple[sm.AuthzPolicy, ...] = ()
    ratelimits: tuple[sm.RateLimit, ...] = ()


def _endpoint(inst: Instance) -> sm.Endpoint:
    return sm.Endpoint(address=inst.address, port=inst.port, instance_id=inst.instance_id,
                       labels=dict(inst.labels), namespace=inst.namespace, protocol=inst.protocol)


def _cluster(name: str, host: str, subset: str, dest: rs.DestinationRule | None) -> sm.Cluster:
    if dest is None:
        return sm.Cluster(name=name, host=host, subset=subset)
    ch, pool, od, hc = (dest.consistent_hash, dest.connection_pool, dest.outlier_detection,
                        dest.health_check)
    pool = pool or rs.ConnectionPool()
    return sm.Cluster(
        name=name, host=host, subset=subset, lb_policy=dest.load_balancer,
        hash_policy=sm.HashPolicy(header=ch.header and ch.header.lower(), cookie=ch.cookie,
                                  query_param=ch.query_param, source_ip=bool(ch.source_ip),
                                  ring_size=ch.ring_size) if ch else None,
        locality=sm.Locality(region_label=dest.locality.region_label,
                             zone_label=dest.locality.zone_label)
        if dest.locality and dest.locality.enabled else None,
        slow_start=optional_duration(dest.slow_start),
        circuit_breakers=sm.CircuitBreakers(
            max_connections=pool.max_connections, max_pending_requests=pool.max_pending_requests,
            max_requests=pool.max_requests, max_retries=pool.max_retries),
        outlier=sm.OutlierDetection(
            consecutive_5xx=od.consecutive_5xx, consecutive_gateway_errors=od.consecutive_gateway_errors,
            consecutive_local_origin_failures=od.consecutive_local_origin_failures,
            interval=duration(od.interval), base_ejection_time=duration(od.base_ejection_time),
            max_ejection_percent=od.max_ejection_percent, min_health_percent=od.min_health_percent)
        if od else None,
        health_check=sm.HealthCheck(
            path=hc.path, tcp=hc.tcp, interval=duration(hc.interval), timeout=duration(hc.timeout),
            healthy_threshold=hc.healthy_threshold, unhealthy_threshold=hc.unhealthy_threshold,
            jitter=duration(hc.jitter)) if hc else None,
        retry_budget=sm.RetryBudget(percent=dest.retry_budget.percent,
                                    min_concurrency=dest.retry_budget.min_concurrency)
        if dest.retry_budget else None,
        connect_timeout=duration(pool.connect_timeout), idle_timeout=duration(pool.idle_timeout),
        max_connection_duration=optional_duration(pool.max_connection_duration),
        protocol=dest.protocol or "",
    )


def _clusters(rules: rs.RulesFile, vhosts: Sequence[sm.VirtualHost], instances: Sequence[Instance],
              ) -> tuple[list[sm.Cluster], list[sm.ClusterEndpoints]]:
    by_host: dict[str, list[Instance]] = {}
    for inst in instances:
        by_host.setdefault(inst.service.lower(), []).append(inst)
    policies = {d.host.lower(): d for d in rules.destination}
    wanted = {sm.cluster_name(v.host) for v in vhosts}
    wanted |= {c.cluster for v in vhosts for r in v.routes for c in r.clusters}
    wanted |= {r.mirror.cluster for v in vhosts for r in v.routes if r.mirror}
    wanted |= {c.cluster for v in vhosts for t in v.tcp_routes for c in t.clusters}
    clusters, endpoints = [], []
    for name in sorted(wanted):
        _, subset, host = name.split("|", 2)
        dest = policies.get(host)
        labels = next((s.labels for s in dest.subsets if s.name == subset), {}) if dest else {}
        members = [i for i in by_host.get(host, []) if labels.items() <= i.labels.items()]
        clusters.append(_cluster(name, host, subset, dest))
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
    vhosts = virtual_hosts(rules, {i.service.lower() for i in instances})
    clusters, endpoints = _clusters(rules, vhosts, instances)
    return MeshConfig(tuple(vhosts), tuple(clusters), tuple(endpoints), _egress(rules),
                      security.authorization(rules), security.ratelimits(rules))


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
                       endpoints=mesh.endpoints, egress=mesh.egress,
                       authorization=security.for_service(mesh.authorization, node.service),
                       ratelimits=mesh.ratelimits)
