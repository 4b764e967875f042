"""Semantic checks of the traffic-management fields (Istio HTTPRoute options and DestinationRule
traffic policy), plus the primitives they share with ``checks``.

``checks`` calls ``route_policies`` for every ``[[route.http]]``, ``match_extras`` for every
match block and ``destination_policies`` for every ``[[destination]]``; ``unreachable`` finds the
routes and match blocks that can never win (warnings, not errors). Same rules as ``checks``:
every check appends a ``(path, reason)`` problem and goes on; no I/O, no text positions.

Bounds are deliberately tight where a hostile or mistyped value would hurt the data plane
(retry attempts, ring size, connection limits, direct response body size).
"""

from __future__ import annotations

import math
import re

from meshd.rules import units
from meshd.rules.schema import (
    ConnectionPool,
    ConsistentHash,
    DestinationRule,
    Fault,
    HeaderOps,
    HealthCheck,
    HTTPMatch,
    HTTPRoute,
    OutlierDetection,
    Retries,
    RulesFile,
)
from sidecar.core.retry import GRPC_RETRY_ON
from sidecar.http2.grpc import GRPC_CODES

Path = tuple[str | int, ...]
Problem = tuple[Path, str]

TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 7230 token
_AUTHORITY_RE = re.compile(r"(?P<host>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)(:(?P<port>[0-9]{1,5}))?")

RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    *GRPC_RETRY_ON,  # x-envoy-retry-grpc-on: cancelled, deadline-exceeded, internal, ...
)
MAX_RETRY_ATTEMPTS = 10  # bounds retry storms from a hostile or mistyped config (Istio default 2)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DIRECT_RESPONSE_BODY_MAX = 64 * 1024  # Envoy's max_direct_response_body_size_bytes is 4 KiB
RING_SIZE_MAX = 8_388_608  # Envoy maximum_ring_size default (8M entries)
LIMIT_MAX = 1_000_000  # connection pool limits, outlier counts, thresholds
# Headers the proxy owns: hop-by-hop (RFC 9110 §7.6.1) and message framing; rewriting them
# would desynchronise the two sides of the proxy (request smuggling). ``host``: rewrite.authority.
PROXY_OWNED_HEADERS = frozenset(
    (
        "connection",
        "transfer-encoding",
        "host",
        "content-length",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
    )
)
_MEANINGLESS_WITH_LOCAL_ANSWER = ("timeout", "retries", "fault", "mirror", "rewrite")


# --------------------------------------------------------------------------- routes


def route_policies(http: HTTPRoute, path: Path, out: list[Problem]) -> None:
    """Everything of one HTTPRoute beyond match blocks and destinations."""
    _actions(http, path, out)
    timeout = None
    if http.timeout is not None:
        timeout = duration(http.timeout, (*path, "timeout"), out, positive=True)
    if http.retries is not None:
        _retries(http.retries, timeout, http.timeout, (*path, "retries"), out)
    if http.fault is not None:
        _fault(http.fault, (*path, "fault"), out)
    if http.mirror is not None:
        percentage(http.mirror.percentage, (*path, "mirror", "percentage"), out)
    if http.rewrite is not None:
        _rewrite(http, (*path, "rewrite"), out)
    if http.redirect is not None:
        _redirect(http, (*path, "redirect"), out)
    if http.direct_response is not None:
        here = (*path, "direct_response")
        in_range(http.direct_response.status, 100, 599, (*here, "status"), "status", out)
        size = len(http.direct_response.body.encode())
        if size > DIRECT_RESPONSE_BODY_MAX:
            reason = f"body is {size} bytes long, at most {DIRECT_RESPONSE_BODY_MAX} allowed"
            out.append(((*here, "body"), reason))
    if http.headers is not None:
        for direction in ("request", "response"):
            ops = getattr(http.headers, direction)
            if ops is not None:
                _header_ops(ops, direction, (*path, "headers", direction), out)


