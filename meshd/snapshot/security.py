"""Rules -> snapshot for the security kinds: authorization policies and rate limits (pure).

``authorization(rules)`` keeps the rule order (decisions do not depend on it except for which
matching policy is named); header names are lower-cased and IP blocks written as CIDRs.
``ratelimits(rules)`` normalizes a limit to ``rate_per_sec`` (requests_per_unit / unit) and
``burst`` (default: requests_per_unit) for local token buckets, and keeps ``requests_per_unit``
and ``window`` (the unit in seconds) for global fixed-window quotas. ``for_service`` picks the
policies one inbound sidecar enforces. ``problems`` is the consistency check of these two
snapshot fields (meshd before publishing, the sidecar before applying).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshd.rules import schema as rs
from meshd.snapshot import model as sm

UNIT_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
ACTIONS = ("ALLOW", "DENY", "AUDIT")
SCOPES = ("local", "global")


def _cidr(block: str) -> str:
    return str(ipaddress.ip_network(block, strict=False))


def _source(s: rs.AuthzSource) -> sm.AuthzSource:
    return sm.AuthzSource(
        principals=tuple(s.principals),
        not_principals=tuple(s.not_principals),
        ip_blocks=tuple(_cidr(b) for b in s.ip_blocks),
        not_ip_blocks=tuple(_cidr(b) for b in s.not_ip_blocks),
    )


def _operation(o: rs.AuthzOperation) -> sm.AuthzOperation:
    return sm.AuthzOperation(
        methods=tuple(o.methods),
        not_methods=tuple(o.not_methods),
        paths=tuple(o.paths),
        not_paths=tuple(o.not_paths),
        ports=tuple(o.ports),
        not_ports=tuple(o.not_ports),
        headers=tuple(
            sm.AuthzHeader(name=name.lower(), values=tuple(values))
            for name, values in sorted(o.headers.items())
        ),
    )


def authorization(rules: rs.RulesFile) -> tuple[sm.AuthzPolicy, ...]:
    """Every ``[[authorization]]`` rule as a snapshot ``AuthzPolicy``, in rule order."""
    return tuple(
        sm.AuthzPolicy(
            name=p.name,
            host=p.host.lower(),
            action=p.action,
            dry_run=p.dry_run,
            rules=tuple(
                sm.AuthzRule(
                    source=_source(r.from_) if r.from_ is not None else None,
                    operation=_operation(r.to) if r.to is not None else None,
                )
                for r in p.rules
            ),
        )
        for p in rules.authorization
    )


def ratelimits(rules: rs.RulesFile) -> tuple[sm.RateLimit, ...]:
    """Every ``[[ratelimit]]`` rule as a snapshot ``RateLimit``, in rule order."""
    out = []
    for r in rules.ratelimit:
        window = UNIT_SECONDS[r.unit]
        out.append(
            sm.RateLimit(
                name=r.name,
                host=r.host.lower(),
                rate_per_sec=r.requests_per_unit / window,
                burst=r.burst if r.burst is not None else r.requests_per_unit,
                requests_per_unit=r.requests_per_unit,
                window=window,
                route=r.route,
                key=r.key,
                scope=r.scope,
            )
        )
    return tuple(out)


def for_service(
    policies: Iterable[sm.AuthzPolicy], service: str
) -> tuple[sm.AuthzPolicy, ...]:
    """The policies ``service``'s inbound sidecar enforces: its own and those for ``"*"``;
    all of them when ``service`` is empty (a node that did not say which service it is)."""
    if not service:
        return tuple(policies)
    service = service.lower()
    return tuple(p for p in policies if p.host in ("*", service))


def problems(snap: sm.Snapshot) -> list[str]:
    """Consistency problems of ``snap.authorization`` and ``snap.ratelimits`` (empty: fine)."""
    out: list[str] = []
    for kind, names in (
        ("authorization policy", [p.name for p in snap.authorization]),
        ("rate limit", [r.name for r in snap.ratelimits]),
    ):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                out.append(f"duplicate {kind} {name}")
            seen.add(name)
    for p in snap.authorization:
        where = f"authorization policy {p.name}"
        if p.action not in ACTIONS:
            out.append(f"{where}: action {p.action!r} is not one of {', '.join(ACTIONS)}")
        for i, rule in enumerate(p.rules):
            blocks = (*rule.source.ip_blocks, *rule.source.not_ip_blocks) if rule.source else ()
            for block in blocks:
                try:
                    ipaddress.ip_network(block, strict=False)
                except ValueError:
                    out.append(f"{where} rule[{i}]: bad ip block {block!r}")
            ports = (*rule.operation.ports, *rule.operation.not_ports) if rule.operation else ()
            out += [f"{where} rule[{i}]: port {port} out of range" for port in ports
                    if not 0 < port < 65536]
    for r in snap.ratelimits:
        where = f"rate limit {r.name}"
        if not (r.rate_per_sec > 0 and r.burst >= 1 and r.requests_per_unit >= 1 and r.window > 0):
            out.append(f"{where}: rate, burst, requests_per_unit and window must be positive")
        if r.scope not in SCOPES:
            out.append(f"{where}: scope {r.scope!r} is not one of {', '.join(SCOPES)}")
    return out
