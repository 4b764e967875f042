"""Semantic checks of the security kinds: ``[[authorization]]`` and ``[[ratelimit]]``.

``checks.check_file`` calls ``check_security`` once per file; ``validate.check_references``
calls ``references`` on the merged rule set (a rate limit's ``route`` must name an http route
of the host's route rule). Same rules as ``checks``: every check appends a ``(path, reason)``
problem and goes on; no I/O, no text positions. Paths use the TOML names (``"from"``, not the
struct attribute ``from_``) so that ``locate.line_of`` finds them.

Patterns (principals, paths, header values) are Istio's: exact, ``"pre*"``, ``"*suf"`` or
``"*"``; a ``*`` anywhere else is refused rather than silently matched literally. Path patterns
must be normalized (``sidecar.core.authz.normalize_path``: no ``//``, ``.``, ``..`` or escaped
unreserved characters), since requests are matched normalized and such a pattern never would.
"""

from __future__ import annotations

import ipaddress
import re

from meshd.rules import checks
from meshd.rules.checks_traffic import TOKEN_RE, Path, Problem, in_range
from meshd.rules.schema import (
    AuthorizationRule,
    AuthzOperation,
    AuthzSource,
    RateLimitRule,
    RulesFile,
)
from sidecar.core.authz import decode_path, normalize_path

RATE_MAX = 1_000_000_000  # requests per unit and burst: anything larger is surely a typo
_SPIFFE_RE = re.compile(r"spiffe://[^/\s*]+(/\S*)?")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
HEADER_KEY = "header:"


def check_security(rules: RulesFile, out: list[Problem]) -> None:
    """Every problem of the ``authorization`` and ``ratelimit`` rules of one file."""
    for i, policy in enumerate(rules.authorization):
        _authorization(policy, ("authorization", i), out)
    for i, limit in enumerate(rules.ratelimit):
        _ratelimit(limit, ("ratelimit", i), out)
    for kind in ("authorization", "ratelimit"):
        seen: dict[str, int] = {}
        for i, rule in enumerate(getattr(rules, kind)):
            if rule.name in seen:
                where = checks.dotted((kind, seen[rule.name]))
                reason = f'duplicate {kind} rule name "{rule.name}", already used by {where}'
                out.append(((kind, i, "name"), reason))
            seen.setdefault(rule.name, i)


def references(rules: RulesFile) -> list[tuple[str, str, int, Path, str]]:
    """Cross-rule problems of a merged rule set: ``(kind, name, index, field path, reason)``.

    A rate limit's ``route`` must be the ``name`` of an http route of the route rule for its
    host (generated names such as ``<rule>-0`` are not accepted: they change when routes move).
    """
    out: list[tuple[str, str, int, Path, str]] = []
    routes = {r.host: r for r in rules.route}
    for i, limit in enumerate(rules.ratelimit):
        if not limit.route:
            continue
        rule = routes.get(limit.host)
        if rule is None:
            reason = (f'route "{limit.route}" needs a route rule for host "{limit.host}" '
                      "naming it; there is none")
        elif all(http.name != limit.route for http in rule.http):
            named = ", ".join(f'"{h.name}"' for h in rule.http if h.name) or "none"
            reason = (f'route rule "{rule.name}" of host "{limit.host}" has no http route named '
                      f'"{limit.route}" (named routes: {named})')
        else:
            continue
        out.append(("ratelimit", limit.name, i, ("route",), reason))
    return out


# --------------------------------------------------------------------------- authorization


def _authorization(policy: AuthorizationRule, path: Path, out: list[Problem]) -> None:
    checks.check_name(policy.name, (*path, "name"), out)
    if policy.host != "*":
        checks.check_host(policy.host, (*path, "host"), out)
    if not policy.rules and policy.action != "ALLOW":
        out.append(
            (
                (*path, "rules"),
                f"a {policy.action} policy without rules never matches; add at least one rule",
            )
        )
    if policy.dry_run and policy.action == "AUDIT":
        out.append(
            (
                (*path, "dry_run"),
                "dry_run has no effect on an AUDIT policy: auditing never changes the decision",
            )
        )
    for i, rule in enumerate(policy.rules):
        here = (*path, "rules", i)
        if rule.from_ is not None:
            _source(rule.from_, (*here, "from"), out)
        if rule.to is not None:
            _operation(rule.to, (*here, "to"), out)


def _source(source: AuthzSource, path: Path, out: list[Problem]) -> None:
    if source == AuthzSource():
        out.append((path, "from has no conditions; leave it out to match every source"))
    for field in ("principals", "not_principals"):
        for i, value in enumerate(getattr(source, field)):
            reason = principal_problem(value)
            if reason:
                out.append(((*path, field, i), reason))
    for field in ("ip_blocks", "not_ip_blocks"):
        for i, value in enumerate(getattr(source, field)):
            reason = ip_block_problem(value)
            if reason:
                out.append(((*path, field, i), reason))


