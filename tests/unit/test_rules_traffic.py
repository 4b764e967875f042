"""Rules: semantic checks of the traffic-management fields, unreachable-route warnings, durations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import ConfigError, RuleValidationError
from meshd.rules import units
from meshd.rules.schema import RulesFile
from meshd.rules.validate import check_references, parse_rules, validate_push, warnings

DURATION_USAGE = 'is not a duration like "250ms", "2s", "1.5m" or "1h"'


def errors_of(text: str, existing: RulesFile | None = None) -> list[str]:
    with pytest.raises(RuleValidationError) as caught:
        validate_push(text, "r.toml", existing or RulesFile())
    return [str(e) for e in caught.value.errors]


# Route fields start on line 5, destination fields on line 4.
ROUTE = '[[route]]\nname = "r"\nhost = "svcb"\n[[route.http]]\n'
DEST = '[[destination]]\nname = "d"\nhost = "svcb"\n'
TO_X = 'destinations = [{ host = "x" }]\n'
H = "route[0].http[0]"
M = f"{H}.match[0]"


def match(block: str) -> str:
    """A route whose one match block is ``block`` (line 5), going to host x (line 6)."""
    return ROUTE + f"match = [{{ {block} }}]\n" + TO_X


BAD_FILES: list[tuple[str, str, list[str]]] = [
    # ---------------------------------------------------------------- StringMatch
    (
        "string-match-suffix-and-regex",
        match('headers.x-a = { suffix = "a", regex = "b" }'),
        [
            f"r.toml:5: {M}.headers.x-a: set exactly one of exact, prefix, suffix, regex, "
            "present, absent (got suffix and regex)"
        ],
    ),
    (
        "string-match-present-false",
        match("headers.x-a = { present = false }"),
        [f"r.toml:5: {M}.headers.x-a.present: present must be true when set"],
    ),
    (
        "string-match-absent-false",
        match("query_params.debug = { absent = false }"),
        [f"r.toml:5: {M}.query_params.debug.absent: absent must be true when set"],
    ),
    (
        "string-match-invert-alone",
        match("headers.x-a = { invert = true }"),
        [
            f"r.toml:5: {M}.headers.x-a.invert: invert needs a condition to negate: "
            "set one of exact, prefix, suffix, regex, present, absent"
        ],
    ),
    (
        "present-on-path",
        match("path = { present = true }"),
        [f"r.toml:5: {M}.path.present: present makes no sense for path: every request has one"],
    ),
    (
        "absent-on-method-and-authority",
        match("method = { absent = true }, authority = { present = true }"),
        [
            f"r.toml:5: {M}.method.absent: absent makes no sense for method: every request has one",
            f"r.toml:5: {M}.authority.present: present makes no sense for authority: "
            "every request has one",
        ],
    ),
    (
        "method-and-path-suffix-are-valid",
        match('method = { suffix = "ET" }, path = { suffix = "json" }'),
        [],  # a suffix of a token is a token; path suffix need not start with "/"
    ),
    (
        "method-suffix-not-upper",
        match('method = { suffix = "et" }'),
        [
            f"r.toml:5: {M}.method.suffix: "
            'method "et" must be an upper-case HTTP token such as "GET"'
        ],
    ),
    (
        "authority-bad-regex",
        match('authority = { regex = "(svcb" }'),
        [
            f"r.toml:5: {M}.authority.regex: invalid regex: "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    # ---------------------------------------------------------------- HTTPMatch extras
    (
        "query-param-empty-name",
        match('query_params = { "" = { exact = "1" } }'),
        [f'r.toml:5: {M}.query_params[""]: query parameter name must not be empty'],
    ),
    (
        "query-param-no-condition",
        match("query_params.q = {}"),
        [
            f"r.toml:5: {M}.query_params.q: "
            "set exactly one of exact, prefix, suffix, regex, present, absent (got none)"
        ],
    ),
    (
        "port-out-of-range",
        ROUTE + "match = [\n  { port = 0 },\n  { port = 65536 },\n]\n" + TO_X,
        [
            f"r.toml:6: {M}.port: port 0 is out of range 1..65535",
            f"r.toml:7: {H}.match[1].port: port 65536 is out of range 1..65535",
        ],
    ),
    (
        "source-not-a-service-name",
        ROUTE + 'match = [\n  { source = "svc_a" },\n  { source = "SvcA" },\n]\n' + TO_X,
        [
            f'r.toml:6: {M}.source: source "svc_a" is not a valid DNS name',
            f'r.toml:7: {H}.match[1].source: source "SvcA" must be lower case ("svca")',
        ],
    ),
    (
        "source-labels-empty",
        match('source_labels = { "" = "x", version = "" }'),
        [
            f'r.toml:5: {M}.source_labels[""]: label name must not be empty',
            f'r.toml:5: {M}.source_labels.version: label "version" must have a non-empty value',
        ],
    ),
    # ---------------------------------------------------------------- timeouts and retries
    (
        "timeout-not-a-duration",
        ROUTE + TO_X + 'timeout = "2 seconds"\n',
        [f'r.toml:6: {H}.timeout: "2 seconds" {DURATION_USAGE}'],
    ),
    (
        "timeout-zero",
        ROUTE + TO_X + 'timeout = "0s"\n',
        [f'r.toml:6: {H}.timeout: timeout must be greater than 0 (got "0s")'],
    ),
    (
        "timeout-longer-than-30-days",
        ROUTE + TO_X + 'timeout = "721h"\n',
        [f'r.toml:6: {H}.timeout: "721h" is longer than 30 days'],
    ),
    (
        "per-try-timeout-exceeds-timeout",
        ROUTE + TO_X + 'timeout = "2s"\nretries = { per_try_timeout = "3s" }\n',
        [f"r.toml:7: {H}.retries.per_try_timeout: per_try_timeout 3s exceeds the route timeout 2s"],
    ),
    (
        "per-try-timeout-zero-and-bad-backoff",
        ROUTE + TO_X + '[route.http.retries]\nper_try_timeout = "0ms"\nbackoff = "25"\n',
        [
            f"r.toml:7: {H}.retries.per_try_timeout: per_try_timeout must be greater than 0 "
            '(got "0ms")',
            f'r.toml:8: {H}.retries.backoff: "25" {DURATION_USAGE}',
        ],
    ),
    (
        "retry-attempts-out-of-range",
        ROUTE + TO_X + "retries = { attempts = 11 }\n",
        [f"r.toml:6: {H}.retries.attempts: attempts 11 is out of range 0..10"],
    ),
    (
        "retry-on-unknown-condition",
        ROUTE + TO_X + 'retries = { retry_on = "5xx, gateway-eror" }\n',
        [
            f'r.toml:6: {H}.retries.retry_on: unknown retry_on condition "gateway-eror", '
            "expected a comma list of: 5xx, gateway-error, reset, connect-failure, "
            "refused-stream, retriable-4xx, retriable-status-codes, cancelled, deadline-exceeded, "
            "resource-exhausted, internal, unavailable"
        ],
    ),
    (
        "retriable-status-codes-missing",
        ROUTE + TO_X + 'retries = { retry_on = "retriable-status-codes" }\n',
        [
            f"r.toml:6: {H}.retries.retriable_status_codes: "
            "retry_on has retriable-status-codes but retriable_status_codes is empty"
        ],
    ),
    (
        "retriable-status-code-out-of-range",
        ROUTE + TO_X + "[route.http.retries]\n"
        'retry_on = "retriable-status-codes,reset"\nretriable_status_codes = [503, 600]\n',
        [
            f"r.toml:8: {H}.retries.retriable_status_codes[1]: status code 600 is out of range 100..599"
        ],
    ),
    (
        "retriable-status-codes-without-condition",
        ROUTE + TO_X + "retries = { retriable_status_codes = [503] }\n",
        [
            f"r.toml:6: {H}.retries.retriable_status_codes: retriable_status_codes has no effect "
            "unless retry_on includes retriable-status-codes"
        ],
    ),
    # ---------------------------------------------------------------- faults
    (
        "fault-empty",
        ROUTE + TO_X + "fault = {}\n",
        [f"r.toml:6: {H}.fault: set at least one of delay, abort"],
    ),
    (
        "fault-abort-status",
        ROUTE + TO_X + "fault.abort = { status = 100 }\n",
        [f"r.toml:6: {H}.fault.abort.status: abort status 100 is out of range 200..599"],
    ),
    (
        "fault-percentages",
        ROUTE + TO_X + "[route.http.fault]\n"
        'delay = { fixed = "5s", percentage = 150 }\n'
        "abort = { status = 503, percentage = -0.5 }\n",
        [
            f"r.toml:7: {H}.fault.delay.percentage: percentage 150 is out of range 0..100",
            f"r.toml:8: {H}.fault.abort.percentage: percentage -0.5 is out of range 0..100",
        ],
    ),
    (
        "fault-delay-not-a-duration",
        ROUTE + TO_X + 'fault.delay.fixed = "5 s"\n',
        [f'r.toml:6: {H}.fault.delay.fixed: "5 s" {DURATION_USAGE}'],
    ),
    # ---------------------------------------------------------------- mirror
    (
        "mirror-percentage-nan",
        ROUTE + TO_X + "mirror = { percentage = nan }\n",
        [f"r.toml:6: {H}.mirror.percentage: percentage nan is out of range 0..100"],
    ),
    (
        "mirror-bad-host-and-missing-subset",
        ROUTE + TO_X + 'mirror = { host = "Shadow", subset = "v9" }\n',
        [
            f'r.toml:6: {H}.mirror.host: host "Shadow" must be lower case ("shadow")',
            f'r.toml:6: {H}.mirror.subset: subset "v9" is not defined by any destination rule '
            'for host "Shadow"',
        ],
    ),
    (
        "mirror-subset-defaults-to-rule-host",
        ROUTE + TO_X + 'mirror = { subset = "v2" }\n',
        [
            f'r.toml:6: {H}.mirror.subset: subset "v2" is not defined by any destination rule '
            'for host "svcb"'
        ],
    ),
    # ---------------------------------------------------------------- actions
    (
        "redirect-status",
        ROUTE + 'redirect = { path = "/new", status = 300 }\n',
        [
            f"r.toml:5: {H}.redirect.status: redirect status 300 must be one of 301, 302, 303, 307, 308"
        ],
    ),
    (
        "redirect-to-itself-and-bad-path",
        ROUTE + 'redirect = {}\n[[route.http]]\nredirect = { path = "new" }\n',
        [
            f"r.toml:5: {H}.redirect: set path, authority or both (a redirect to the same URL loops)",
            'r.toml:7: route[0].http[1].redirect.path: redirect path "new" must start with "/"',
        ],
    ),
    (
        "redirect-bad-authority",
        ROUTE + 'redirect = { authority = "https://example.com/x" }\n'
        '[[route.http]]\nredirect = { authority = "example.com:99999" }\n',
        [
            f'r.toml:5: {H}.redirect.authority: authority "https://example.com/x" must be a '
            'lower-case "host" or "host:port"',
            'r.toml:7: route[0].http[1].redirect.authority: authority "example.com:99999" '
            "has port 99999 out of range 1..65535",
        ],
    ),
    (
        "redirect-with-destinations",
        ROUTE + TO_X + 'redirect = { path = "/new" }\n',
        [
            f"r.toml:6: {H}.redirect: set only one of destinations, redirect, direct_response "
            "(got destinations and redirect)"
        ],
    ),
    (
        "redirect-and-direct-response",
        ROUTE + 'redirect = { path = "/new" }\ndirect_response = { status = 200 }\n',
        [
            f"r.toml:6: {H}.direct_response: set only one of destinations, redirect, "
            "direct_response (got redirect and direct_response)"
        ],
    ),
    (
        "all-three-actions",
        ROUTE + TO_X + 'redirect = { path = "/new" }\ndirect_response = { status = 200 }\n',
        [
            f"r.toml:6: {H}.redirect: set only one of destinations, redirect, direct_response "
            "(got destinations, redirect and direct_response)"
        ],
    ),
    (
        "no-action",
        ROUTE + 'timeout = "1s"\n',
        [f"r.toml:4: {H}.destinations: at least one destination is required"],
    ),
    (
        "direct-response-status-and-body",
        ROUTE + "direct_response = { status = 600 }\n"
        f'[[route.http]]\ndirect_response = {{ status = 200, body = "{"x" * 65537}" }}\n',
        [
            f"r.toml:5: {H}.direct_response.status: status 600 is out of range 100..599",
            "r.toml:7: route[0].http[1].direct_response.body: "
            "body is 65537 bytes long, at most 65536 allowed",
        ],
    ),
    (
        "policies-with-local-answer",
        ROUTE + "direct_response = { status = 503 }\n"
        'timeout = "1s"\nretries = {}\nfault.abort.status = 500\nmirror = {}\n'
        'rewrite.authority = "x"\n',
        [
            f"r.toml:6: {H}.timeout: timeout is meaningless with direct_response: "
            "the sidecar answers itself and forwards nothing",
            f"r.toml:7: {H}.retries: retries is meaningless with direct_response: "
            "the sidecar answers itself and forwards nothing",
            f"r.toml:8: {H}.fault: fault is meaningless with direct_response: "
            "the sidecar answers itself and forwards nothing",
            f"r.toml:9: {H}.mirror: mirror is meaningless with direct_response: "
            "the sidecar answers itself and forwards nothing",
            f"r.toml:10: {H}.rewrite: rewrite is meaningless with direct_response: "
            "the sidecar answers itself and forwards nothing",
        ],
    ),
    # ---------------------------------------------------------------- rewrite
    (
        "rewrite-prefix-without-slash",
        ROUTE + TO_X + 'rewrite = { path_prefix = "v2" }\n',
        [f'r.toml:6: {H}.rewrite.path_prefix: path_prefix "v2" must start with "/"'],
    ),
    (
        "rewrite-empty-and-bad-authority",
        ROUTE + TO_X + "rewrite = {}\n[[route.http]]\n" + TO_X + 'rewrite.authority = "Svc B"\n',
        [
            f"r.toml:6: {H}.rewrite: set path_prefix, authority or both",
            'r.toml:9: route[0].http[1].rewrite.authority: authority "Svc B" must be a '
            'lower-case "host" or "host:port"',
        ],
    ),
    (
        "rewrite-with-several-prefixes",
        ROUTE
        + 'match = [{ path.prefix = "/a" }, { path.prefix = "/b" }]\n'
        + TO_X
        + 'rewrite.path_prefix = "/c"\n',
        [
            f"r.toml:7: {H}.rewrite.path_prefix: path_prefix replaces the matched path prefix, "
            'but the match blocks have several ("/a", "/b"); write one route per prefix'
        ],
    ),
    # ---------------------------------------------------------------- header operations
    (
        "headers-hop-by-hop-and-pseudo",
        ROUTE + TO_X + "[route.http.headers.request]\n"
        'set = { connection = "close", proxy-authorization = "x" }\n'
        'remove = ["host", "te"]\n'
        "[route.http.headers.response]\n"
        'add = { ":status" = "200", X-Up = "1" }\n',
        [
            f'r.toml:7: {H}.headers.request.set.connection: header "connection" is hop-by-hop '
            "or framing, owned by the proxy; it cannot be changed",
            f'r.toml:7: {H}.headers.request.set.proxy-authorization: header "proxy-authorization" '
            "is hop-by-hop or framing, owned by the proxy; it cannot be changed",
            f'r.toml:8: {H}.headers.request.remove[0]: header "host" cannot be changed here; '
            "use rewrite.authority",
            f'r.toml:8: {H}.headers.request.remove[1]: header "te" is hop-by-hop or framing, '
            "owned by the proxy; it cannot be changed",
            f'r.toml:10: {H}.headers.response.add[":status"]: header ":status" is a '
            "pseudo-header and cannot be changed",
            f'r.toml:10: {H}.headers.response.add.X-Up: header name "X-Up" must be lower case '
            '("x-up")',
        ],
    ),
    (
        "headers-injection-and-conflict",
        ROUTE + TO_X + "[route.http.headers.response]\n"
        'set = { x-a = "1\\r\\nset-cookie: evil" }\n'
        'remove = ["x-a", "bad header"]\n',
        [
            f'r.toml:7: {H}.headers.response.set.x-a: value of header "x-a" must not contain '
            "CR, LF or NUL",
            f'r.toml:8: {H}.headers.response.remove[0]: header "x-a" is both removed and set '
            "or added",
            f'r.toml:8: {H}.headers.response.remove[1]: header name "bad header" is not a valid '
            "HTTP token",
        ],
    ),
    # ---------------------------------------------------------------- load balancing
    (
        "consistent-hash-without-ring-hash",
        DEST + 'consistent_hash = { header = "x-user" }\n',
        [
            "r.toml:4: destination[0].consistent_hash: consistent_hash needs load_balancer "
            '"ring_hash" or "maglev" (got "round_robin")'
        ],
    ),
    (
        "ring-hash-without-consistent-hash",
        DEST + 'load_balancer = "maglev"\n',
        [
            'r.toml:4: destination[0].load_balancer: load_balancer "maglev" needs a '
            "consistent_hash table naming the hash key"
        ],
    ),
    (
        "consistent-hash-two-keys-and-ring-size",
        DEST + 'load_balancer = "ring_hash"\n'
        'consistent_hash = { header = "X-User", cookie = "sid", ring_size = 8388609 }\n',
        [
            "r.toml:5: destination[0].consistent_hash: set exactly one of header, cookie, "
            "query_param, source_ip = true (got header and cookie)",
            'r.toml:5: destination[0].consistent_hash.header: header name "X-User" must be '
            'lower case ("x-user")',
            "r.toml:5: destination[0].consistent_hash.ring_size: ring_size 8388609 is out of "
            "range 1..8388608",
        ],
    ),
    (
        "consistent-hash-source-ip-false",
        DEST + 'load_balancer = "ring_hash"\nconsistent_hash = { source_ip = false }\n',
        [
            "r.toml:5: destination[0].consistent_hash: set exactly one of header, cookie, "
            "query_param, source_ip = true (got none)",
            "r.toml:5: destination[0].consistent_hash.source_ip: source_ip must be true when set",
        ],
    ),
    (
        "locality-empty-label",
        DEST + 'locality = { zone_label = "" }\n',
        ["r.toml:4: destination[0].locality.zone_label: zone_label must not be empty"],
    ),
    (
        "slow-start-not-a-duration",
        DEST + 'slow_start = "-5s"\n',
        [f'r.toml:4: destination[0].slow_start: "-5s" {DURATION_USAGE}'],
    ),
    # ---------------------------------------------------------------- circuit breaking
    (
        "connection-pool-limits",
        DEST + "[destination.connection_pool]\n"
        'max_connections = 0\nmax_requests = 1000001\nmax_retries = -1\nconnect_timeout = "0s"\n'
        'idle_timeout = "1d"\n',
        [
            "r.toml:5: destination[0].connection_pool.max_connections: max_connections 0 is out "
            "of range 1..1000000",
            "r.toml:6: destination[0].connection_pool.max_requests: max_requests 1000001 is out "
            "of range 1..1000000",
            "r.toml:7: destination[0].connection_pool.max_retries: max_retries -1 is out of "
            "range 0..1000000",
            "r.toml:8: destination[0].connection_pool.connect_timeout: connect_timeout must be "
            'greater than 0 (got "0s")',
            f'r.toml:9: destination[0].connection_pool.idle_timeout: "1d" {DURATION_USAGE}',
        ],
    ),
    # ---------------------------------------------------------------- outlier detection
    (
        "outlier-detection-all-off",
        DEST
        + "outlier_detection = { consecutive_5xx = 0, consecutive_local_origin_failures = 0 }\n",
        [
            "r.toml:4: destination[0].outlier_detection: set at least one of consecutive_5xx, "
            "consecutive_gateway_errors, consecutive_local_origin_failures above 0 "
            "(all 0 never ejects anything; remove the table instead)"
        ],
    ),
    (
        "outlier-detection-values",
        DEST + "[destination.outlier_detection]\n"
        'consecutive_gateway_errors = -1\ninterval = "0s"\nbase_ejection_time = "0ms"\n'
        "max_ejection_percent = 101\nmin_health_percent = -1\n",
        [
            "r.toml:5: destination[0].outlier_detection.consecutive_gateway_errors: "
            "consecutive_gateway_errors -1 is out of range 0..1000000",
            "r.toml:6: destination[0].outlier_detection.interval: interval must be greater "
            'than 0 (got "0s")',
            "r.toml:7: destination[0].outlier_detection.base_ejection_time: base_ejection_time "
            'must be greater than 0 (got "0ms")',
            "r.toml:8: destination[0].outlier_detection.max_ejection_percent: "
            "max_ejection_percent 101 is out of range 0..100",
            "r.toml:9: destination[0].outlier_detection.min_health_percent: "
            "min_health_percent -1 is out of range 0..100",
        ],
    ),
    # ---------------------------------------------------------------- health checks
    (
        "health-check-neither",
        DEST + 'health_check = { interval = "5s" }\n',
        [
            "r.toml:4: destination[0].health_check: set exactly one of path, tcp = true (got neither)"
        ],
    ),
    (
        "health-check-both-and-relative-path",
        DEST + 'health_check = { path = "healthz", tcp = true }\n',
        [
            "r.toml:4: destination[0].health_check: set exactly one of path, tcp = true (got both)",
            'r.toml:4: destination[0].health_check.path: health check path "healthz" must '
            'start with "/"',
        ],
    ),
    (
        "health-check-times-and-thresholds",
        DEST + "[destination.health_check]\ntcp = true\n"
        'interval = "0s"\ntimeout = "0s"\njitter = "x"\nhealthy_threshold = 0\n',
        [
            "r.toml:6: destination[0].health_check.interval: interval must be greater than 0 "
            '(got "0s")',
            "r.toml:7: destination[0].health_check.timeout: timeout must be greater than 0 "
            '(got "0s")',
            f'r.toml:8: destination[0].health_check.jitter: "x" {DURATION_USAGE}',
            "r.toml:9: destination[0].health_check.healthy_threshold: healthy_threshold 0 is "
            "out of range 1..1000000",
        ],
    ),
    # ---------------------------------------------------------------- retry budget
    (
        "retry-budget",
        DEST + "retry_budget = { percent = 120.5, min_concurrency = -1 }\n",
        [
            "r.toml:4: destination[0].retry_budget.percent: percent 120.5 is out of range 0..100",
            "r.toml:4: destination[0].retry_budget.min_concurrency: min_concurrency -1 is out "
            "of range 0..1000000",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_traffic_file_is_rejected_with_exact_errors(text: str, expected: list[str]) -> None:
    if not expected:
        validate_push(text, "r.toml", RulesFile())
        return
    assert errors_of(text) == expected


def test_table_covers_enough_checks() -> None:
    assert sum(1 for _, _, expected in BAD_FILES if expected) >= 30


# --------------------------------------------------------------------------- the complete file

COMPLETE = """\
[[route]]
name = "svcb-routes"
host = "svcb"