def _actions(http: HTTPRoute, path: Path, out: list[Problem]) -> None:
    """Exactly one action: destinations, redirect or direct_response (none: ``checks`` says so)."""
    actions = [
        name
        for name, present in (
            ("destinations", bool(http.destinations)),
            ("redirect", http.redirect is not None),
            ("direct_response", http.direct_response is not None),
        )
        if present
    ]
    if len(actions) > 1:
        got = (
            " and ".join(actions)
            if len(actions) == 2
            else "destinations, redirect and direct_response"
        )
        out.append(
            (
                (*path, actions[1]),
                f"set only one of destinations, redirect, direct_response (got {got})",
            )
        )
    local = next((a for a in actions if a != "destinations"), None)
    if local is None:
        return
    for field in _MEANINGLESS_WITH_LOCAL_ANSWER:
        if getattr(http, field) is not None:
            out.append(
                (
                    (*path, field),
                    f"{field} is meaningless with {local}: the sidecar answers itself "
                    "and forwards nothing",
                )
            )


def _retries(
    retries: Retries,
    timeout: float | None,
    timeout_text: str | None,
    path: Path,
    out: list[Problem],
) -> None:
    in_range(retries.attempts, 0, MAX_RETRY_ATTEMPTS, (*path, "attempts"), "attempts", out)
    if retries.per_try_timeout is not None:
        per_try = duration(retries.per_try_timeout, (*path, "per_try_timeout"), out, positive=True)
        if per_try is not None and timeout is not None and per_try > timeout:
            out.append(
                (
                    (*path, "per_try_timeout"),
                    f"per_try_timeout {retries.per_try_timeout} exceeds the route timeout "
                    f"{timeout_text}",
                )
            )
    duration(retries.backoff, (*path, "backoff"), out)
    conditions = [c.strip() for c in retries.retry_on.split(",")]
    for condition in conditions:
        if condition not in RETRY_ON:
            out.append(
                (
                    (*path, "retry_on"),
                    f'unknown retry_on condition "{condition}", expected a comma list of: '
                    + ", ".join(RETRY_ON),
                )
            )
    codes = (*path, "retriable_status_codes")
    wants_codes = "retriable-status-codes" in conditions
    if wants_codes and not retries.retriable_status_codes:
        out.append(
            (codes, "retry_on has retriable-status-codes but retriable_status_codes is empty")
        )
    elif retries.retriable_status_codes and not wants_codes:
        out.append(
            (
                codes,
                "retriable_status_codes has no effect unless retry_on includes "
                "retriable-status-codes",
            )
        )
    for i, code in enumerate(retries.retriable_status_codes):
        in_range(code, 100, 599, (*codes, i), "status code", out)


def _fault(fault: Fault, path: Path, out: list[Problem]) -> None:
    if fault.delay is None and fault.abort is None:
        out.append((path, "set at least one of delay, abort"))
    if fault.delay is not None:
        duration(fault.delay.fixed, (*path, "delay", "fixed"), out)
        percentage(fault.delay.percentage, (*path, "delay", "percentage"), out)
    if fault.abort is not None:
        abort = fault.abort
        if (abort.status is None) == (abort.grpc_status is None):
            out.append(((*path, "abort"), "set exactly one of status, grpc_status"))
        if abort.status is not None:
            in_range(abort.status, 200, 599, (*path, "abort", "status"), "abort status", out)
        if abort.grpc_status is not None and abort.grpc_status.upper() not in GRPC_CODES:
            out.append(((*path, "abort", "grpc_status"),
                        f'unknown gRPC status "{abort.grpc_status}", expected one of: '
                        + ", ".join(GRPC_CODES)))
        percentage(abort.percentage, (*path, "abort", "percentage"), out)


