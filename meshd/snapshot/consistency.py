"""Snapshot consistency, checked before meshd publishes and again before a sidecar applies.

Follows go-control-plane's ``Snapshot.Consistent()``: every cluster a route names exists,
every cluster has an endpoint assignment (possibly empty), names are unique, each route has
exactly one action (weighted clusters summing to 100, a redirect, or a direct response), mirror
clusters exist, each string match sets exactly one kind and every regex compiles, listener
ports are distinct. Returns a list of human-readable problems; empty means
consistent. Pure code.
"""

from __future__ import annotations

import re

from meshd.snapshot import security
from meshd.snapshot.model import Snapshot, StringMatch

TOTAL_WEIGHT = 100  # Istio: destination weights of one route sum to 100


def _string_problems(m: StringMatch | None, where: str) -> list[str]:
    if m is None:
        return []
    set_ = [x for x in (m.exact, m.prefix, m.suffix, m.regex, m.present, m.absent) if x is not None]
    if len(set_) != 1:
        return [f"{where}: exactly one of exact/prefix/suffix/regex/present/absent must be set"]
    if m.regex is not None:
        try:
            re.compile(m.regex)
        except re.error as exc:
            return [f"{where}: bad regex: {exc}"]
    return []


def _route_problems(snap: Snapshot, clusters: set[str]) -> list[str]:
    problems: list[str] = []
    for vh in snap.virtual_hosts:
        for route in vh.routes:
            where = f"virtual_host {vh.host} route {route.name}"
            actions = [a for a in (route.clusters, route.redirect, route.direct_response) if a]
            if len(actions) != 1:
                problems.append(f"{where}: needs exactly one of clusters/redirect/direct_response")
            if route.mirror and route.mirror.cluster not in clusters:
                problems.append(f"{where}: unknown mirror cluster {route.mirror.cluster}")
            total = sum(c.weight for c in route.clusters)
            if route.clusters and total != TOTAL_WEIGHT:
                problems.append(f"{where}: weights sum to {total}, must be {TOTAL_WEIGHT}")
            problems += [f"{where}: unknown cluster {c.cluster}"
                         for c in route.clusters if c.cluster not in clusters]
            for i, m in enumerate(route.matches):
                problems += _string_problems(m.path, f"{where} match[{i}].path")
                problems += _string_problems(m.method, f"{where} match[{i}].method")
                problems += _string_problems(m.authority, f"{where} match[{i}].authority")
                for h in (*m.headers, *m.query_params):
                    problems += _string_problems(h.match, f"{where} match[{i}].{h.name}")
        for tcp in vh.tcp_routes:
            where = f"virtual_host {vh.host} tcp route {tcp.name}"
            total = sum(c.weight for c in tcp.clusters)
            if total != TOTAL_WEIGHT:
                problems.append(f"{where}: weights sum to {total}, must be {TOTAL_WEIGHT}")
            problems += [f"{where}: unknown cluster {c.cluster}"
                         for c in tcp.clusters if c.cluster not in clusters]
    return problems


def _duplicates(names: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    dup = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    return [f"duplicate {what} {n}" for n in dup]


def consistency_errors(snap: Snapshot) -> list[str]:
    """All problems found in ``snap`` (empty list = safe to publish/apply)."""
    cluster_names = [c.name for c in snap.clusters]
    assigned = [e.cluster for e in snap.endpoints]
    problems = _duplicates(cluster_names, "cluster")
    problems += _duplicates([v.host for v in snap.virtual_hosts], "virtual host")
    problems += _duplicates(assigned, "endpoint assignment")
    problems += _duplicates([str(lis.port) for lis in snap.listeners], "listener port")
    clusters = set(cluster_names)
    problems += [f"cluster {c} has no endpoint assignment" for c in sorted(clusters - set(assigned))]
    problems += [f"endpoints for unknown cluster {c}" for c in sorted(set(assigned) - clusters)]
    problems += _route_problems(snap, clusters)
    problems += security.problems(snap)
    for e in snap.egress:
        if not e.ports or any(not 0 < p < 65536 for p in e.ports):
            problems.append(f"egress {e.host}: ports must be within 1..65535")
    return problems
