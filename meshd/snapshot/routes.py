"""Rules -> snapshot routes (Istio VirtualService HTTPRoute -> Envoy Route), pure code.

Durations become float seconds (``rules.units``), retry conditions a tuple, mirror and
destinations cluster names ``outbound|<subset>|<host>``. Validation has already run; a
value that still fails to convert raises ``ValueError`` (caught by the push as a rejection).
"""

from __future__ import annotations

from meshd.rules import schema as rs
from meshd.rules.units import duration, optional_duration
from meshd.snapshot import model as sm
from sidecar.http2.grpc import GRPC_CODES

DEFAULT_ROUTE = "default"


def string_match(m: rs.StringMatch | None) -> sm.StringMatch | None:
    if m is None:
        return None
    return sm.StringMatch(exact=m.exact, prefix=m.prefix, suffix=m.suffix, regex=m.regex,
                          present=m.present, absent=m.absent, invert=m.invert)


def _named(items: dict[str, rs.StringMatch], lower: bool) -> tuple[sm.HeaderMatch, ...]:
    return tuple(sm.HeaderMatch(name=k.lower() if lower else k, match=string_match(v))  # type: ignore[arg-type]
                 for k, v in sorted(items.items()))


def route_match(m: rs.HTTPMatch) -> sm.RouteMatch:
    return sm.RouteMatch(
        path=string_match(m.path), method=string_match(m.method),
        authority=string_match(m.authority), headers=_named(m.headers, True),
        query_params=_named(m.query_params, False), port=m.port, source=m.source,
        source_labels=dict(m.source_labels),
    )


def _retry(r: rs.Retries | None) -> sm.RetryPolicy | None:
    if r is None:
        return None
    return sm.RetryPolicy(
        attempts=r.attempts, per_try_timeout=optional_duration(r.per_try_timeout),
        retry_on=tuple(c.strip() for c in r.retry_on.split(",") if c.strip()),
        retriable_status_codes=tuple(r.retriable_status_codes),
        backoff_base=duration(r.backoff), retry_non_idempotent=r.retry_non_idempotent)


def _fault(f: rs.Fault | None) -> sm.FaultPolicy | None:
    if f is None:
        return None
    return sm.FaultPolicy(
        delay=duration(f.delay.fixed) if f.delay else None,
        delay_percentage=f.delay.percentage if f.delay else 0.0,
        abort_status=f.abort.status if f.abort else None,
        abort_percentage=f.abort.percentage if f.abort else 0.0,
        abort_grpc_status=(GRPC_CODES[f.abort.grpc_status.upper()]
                           if f.abort and f.abort.grpc_status else None))


def _ops(ops: rs.HeaderOps | None) -> sm.HeaderOps | None:
    if ops is None:
        return None
    return sm.HeaderOps(set=tuple(sorted((k.lower(), v) for k, v in ops.set.items())),
                        add=tuple(sorted((k.lower(), v) for k, v in ops.add.items())),
                        remove=tuple(h.lower() for h in ops.remove))


def _matched_prefix(http: rs.HTTPRoute) -> str | None:
    """The path prefix a rewrite replaces: the common match prefix, or "/" (whole path)."""
    prefixes = {m.path.prefix for m in http.match if m.path is not None and m.path.prefix}
    return prefixes.pop() if len(prefixes) == 1 else "/"


def route(rule: rs.RouteRule, i: int, http: rs.HTTPRoute) -> sm.Route:
    """One snapshot route for ``rule.http[i]``."""
    host = rule.host.lower()
    clusters = tuple(
        sm.WeightedCluster(cluster=sm.cluster_name((d.host or host).lower(), d.subset or ""),
                           weight=100 if d.weight is None else d.weight)
        for d in http.destinations)
    mirror = None
    if http.mirror is not None:
        mirror = sm.MirrorPolicy(
            cluster=sm.cluster_name((http.mirror.host or host).lower(), http.mirror.subset or ""),
            percentage=http.mirror.percentage)
    rewrite = http.rewrite
    hdrs = http.headers
    return sm.Route(
        name=http.name or f"{rule.name}-{i}",
        matches=tuple(route_match(m) for m in http.match),
        clusters=clusters, timeout=optional_duration(http.timeout), retry=_retry(http.retries),
        fault=_fault(http.fault), mirror=mirror,
        prefix_rewrite=rewrite.path_prefix if rewrite else None,
        matched_prefix=_matched_prefix(http) if rewrite and rewrite.path_prefix else None,
        authority_rewrite=rewrite.authority if rewrite else None,
        redirect=sm.Redirect(path=http.redirect.path, authority=http.redirect.authority,
                             status=http.redirect.status) if http.redirect else None,
        direct_response=sm.DirectResponse(status=http.direct_response.status,
                                          body=http.direct_response.body)
        if http.direct_response else None,
        request_headers=_ops(hdrs.request if hdrs else None),
        response_headers=_ops(hdrs.response if hdrs else None),
    )


def tcp_route(rule: rs.RouteRule, i: int, tcp: rs.TCPRoute) -> sm.TcpRoute:
    """One snapshot TCP route for ``rule.tcp[i]``; a match block without port matches any."""
    host = rule.host.lower()
    ports = () if any(m.port is None for m in tcp.match) else tuple(m.port for m in tcp.match
                                                                      if m.port is not None)
    return sm.TcpRoute(name=tcp.name or f"{rule.name}-tcp-{i}", ports=ports, clusters=tuple(
        sm.WeightedCluster(cluster=sm.cluster_name((d.host or host).lower(), d.subset or ""),
                           weight=100 if d.weight is None else d.weight)
        for d in tcp.destinations))


def default_vhost(host: str) -> sm.VirtualHost:
    r = sm.Route(name=DEFAULT_ROUTE, matches=(),
                 clusters=(sm.WeightedCluster(cluster=sm.cluster_name(host), weight=100),))
    return sm.VirtualHost(host=host, routes=(r,))


def virtual_hosts(rules: rs.RulesFile, services: set[str]) -> list[sm.VirtualHost]:
    """One virtual host per service or routed host, sorted by host."""
    routed = {r.host.lower(): r for r in rules.route}
    out = []
    for host in sorted(services | set(routed)):
        rule = routed.get(host)
        if rule is None:
            out.append(default_vhost(host))
        else:
            out.append(sm.VirtualHost(host=host, routes=tuple(
                route(rule, i, h) for i, h in enumerate(rule.http)), tcp_routes=tuple(
                tcp_route(rule, i, t) for i, t in enumerate(rule.tcp))))
    return out