def _rewrite(http: HTTPRoute, path: Path, out: list[Problem]) -> None:
    """Istio rewrite: ``path_prefix`` replaces the path prefix the route matched ("/" when a
    match block has none), ``authority`` the Host/:authority."""
    rewrite = http.rewrite
    assert rewrite is not None
    if rewrite.path_prefix is None and rewrite.authority is None:
        out.append((path, "set path_prefix, authority or both"))
    if rewrite.path_prefix is not None:
        here = (*path, "path_prefix")
        if not rewrite.path_prefix.startswith("/"):
            out.append((here, f'path_prefix "{rewrite.path_prefix}" must start with "/"'))
        prefixes = sorted(
            {m.path.prefix for m in http.match if m.path is not None and m.path.prefix is not None}
        )
        if len(prefixes) > 1:  # one route carries one replaced prefix (snapshot matched_prefix)
            got = ", ".join(f'"{p}"' for p in prefixes)
            out.append(
                (
                    here,
                    "path_prefix replaces the matched path prefix, but the match blocks have "
                    f"several ({got}); write one route per prefix",
                )
            )
    if rewrite.authority is not None:
        _authority(rewrite.authority, (*path, "authority"), out)


def _redirect(http: HTTPRoute, path: Path, out: list[Problem]) -> None:
    redirect = http.redirect
    assert redirect is not None
    if redirect.path is None and redirect.authority is None:
        out.append((path, "set path, authority or both (a redirect to the same URL loops)"))
    if redirect.path is not None and not redirect.path.startswith("/"):
        out.append(((*path, "path"), f'redirect path "{redirect.path}" must start with "/"'))
    if redirect.authority is not None:
        _authority(redirect.authority, (*path, "authority"), out)
    if redirect.status not in REDIRECT_STATUSES:
        allowed = ", ".join(str(s) for s in REDIRECT_STATUSES)
        out.append(
            ((*path, "status"), f"redirect status {redirect.status} must be one of {allowed}")
        )


def _authority(value: str, path: Path, out: list[Problem]) -> None:
    """``host`` or ``host:port``, lower case, no scheme or path."""
    found = _AUTHORITY_RE.fullmatch(value)
    if found is None or len(found["host"]) > 253:
        out.append((path, f'authority "{value}" must be a lower-case "host" or "host:port"'))
    elif found["port"] is not None and not 1 <= int(found["port"]) <= 65535:
        out.append((path, f'authority "{value}" has port {found["port"]} out of range 1..65535'))


def _header_ops(ops: HeaderOps, direction: str, path: Path, out: list[Problem]) -> None:
    for op in ("set", "add"):
        for name, value in getattr(ops, op).items():
            here = (*path, op, name)
            header_name(name, direction, here, out)
            if any(c in value for c in "\r\n\0"):
                out.append((here, f'value of header "{name}" must not contain CR, LF or NUL'))
    for i, name in enumerate(ops.remove):
        header_name(name, direction, (*path, "remove", i), out)
        if name in ops.set or name in ops.add:
            out.append(((*path, "remove", i), f'header "{name}" is both removed and set or added'))


def header_name(name: str, direction: str, path: Path, out: list[Problem]) -> None:
    """A header a route may set, add or remove: a lower-case token the proxy does not own."""
    if name.startswith(":"):
        out.append((path, f'header "{name}" is a pseudo-header and cannot be changed'))
    elif not TOKEN_RE.fullmatch(name):
        out.append((path, f'header name "{name}" is not a valid HTTP token'))
    elif name != name.lower():
        out.append((path, f'header name "{name}" must be lower case ("{name.lower()}")'))
    elif name == "host" and direction == "request":
        out.append((path, 'header "host" cannot be changed here; use rewrite.authority'))
    elif name in PROXY_OWNED_HEADERS or name.startswith("proxy-"):
        out.append(
            (
                path,
                f'header "{name}" is hop-by-hop or framing, owned by the proxy; it cannot be changed',
            )
        )


# --------------------------------------------------------------------------- match blocks


def match_extras(match: HTTPMatch, path: Path, out: list[Problem]) -> None:
    """query_params names, port and source_labels of one match block (the StringMatches, the
    headers and ``source`` are checked by ``checks``)."""
    for name in match.query_params:
        if not name:
            out.append(((*path, "query_params", name), "query parameter name must not be empty"))
    if match.port is not None:
        in_range(match.port, 1, 65535, (*path, "port"), "port", out)
    for key, value in match.source_labels.items():
        here = (*path, "source_labels", key)
        if not key:
            out.append((here, "label name must not be empty"))
        elif not value:
            out.append((here, f'label "{key}" must have a non-empty value'))


