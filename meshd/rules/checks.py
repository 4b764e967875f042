"""Semantic checks of one rules file: pure functions from ``RulesFile`` to problems.

A problem is ``(path, reason)``: ``path`` is the data path of the offending field
(``("route", 0, "http", 1, "destinations")``), ``reason`` one short sentence. ``validate``
turns problems into ``ConfigError`` with file, line and dotted field. Nothing here looks at
other files: references between rules (subsets) are checked on the merged set by ``validate``.
The traffic-management fields (timeouts, retries, faults, mirroring, rewrites, redirects,
direct responses, header operations, destination traffic policy) are in ``checks_traffic``.

Rule 1: every check appends and goes on; one pass reports every problem of the file.
Rule 2: no I/O, no text positions: only the decoded structs.
"""

from __future__ import annotations

import ipaddress
import re

from meshd.rules import checks_security as security
from meshd.rules import checks_traffic as traffic
from meshd.rules.checks_traffic import TOKEN_RE, Path, Problem
from meshd.rules.schema import (
    DestinationRule,
    EgressRule,
    HTTPMatch,
    HTTPRoute,
    RouteRule,
    RulesFile,
    StringMatch,
    TCPRoute,
)

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
NAME_MAX = 253
_DNS_RE = re.compile(
    r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
)
REGEX_MAX = 1024
MATCH_KINDS = ("exact", "prefix", "suffix", "regex", "present", "absent")
WEIGHT_TOTAL = 100


def check_file(rules: RulesFile) -> list[Problem]:
    """Every semantic problem of ``rules`` taken alone, in file order per kind."""
    out: list[Problem] = []
    for i, route in enumerate(rules.route):
        _route(route, ("route", i), out)
    for i, dest in enumerate(rules.destination):
        _destination(dest, ("destination", i), out)
    for i, egress in enumerate(rules.egress):
        _egress(egress, ("egress", i), out)
    _unique_names(rules, out)
    _route_hosts(rules, out)
    security.check_security(rules, out)
    return out


def check_name(name: str, path: Path, out: list[Problem]) -> None:
    """Rule and subset names: DNS-1123-subdomain-like, ``[a-z0-9]([-a-z0-9.]*[a-z0-9])?``."""
    if not name:
        out.append((path, "name must not be empty"))
    elif len(name) > NAME_MAX:
        out.append((path, f"name is {len(name)} characters long, at most {NAME_MAX} allowed"))
    elif not NAME_RE.fullmatch(name):
        out.append(
            (
                path,
                f'name "{name}" must be lower-case letters, digits, "-" or ".", '
                "starting and ending with a letter or digit",
            )
        )


def check_host(host: str, path: Path, out: list[Problem], what: str = "host") -> None:
    """A DNS-ish host name: letters, digits, ``-`` and ``.``, lower case; ``what`` names the
    field in the reason (``"source"`` for a match block's calling service)."""
    if not host:
        out.append((path, f"{what} must not be empty"))
    elif len(host) > NAME_MAX or not _DNS_RE.fullmatch(host):
        out.append((path, f'{what} "{host}" is not a valid DNS name'))
    elif host != host.lower():
        out.append((path, f'{what} "{host}" must be lower case ("{host.lower()}")'))


def _route(route: RouteRule, path: Path, out: list[Problem]) -> None:
    check_name(route.name, (*path, "name"), out)
    check_host(route.host, (*path, "host"), out)
    if not route.http and not route.tcp:
        out.append(((*path, "http"), "at least one http route is required"))
    seen: dict[str, int] = {}
    for i, http in enumerate(route.http):
        here = (*path, "http", i)
        if http.name:
            check_name(http.name, (*here, "name"), out)
            if http.name in seen:
                where = dotted((*path, "http", seen[http.name]))
                out.append(
                    ((*here, "name"), f'duplicate name "{http.name}", already used by {where}')
                )
            seen.setdefault(http.name, i)
        _http(http, here, out)
    _tcp_routes(route.tcp, (*path, "tcp"), out)


