"""``meshd rule simulate``: what would this request hit, and why — pure code over a snapshot.

``simulate(rules, instances, request)`` compiles the same snapshot a sidecar of the calling
service would get and runs the sidecar's own router (``sidecar.core.router``) in explain mode,
so the answer is what the live data plane does: the route that matches (and, for each earlier
route, the condition that failed), the weighted destinations with their subsets and endpoints,
and the route's policies (timeout, retries, fault, mirror, rewrites, redirect, direct
response). Weighted splits are reported as shares, not drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from meshd.errors import MeshError
from meshd.rules.schema import RulesFile
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from meshd.snapshot.model import Route, Snapshot, Version
from registry.model import Instance
from sidecar.core.router import EgressTarget, RequestInfo, Router


@dataclass(frozen=True)
class SimRequest:
    """The request to simulate. ``host`` may carry a port (``svcb:8080``)."""

    host: str
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    source_labels: Mapping[str, str] = field(default_factory=dict)


def _policies(route: Route) -> dict[str, object]:
    keys = ("timeout", "retry", "fault", "mirror", "prefix_rewrite", "authority_rewrite",
            "redirect", "direct_response", "request_headers", "response_headers")
    out = {}
    for k in keys:
        value = getattr(route, k)
        if value is not None:
            out[k] = msgspec.to_builtins(value)
    return out


def _destinations(snap: Snapshot, route: Route) -> list[dict[str, object]]:
    endpoints = {e.cluster: e.endpoints for e in snap.endpoints}
    clusters = {c.name: c for c in snap.clusters}
    total = sum(c.weight for c in route.clusters) or 1
    out = []
    for wc in route.clusters:
        cluster = clusters[wc.cluster]
        out.append({"cluster": wc.cluster, "subset": cluster.subset or "(all)",
                    "share_percent": round(100.0 * wc.weight / total, 2),
                    "load_balancer": cluster.lb_policy,
                    "endpoints": [e.instance_id or f"{e.address}:{e.port}"
                                  for e in endpoints.get(wc.cluster, ())]})
    return out


def simulate(rules: RulesFile, instances: Sequence[Instance], req: SimRequest) -> dict[str, object]:
    """A JSON-able decision: ``{"host", "outcome", "trace", "route", "destinations", "policies"}``.

    ``outcome`` is ``"route"``, ``"no-route"`` (404 NR), ``"egress"`` or ``"denied"`` (502).
    """
    snap = for_node(compile_mesh(rules, instances), NodeInfo(node="simulate"), Version(0, 0))
    router = Router(snap, rand=lambda n: 0)
    info = RequestInfo(req.host, req.method.upper(), req.path,
                       tuple((k.lower(), v) for k, v in req.headers.items()),
                       req.source, dict(req.source_labels))
    result: dict[str, object] = {"host": req.host, "request": {
        "method": info.method, "path": req.path, "headers": dict(info.headers),
        "source": req.source, "source_labels": dict(req.source_labels)}}
    try:
        trace, target = router.explain(info)
    except MeshError as exc:
        return {**result, "outcome": "denied", "reason": str(exc)}
    if isinstance(target, EgressTarget):
        return {**result, "outcome": "egress", "egress": {"host": target.host, "port": target.port,
                                                          "endpoints": list(target.endpoints)}}
    result["trace"] = [{"route": name, "matched": why is None, "why_not": why}
                       for name, why in trace]
    if target is None or target.policy is None:
        return {**result, "outcome": "no-route", "reason": "no route matched: 404 (NR)"}
    route = target.policy
    return {**result, "outcome": "route", "route": route.name,
            "destinations": _destinations(snap, route), "policies": _policies(route)}


def _mapping(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{what} must be an object of strings")
    return {str(k): v for k, v in value.items()}


def parse_request(doc: dict[str, object]) -> SimRequest:
    """The API body ``{"host", "method", "path", "headers", "source", "source_labels"}``;
    raises ValueError naming the bad field."""
    host = doc.get("host")
    if not isinstance(host, str) or not host:
        raise ValueError("host is required")
    return SimRequest(host=host, method=str(doc.get("method") or "GET"),
                      path=str(doc.get("path") or "/"),
                      headers=_mapping(doc.get("headers"), "headers"),
                      source=str(doc.get("source") or ""),
                      source_labels=_mapping(doc.get("source_labels"), "source_labels"))