[[route.http]]
name = "moved"
match = [{ path = { prefix = "/old/" } }]
redirect = { path = "/new/", authority = "svcb.example:8080", status = 308 }

[[route.http]]
name = "maintenance"
match = [{ headers = { x-maintenance = { present = true } } }]
direct_response = { status = 503, body = "back soon" }
headers.response.set = { retry-after = "120" }

[[route.http]]
name = "test-traffic"
destinations = [{ subset = "v2" }]
timeout = "2s"
fault = { delay = { fixed = "500ms", percentage = 50 }, abort = { status = 503, percentage = 1.5 } }
mirror = { host = "svcb-shadow", subset = "v1", percentage = 10 }
rewrite = { path_prefix = "/v2/", authority = "svcb.internal" }

[[route.http.match]]
path = { prefix = "/api/" }
method = { exact = "GET" }
authority = { suffix = ".internal" }
headers = { x-test = { exact = "1" }, x-canary = { absent = true } }
query_params = { debug = { present = true }, lang = { regex = "en|de", invert = true } }
port = 8080
source = "svca"
source_labels = { version = "v1" }

[route.http.retries]
attempts = 3
per_try_timeout = "500ms"
retry_on = "5xx,reset,connect-failure,retriable-status-codes"
retriable_status_codes = [409, 429]
backoff = "50ms"
retry_non_idempotent = true