def _tcp_routes(routes: list[TCPRoute], path: Path, out: list[Problem]) -> None:
    """Istio TCPRoute: names unique, ``port`` in 1..65535, weighted destinations as HTTP's."""
    seen: dict[str, int] = {}
    for i, tcp in enumerate(routes):
        here = (*path, i)
        if tcp.name:
            check_name(tcp.name, (*here, "name"), out)
            if tcp.name in seen:
                where = dotted((*path, seen[tcp.name]))
                out.append(((*here, "name"), f'duplicate name "{tcp.name}", already used by {where}'))
            seen.setdefault(tcp.name, i)
        for j, match in enumerate(tcp.match):
            if match.port is not None and not 1 <= match.port <= 65535:
                out.append(((*here, "match", j, "port"), f"port {match.port} is out of range 1..65535"))
        dests = (*here, "destinations")
        if not tcp.destinations:
            out.append((dests, "at least one destination is required"))
        for j, dest in enumerate(tcp.destinations):
            if dest.host is not None:
                check_host(dest.host, (*dests, j, "host"), out)
        _weights(tcp, dests, out)


def _http(http: HTTPRoute, path: Path, out: list[Problem]) -> None:
    for i, match in enumerate(http.match):
        _match(match, (*path, "match", i), out)
    dests = (*path, "destinations")
    if not http.destinations and http.redirect is None and http.direct_response is None:
        out.append((dests, "at least one destination is required"))
    for i, dest in enumerate(http.destinations):
        if dest.host is not None:
            check_host(dest.host, (*dests, i, "host"), out)
    _weights(http, dests, out)
    if http.mirror is not None and http.mirror.host is not None:
        check_host(http.mirror.host, (*path, "mirror", "host"), out)
    traffic.route_policies(http, path, out)


def _weights(http: HTTPRoute | TCPRoute, path: Path, out: list[Problem]) -> None:
    """Istio: one destination takes 100 %; several must each be weighted and sum to 100."""
    if len(http.destinations) == 1:
        weight = http.destinations[0].weight
        if weight is not None and weight != WEIGHT_TOTAL:
            out.append(
                ((*path, 0, "weight"), f"weight of a single destination must be 100, got {weight}")
            )
        return
    ok = True
    for i, dest in enumerate(http.destinations):
        if dest.weight is None:
            out.append(
                ((*path, i, "weight"), "weight is required when there are several destinations")
            )
            ok = False
        elif not 0 <= dest.weight <= WEIGHT_TOTAL:
            out.append(((*path, i, "weight"), f"weight {dest.weight} is out of range 0..100"))
            ok = False
    total = sum(d.weight or 0 for d in http.destinations)
    if ok and http.destinations and total != WEIGHT_TOTAL:
        out.append((path, f"weights sum to {total}, must be 100"))


def _match(match: HTTPMatch, path: Path, out: list[Problem]) -> None:
    if match.path is not None and _string_match(match.path, (*path, "path"), out, "path"):
        for kind in ("exact", "prefix"):
            value = getattr(match.path, kind)
            if value is not None and not value.startswith("/"):
                out.append(((*path, "path", kind), f'path {kind} "{value}" must start with "/"'))
    if match.method is not None and _string_match(match.method, (*path, "method"), out, "method"):
        for kind in ("exact", "prefix", "suffix"):
            value = getattr(match.method, kind)
            if value is not None and not (TOKEN_RE.fullmatch(value) and value == value.upper()):
                out.append(
                    (
                        (*path, "method", kind),
                        f'method "{value}" must be an upper-case HTTP token such as "GET"',
                    )
                )
    if match.authority is not None:
        _string_match(match.authority, (*path, "authority"), out, "authority")
    for name, value in match.headers.items():
        here = (*path, "headers", name)
        if not TOKEN_RE.fullmatch(name):
            out.append((here, f'header name "{name}" is not a valid HTTP token'))
        elif name != name.lower():
            out.append((here, f'header name "{name}" must be lower case ("{name.lower()}")'))
        _string_match(value, here, out)
    for name, value in match.query_params.items():
        _string_match(value, (*path, "query_params", name), out)
    if match.source is not None:
        check_host(match.source, (*path, "source"), out, what="source")
    traffic.match_extras(match, path, out)