def _operation(op: AuthzOperation, path: Path, out: list[Problem]) -> None:
    if op == AuthzOperation():
        out.append((path, "to has no conditions; leave it out to match every operation"))
    for field in ("methods", "not_methods"):
        for i, method in enumerate(getattr(op, field)):
            if not (TOKEN_RE.fullmatch(method) and method == method.upper()):
                reason = f'method "{method}" must be an upper-case HTTP token such as "GET"'
                out.append(((*path, field, i), reason))
    for field in ("paths", "not_paths"):
        for i, value in enumerate(getattr(op, field)):
            reason = path_problem(value)
            if reason:
                out.append(((*path, field, i), reason))
    for field in ("ports", "not_ports"):
        for i, port in enumerate(getattr(op, field)):
            in_range(port, 1, 65535, (*path, field, i), "port", out)
    for name, values in op.headers.items():
        here = (*path, "headers", name)
        if not TOKEN_RE.fullmatch(name):
            out.append((here, f'header name "{name}" is not a valid HTTP token'))
        elif name != name.lower():
            out.append((here, f'header name "{name}" must be lower case ("{name.lower()}")'))
        if not values:
            out.append((here, f'header "{name}" needs at least one value ("*": any value)'))
        for i, value in enumerate(values):
            if any(c in value for c in "\r\n\0"):
                reason = f'value of header "{name}" must not contain CR, LF or NUL'
            else:
                reason = _wildcard_problem(value, "header value")
            if reason:
                out.append(((*here, i), reason))


def _wildcard_problem(value: str, what: str) -> str | None:
    """Istio patterns: ``*`` alone, or once as the first or the last character."""
    if value == "*" or "*" not in value:
        return None
    if value.count("*") > 1 or not (value.startswith("*") or value.endswith("*")):
        return f'{what} "{value}" may hold one "*", as its first or last character only'
    return None


def principal_problem(value: str) -> str | None:
    """Why ``value`` is not a principal pattern (SPIFFE ID, ``*``, ``pre*``, ``*suf``)."""
    if value == "*":
        return None
    if not value:
        return "principal must not be empty"
    if _CONTROL.search(value):
        return f'principal "{value}" must not contain spaces or control characters'
    wildcard = _wildcard_problem(value, "principal")
    if wildcard:
        return wildcard
    if value.startswith("*"):
        return None  # suffix form: "*/sa/svca"
    body = value[:-1] if value.endswith("*") else value
    if body.startswith("spiffe://") and (
        value.endswith("*") or _SPIFFE_RE.fullmatch(body) is not None
    ):
        return None
    if "://" not in value and "/ns/" in value:
        return f'principal "{value}" must be a SPIFFE ID: write "spiffe://{value}"'
    return (
        f'principal "{value}" must be a SPIFFE ID ("spiffe://<trust-domain>/ns/<namespace>/sa/'
        '<service>"), "*", a prefix ending in "*" or a suffix starting with "*"'
    )


def ip_block_problem(value: str) -> str | None:
    """Why ``value`` is not an IP address or a CIDR block without host bits."""
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f'ip block "{value}" is not an IP address or CIDR block such as "10.0.0.0/8"'
        return f'ip block "{value}" has host bits set; did you mean "{network}"?'
    return None


def path_problem(value: str) -> str | None:
    """Why ``value`` is not a path pattern: ``/exact``, ``/prefix/*``, ``*suffix`` or ``*``."""
    if value == "*":
        return None
    if not value.startswith(("/", "*")):
        return f'path "{value}" must start with "/" or "*"'
    if _CONTROL.search(value):
        return f'path "{value}" must not contain spaces or control characters'
    if "?" in value or "#" in value:
        return f'path "{value}" must not contain a query ("?") or fragment ("#")'
    wildcard = _wildcard_problem(value, "path")
    if wildcard:
        return wildcard
    if value.endswith("*"):  # prefix: complete segments normalized, the partial one decoded
        head, _, tail = value[:-1].rpartition("/")
        wanted = normalize_path(head + "/") + decode_path(tail) + "*"
    elif value.startswith("*"):  # suffix: decoded, no repeated slashes
        wanted = "*" + re.sub("/+", "/", decode_path(value[1:]))
    else:
        wanted = normalize_path(value)
    if wanted != value:
        return (f'path "{value}" is not normalized: requests are matched after normalization, '
                f'so write "{wanted}"')
    return None


# --------------------------------------------------------------------------- rate limits


def _ratelimit(limit: RateLimitRule, path: Path, out: list[Problem]) -> None:
    checks.check_name(limit.name, (*path, "name"), out)
    checks.check_host(limit.host, (*path, "host"), out)
    in_range(
        limit.requests_per_unit, 1, RATE_MAX, (*path, "requests_per_unit"), "requests_per_unit", out
    )
    if limit.burst is not None:
        if limit.scope == "global":
            out.append(
                (
                    (*path, "burst"),
                    "burst has no effect on a global limit: it counts requests per unit window",
                )
            )
        else:
            in_range(limit.burst, 1, RATE_MAX, (*path, "burst"), "burst", out)
    reason = key_problem(limit.key)
    if reason:
        out.append(((*path, "key"), reason))


def key_problem(key: str) -> str | None:
    """Why ``key`` is not ``""``, ``"source_principal"`` or ``"header:<lower-case name>"``."""
    if key in ("", "source_principal"):
        return None
    if not key.startswith(HEADER_KEY):
        return f'key "{key}" must be "", "source_principal" or "header:<name>"'
    name = key[len(HEADER_KEY) :]
    if not TOKEN_RE.fullmatch(name):
        return f'key "{key}" has an invalid header name "{name}"'
    if name != name.lower():
        return f'key "{key}" must name a lower-case header ("{HEADER_KEY}{name.lower()}")'
    return None