[route.http.headers.request]
set = { x-env = "test" }
add = { x-trace-tag = "faulty" }
remove = ["x-internal"]

[route.http.headers.response]
remove = ["server"]

[[route.http]]
name = "default"
match = [{ path = { suffix = ".png" } }, {}]
destinations = [
  { subset = "v1", weight = 90 },
  { subset = "v2", weight = 10 },
]
timeout = "15s"
retries = { attempts = 0 }

[[destination]]
name = "svcb"
host = "svcb"
load_balancer = "ring_hash"
consistent_hash = { header = "x-user", ring_size = 4096 }
locality = { region_label = "region", zone_label = "zone" }
slow_start = "30s"
subsets = [
  { name = "v1", labels = { version = "v1" } },
  { name = "v2", labels = { version = "v2" } },
]
retry_budget = { percent = 25, min_concurrency = 5 }

[destination.connection_pool]
max_connections = 100
max_pending_requests = 10
max_requests = 200
max_retries = 0
connect_timeout = "250ms"
idle_timeout = "5m"
max_connection_duration = "1h"

[destination.outlier_detection]
consecutive_5xx = 3
consecutive_gateway_errors = 2
consecutive_local_origin_failures = 0
interval = "5s"
base_ejection_time = "1m"
max_ejection_percent = 50
min_health_percent = 0