def _string_match(
    match: StringMatch, path: Path, out: list[Problem], field: str | None = None
) -> bool:
    """Exactly one of exact/prefix/suffix/regex/present/absent, a regex that compiles, and
    ``present``/``absent`` only ``true`` and only where a value may be missing (not for
    ``field`` path, method or authority: every request has them). True when usable."""
    kinds = [k for k in MATCH_KINDS if getattr(match, k) is not None]
    if not kinds and match.invert:
        out.append(
            (
                (*path, "invert"),
                "invert needs a condition to negate: set one of " + ", ".join(MATCH_KINDS),
            )
        )
        return False
    if len(kinds) != 1:
        got = "none" if not kinds else " and ".join(kinds)
        out.append((path, f"set exactly one of {', '.join(MATCH_KINDS)} (got {got})"))
        return False
    (kind,) = kinds
    if kind in ("present", "absent"):
        if field is not None:
            out.append(((*path, kind), f"{kind} makes no sense for {field}: every request has one"))
            return False
        if getattr(match, kind) is not True:
            out.append(((*path, kind), f"{kind} must be true when set"))
            return False
    if match.regex is None:
        return True
    here = (*path, "regex")
    if len(match.regex) > REGEX_MAX:
        out.append(
            (here, f"regex is {len(match.regex)} characters long, at most {REGEX_MAX} allowed")
        )
        return False
    try:
        re.compile(match.regex)
    except (re.error, RecursionError, OverflowError) as exc:
        out.append((here, f"invalid regex: {exc}"))
        return False
    return True


def _destination(dest: DestinationRule, path: Path, out: list[Problem]) -> None:
    check_name(dest.name, (*path, "name"), out)
    check_host(dest.host, (*path, "host"), out)
    seen: dict[str, int] = {}
    for i, subset in enumerate(dest.subsets):
        here = (*path, "subsets", i)
        check_name(subset.name, (*here, "name"), out)
        if subset.name in seen:
            where = dotted((*path, "subsets", seen[subset.name]))
            out.append(
                ((*here, "name"), f'duplicate subset name "{subset.name}", already used by {where}')
            )
        seen.setdefault(subset.name, i)
        if not subset.labels:
            out.append(((*here, "labels"), "a subset needs at least one label"))
    traffic.destination_policies(dest, path, out)


def _egress(egress: EgressRule, path: Path, out: list[Problem]) -> None:
    check_name(egress.name, (*path, "name"), out)
    host = egress.host
    if "://" in host:
        out.append(((*path, "host"), f'host "{host}" must not contain a scheme'))
    elif ":" in host:
        out.append(
            ((*path, "host"), f'host "{host}" must not contain a port; list ports in "ports"')
        )
    else:
        check_host(host, (*path, "host"), out)
    if not egress.ports:
        out.append(((*path, "ports"), "at least one port is required"))
    seen: set[int] = set()
    for i, port in enumerate(egress.ports):
        if not 1 <= port <= 65535:
            out.append(((*path, "ports", i), f"port {port} is out of range 1..65535"))
        elif port in seen:
            out.append(((*path, "ports", i), f"duplicate port {port}"))
        seen.add(port)
    for i, endpoint in enumerate(egress.endpoints):
        reason = endpoint_problem(endpoint)
        if reason:
            out.append(((*path, "endpoints", i), reason))


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not ``"host:port"`` (IPv6 as ``"[::1]:80"``), or None when it is."""
    usage = f'endpoint "{endpoint}" must be "host:port" (IPv6 as "[::1]:80")'
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return usage
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f'endpoint "{endpoint}" has an invalid IPv6 address'
    elif ":" in host:
        return usage
    elif not _DNS_RE.fullmatch(host):
        return f'endpoint "{endpoint}" has an invalid host'
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f'endpoint "{endpoint}" has port "{port}" out of range 1..65535'
    return None


def _unique_names(rules: RulesFile, out: list[Problem]) -> None:
    for kind in ("route", "destination", "egress"):
        seen: dict[str, int] = {}
        for i, rule in enumerate(getattr(rules, kind)):
            if rule.name in seen:
                where = dotted((kind, seen[rule.name]))
                out.append(
                    (
                        (kind, i, "name"),
                        f'duplicate {kind} rule name "{rule.name}", already used by {where}',
                    )
                )
            seen.setdefault(rule.name, i)


def _route_hosts(rules: RulesFile, out: list[Problem]) -> None:
    """One route and one destination rule per host (Istio merges them ambiguously; we refuse)."""
    for kind in ("route", "destination"):
        owner: dict[str, str] = {}
        for i, rule in enumerate(getattr(rules, kind)):
            if rule.host in owner and owner[rule.host] != rule.name:
                out.append(((kind, i, "host"), host_taken(rule.host, owner[rule.host], kind)))
            owner.setdefault(rule.host, rule.name)


def host_taken(host: str, owner: str, kind: str = "route") -> str:
    return f'host "{host}" already has {kind} rule "{owner}"'


def dotted(path: Path) -> str:
    """``("route", 0, "http")`` -> ``"route[0].http"``; odd keys as ``["x y"]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out