def is_catch_all(http: HTTPRoute) -> bool:
    """True when the route matches every request: no match blocks, or an empty one."""
    return not http.match or any(m == HTTPMatch() for m in http.match)


def unreachable(rules: RulesFile) -> list[Problem]:
    """Routes after a catch-all route of the same rule, and match blocks identical to an
    earlier one of the same rule: first match wins, so they never decide a request."""
    out: list[Problem] = []
    for r, rule in enumerate(rules.route):
        catch_all: int | None = None
        seen: list[tuple[HTTPMatch, str]] = []
        for i, http in enumerate(rule.http):
            path: Path = ("route", r, "http", i)
            if catch_all is not None:
                out.append(
                    (path, f"unreachable: route[{r}].http[{catch_all}] matches every request")
                )
                continue
            for j, match in enumerate(http.match):
                earlier = next((where for m, where in seen if m == match), None)
                if earlier is not None:
                    out.append(
                        ((*path, "match", j), f"unreachable: {earlier} matches the same requests")
                    )
                else:
                    seen.append((match, f"route[{r}].http[{i}].match[{j}]"))
            if is_catch_all(http):
                catch_all = i
    return out


# --------------------------------------------------------------------------- destinations


def destination_policies(dest: DestinationRule, path: Path, out: list[Problem]) -> None:
    """The traffic policy of one DestinationRule (load balancer, pools, ejection, checks)."""
    hashing = dest.load_balancer in ("ring_hash", "maglev")
    if dest.consistent_hash is not None:
        _consistent_hash(dest.consistent_hash, (*path, "consistent_hash"), out)
        if not hashing:
            out.append(
                (
                    (*path, "consistent_hash"),
                    'consistent_hash needs load_balancer "ring_hash" or "maglev" '
                    f'(got "{dest.load_balancer}")',
                )
            )
    elif hashing:
        out.append(
            (
                (*path, "load_balancer"),
                f'load_balancer "{dest.load_balancer}" needs a consistent_hash table '
                "naming the hash key",
            )
        )
    if dest.locality is not None:
        for field in ("region_label", "zone_label"):
            if not getattr(dest.locality, field):
                out.append(((*path, "locality", field), f"{field} must not be empty"))
    if dest.slow_start is not None:
        duration(dest.slow_start, (*path, "slow_start"), out)
    if dest.connection_pool is not None:
        _connection_pool(dest.connection_pool, (*path, "connection_pool"), out)
    if dest.outlier_detection is not None:
        _outlier_detection(dest.outlier_detection, (*path, "outlier_detection"), out)
    if dest.health_check is not None:
        _health_check(dest.health_check, (*path, "health_check"), out)
    if dest.retry_budget is not None:
        here = (*path, "retry_budget")
        percentage(dest.retry_budget.percent, (*here, "percent"), out, name="percent")
        in_range(
            dest.retry_budget.min_concurrency,
            0,
            LIMIT_MAX,
            (*here, "min_concurrency"),
            "min_concurrency",
            out,
        )


def _consistent_hash(hashing: ConsistentHash, path: Path, out: list[Problem]) -> None:
    keys = [k for k in ("header", "cookie", "query_param", "source_ip") if getattr(hashing, k)]
    if len(keys) != 1:
        got = "none" if not keys else " and ".join(keys)
        out.append(
            (path, f"set exactly one of header, cookie, query_param, source_ip = true (got {got})")
        )
    if hashing.source_ip is False:
        out.append(((*path, "source_ip"), "source_ip must be true when set"))
    for key in ("header", "cookie", "query_param"):
        value = getattr(hashing, key)
        if value == "":
            out.append(((*path, key), f"{key} must not be empty"))
    if hashing.header:
        if not TOKEN_RE.fullmatch(hashing.header):
            out.append(
                ((*path, "header"), f'header name "{hashing.header}" is not a valid HTTP token')
            )
        elif hashing.header != hashing.header.lower():
            lower = hashing.header.lower()
            out.append(
                (
                    (*path, "header"),
                    f'header name "{hashing.header}" must be lower case ("{lower}")',
                )
            )
    in_range(hashing.ring_size, 1, RING_SIZE_MAX, (*path, "ring_size"), "ring_size", out)