[destination.health_check]
path = "/healthz"
interval = "2s"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 2
jitter = "100ms"

[[destination]]
name = "svcb-shadow"
host = "svcb-shadow"
load_balancer = "maglev"
consistent_hash = { source_ip = true }
health_check = { tcp = true }
subsets = [{ name = "v1", labels = { version = "v1" } }]

[[destination]]
name = "svcc"
host = "svcc"
load_balancer = "least_request"
consistent_hash.cookie = "sid"
"""


def test_complete_file_with_every_new_field_is_valid() -> None:
    with pytest.raises(RuleValidationError) as caught:  # cookie hashing needs ring_hash/maglev
        validate_push(COMPLETE, "c.toml", RulesFile())
    assert [str(e) for e in caught.value.errors] == [
        "c.toml:111: destination[2].consistent_hash: consistent_hash needs load_balancer "
        '"ring_hash" or "maglev" (got "least_request")'
    ]
    text = COMPLETE.replace('"least_request"', '"ring_hash"')
    pushed, merged = validate_push(text, "c.toml", RulesFile())
    assert check_references(merged, text=text, file="c.toml") == []
    assert warnings(pushed, text, "c.toml") == []
    route = pushed.route[0]
    assert route.http[0].redirect is not None and route.http[0].redirect.status == 308
    block = route.http[2].match[0]
    assert block.query_params["lang"].invert and block.headers["x-canary"].absent
    assert (block.port, block.source, block.source_labels) == (8080, "svca", {"version": "v1"})
    retries = route.http[2].retries
    assert retries is not None and retries.retriable_status_codes == [409, 429]
    assert units.duration(retries.per_try_timeout or "") == 0.5
    dest = pushed.destination[0]
    assert dest.connection_pool is not None and dest.connection_pool.max_retries == 0
    assert dest.outlier_detection is not None and dest.outlier_detection.min_health_percent == 0
    assert pushed.destination[1].consistent_hash is not None
    assert pushed.destination[1].consistent_hash.source_ip is True


def test_defaults_are_valid() -> None:
    """Every policy table written empty (all defaults) passes, except where a choice is needed."""
    text = (
        ROUTE
        + TO_X
        + "retries = {}\nmirror = {}\n"
        + DEST.replace('name = "d"', 'name = "d"\nconnection_pool = {}\noutlier_detection = {}')
        + "locality = {}\nretry_budget = {}\n"
    )
    parse_rules(text)


def test_mirror_subset_of_a_stored_destination_rule() -> None:
    stored = parse_rules(
        DEST + '[[destination.subsets]]\nname = "v2"\nlabels = { version = "v2" }\n'
    )
    pushed, merged = validate_push(ROUTE + TO_X + 'mirror = { subset = "v2" }\n', "r.toml", stored)
    assert merged.destination == stored.destination
    assert pushed.route[0].http[0].mirror is not None


def test_deleting_a_mirrored_subset_names_the_stored_route() -> None:
    route = parse_rules(ROUTE + TO_X + 'mirror = { subset = "v2" }\n')
    errors = check_references(route, existing_sources={("route", "r"): "routes.toml"})
    assert [str(e) for e in errors] == [
        'routes.toml: route["r"].http[0].mirror.subset: '
        'subset "v2" is not defined by any destination rule for host "svcb"'
    ]


# --------------------------------------------------------------------------- warnings


def warning_strings(text: str) -> list[str]:
    return [str(w) for w in warnings(parse_rules(text, "w.toml"), text, "w.toml")]


def test_route_after_a_route_without_match_is_unreachable() -> None:
    text = (
        ROUTE
        + 'match = [{ path.prefix = "/a" }]\n'
        + TO_X  # http[0], lines 4-6
        + "[[route.http]]\n"
        + TO_X  # http[1], catch-all, line 7
        + "[[route.http]]\n"
        + 'match = [{ path.prefix = "/b" }]\n'
        + TO_X  # http[2], line 9
        + "[[route.http]]\n"
        + TO_X  # http[3], line 12
    )
    assert warning_strings(text) == [
        "w.toml:9: route[0].http[2]: unreachable: route[0].http[1] matches every request",
        "w.toml:12: route[0].http[3]: unreachable: route[0].http[1] matches every request",
    ]


def test_route_after_an_empty_match_block_is_unreachable() -> None:
    text = ROUTE + 'match = [{ headers.x-a.exact = "1" }, {}]\n' + TO_X + "[[route.http]]\n" + TO_X
    assert warning_strings(text) == [
        "w.toml:7: route[0].http[1]: unreachable: route[0].http[0] matches every request",
    ]


def test_identical_match_blocks_later_one_is_unreachable() -> None:
    text = (
        ROUTE
        + 'match = [{ headers = { x-a = { exact = "1" }, x-b = { prefix = "2" } } }]\n'
        + TO_X
        + "[[route.http]]\n"
        + 'match = [\n  { path.prefix = "/c" },\n'
        + '  { headers = { x-b = { prefix = "2" }, x-a = { exact = "1" } } },\n'
        + '  { path.prefix = "/c" },\n]\n'
        + TO_X
    )
    assert warning_strings(text) == [
        "w.toml:10: route[0].http[1].match[1]: "
        "unreachable: route[0].http[0].match[0] matches the same requests",
        "w.toml:11: route[0].http[1].match[2]: "
        "unreachable: route[0].http[1].match[0] matches the same requests",
    ]


def test_no_warnings_for_ordered_routes_and_other_rules() -> None:
    text = (
        ROUTE
        + 'match = [{ path.prefix = "/a" }]\n'
        + TO_X
        + "[[route.http]]\n"
        + TO_X  # the catch-all, last: fine
        + '[[route]]\nname = "s"\nhost = "svcc"\n'
        + '[[route.http]]\nmatch = [{ path.prefix = "/a" }]\n'
        + TO_X  # same block, other rule
    )
    assert warning_strings(text) == []


def test_warnings_are_config_errors_with_positions() -> None:
    text = ROUTE + TO_X + "[[route.http]]\n" + TO_X
    (warning,) = warnings(parse_rules(text), text, "w.toml")
    assert isinstance(warning, ConfigError)
    assert (warning.file, warning.line, warning.field) == ("w.toml", 6, "route[0].http[1]")
    assert warning.reason == "unreachable: route[0].http[0] matches every request"


# --------------------------------------------------------------------------- durations


@given(st.integers(0, 10**9), st.sampled_from(["ms", "s", "m", "h"]))
def test_integer_durations_parse_to_seconds(n: int, unit: str) -> None:
    seconds = n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if seconds > units.MAX_DURATION:
        with pytest.raises(ValueError, match="longer than 30 days"):
            units.duration(f"{n}{unit}")
    else:
        assert math.isclose(units.duration(f"{n}{unit}"), seconds, rel_tol=1e-12)


@given(st.integers(1, 10**6), st.integers(0, 999), st.sampled_from(["ms", "s"]))
def test_fractional_durations_in_a_rules_file(whole: int, frac: int, unit: str) -> None:
    text = f"{whole}.{frac:03d}{unit}"
    expected = (whole + frac / 1000) * (0.001 if unit == "ms" else 1.0)
    rules = parse_rules(ROUTE + TO_X + f'timeout = "{text}"\n')
    assert rules.route[0].http[0].timeout == text
    assert math.isclose(units.duration(text), expected, rel_tol=1e-12)


def toml_string(value: str) -> str:
    """A TOML basic string holding ``value`` exactly (control characters escaped)."""
    out = []
    for c in value:
        if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(max_size=12),
        st.text(alphabet="0123456789.msh -+e_", max_size=10),
        st.from_regex(r"\A[0-9]{1,25}(\.[0-9]{0,3})?(ms|s|m|h|d|us)?\Z"),
    )
)
def test_garbage_durations_are_config_errors(value: str) -> None:
    text = ROUTE + TO_X + f"timeout = {toml_string(value)}\n"
    try:
        seconds = units.duration(value)
    except ValueError as exc:
        expected = str(exc)
    else:
        expected = None if seconds > 0 else f'timeout must be greater than 0 (got "{value}")'
    try:
        parse_rules(text, "g.toml")
    except RuleValidationError as exc:
        assert [(e.file, e.line, e.field) for e in exc.errors] == [
            ("g.toml", 6, "route[0].http[0].timeout")
        ]
        assert exc.errors[0].reason == expected
    else:
        assert expected is None