def _connection_pool(pool: ConnectionPool, path: Path, out: list[Problem]) -> None:
    for field in ("max_connections", "max_pending_requests", "max_requests"):
        in_range(getattr(pool, field), 1, LIMIT_MAX, (*path, field), field, out)
    in_range(pool.max_retries, 0, LIMIT_MAX, (*path, "max_retries"), "max_retries", out)
    duration(pool.connect_timeout, (*path, "connect_timeout"), out, positive=True)
    duration(pool.idle_timeout, (*path, "idle_timeout"), out)
    if pool.max_connection_duration is not None:
        duration(pool.max_connection_duration, (*path, "max_connection_duration"), out)


_OUTLIER_COUNTS = (
    "consecutive_5xx",
    "consecutive_gateway_errors",
    "consecutive_local_origin_failures",
)


def _outlier_detection(od: OutlierDetection, path: Path, out: list[Problem]) -> None:
    for field in _OUTLIER_COUNTS:
        in_range(getattr(od, field), 0, LIMIT_MAX, (*path, field), field, out)
    if all(getattr(od, field) <= 0 for field in _OUTLIER_COUNTS):
        out.append(
            (
                path,
                "set at least one of " + ", ".join(_OUTLIER_COUNTS) + " above 0 "
                "(all 0 never ejects anything; remove the table instead)",
            )
        )
    duration(od.interval, (*path, "interval"), out, positive=True)
    duration(od.base_ejection_time, (*path, "base_ejection_time"), out, positive=True)
    percentage(
        od.max_ejection_percent, (*path, "max_ejection_percent"), out, "max_ejection_percent"
    )
    percentage(od.min_health_percent, (*path, "min_health_percent"), out, "min_health_percent")


def _health_check(hc: HealthCheck, path: Path, out: list[Problem]) -> None:
    if (hc.path is None) == (not hc.tcp):
        got = "both" if hc.tcp else "neither"
        out.append((path, f"set exactly one of path, tcp = true (got {got})"))
    if hc.path is not None and not hc.path.startswith("/"):
        out.append(((*path, "path"), f'health check path "{hc.path}" must start with "/"'))
    duration(hc.interval, (*path, "interval"), out, positive=True)
    duration(hc.timeout, (*path, "timeout"), out, positive=True)
    duration(hc.jitter, (*path, "jitter"), out)
    for field in ("healthy_threshold", "unhealthy_threshold"):
        in_range(getattr(hc, field), 1, LIMIT_MAX, (*path, field), field, out)


# --------------------------------------------------------------------------- units


def duration(text: str, path: Path, out: list[Problem], positive: bool = False) -> float | None:
    """Seconds of a duration field, or None after appending why it is not one.

    ``positive``: zero is meaningless for this field (a timeout, an interval) and is refused.
    """
    try:
        seconds = units.duration(text)
    except ValueError as exc:
        out.append((path, str(exc)))
        return None
    if positive and seconds <= 0:
        out.append((path, f'{path[-1]} must be greater than 0 (got "{text}")'))
        return None
    return seconds


def percentage(value: float, path: Path, out: list[Problem], name: str = "percentage") -> None:
    """0..100 inclusive (Istio Percent); NaN and infinities are out of range."""
    if not units.percentage_ok(value):
        shown = int(value) if math.isfinite(value) and value.is_integer() else value
        out.append((path, f"{name} {shown} is out of range 0..100"))


def in_range(value: int, low: int, high: int, path: Path, name: str, out: list[Problem]) -> None:
    if not low <= value <= high:
        out.append((path, f"{name} {value} is out of range {low}..{high}"))
