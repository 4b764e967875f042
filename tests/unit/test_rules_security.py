"""Rules: the security kinds (``[[authorization]]``, ``[[ratelimit]]``): schema, semantic checks,
route references, merge/diff/remove, TOML round trip and compilation into the snapshot."""

from __future__ import annotations

import tomllib

import msgspec
import pytest

from meshd.errors import RuleValidationError
from meshd.rules import validate as rv
from meshd.rules.schema import (
    KINDS,
    RULE_TYPES,
    AuthorizationRule,
    RateLimitRule,
    RulesFile,
    kind_of,
)
from meshd.rules.validate import parse_rules, validate_push
from meshd.server.rulediff import rule_toml
from meshd.snapshot import model as sm
from meshd.snapshot import security
from meshd.snapshot.compile import NodeInfo, compile_mesh, for_node
from registry.model import Instance


def errors_of(text: str, existing: RulesFile | None = None) -> list[str]:
    with pytest.raises(RuleValidationError) as caught:
        validate_push(text, "s.toml", existing or RulesFile())
    return [str(e) for e in caught.value.errors]


# Authorization fields start on line 5 ([[authorization.rules]]), rule fields on line 6.
AZ = '[[authorization]]\nname = "a"\nhost = "svcb"\naction = "ALLOW"\n'
R0 = "authorization[0].rules[0]"


def az_rule(body: str, action: str = "ALLOW") -> str:
    """An authorization policy whose one rule (line 5) holds ``body`` (line 6 on)."""
    return AZ.replace('"ALLOW"', f'"{action}"') + "[[authorization.rules]]\n" + body


# Rate limit fields: name 2, host 3, requests_per_unit 4, unit 5, the rest from line 6.
RL = '[[ratelimit]]\nname = "rl"\nhost = "svcb"\nrequests_per_unit = 10\nunit = "second"\n'
ROUTES = (
    '[[route]]\nname = "svcb"\nhost = "svcb"\n'
    '[[route.http]]\nname = "api"\ndestinations = [{ host = "svcb" }]\n'
    '[[route.http]]\ndestinations = [{ host = "svcb" }]\n'
)
SPIFFE_USAGE = (
    'must be a SPIFFE ID ("spiffe://<trust-domain>/ns/<namespace>/sa/<service>"), "*", '
    'a prefix ending in "*" or a suffix starting with "*"'
)

BAD_FILES: list[tuple[str, str, list[str]]] = [
    # ---------------------------------------------------------------- authorization: schema
    (
        "action-not-in-enum",
        AZ.replace('"ALLOW"', '"PERMIT"'),
        ['s.toml:4: authorization[0].action: invalid value "PERMIT", expected one of: '
         "ALLOW, DENY, AUDIT"],
    ),
    (
        "action-missing",
        '[[authorization]]\nname = "a"\nhost = "svcb"\n',
        ['s.toml:1: authorization[0].action: missing required field "action"'],
    ),
    (
        "unknown-field-in-from",
        az_rule('from = { principal = ["*"] }\n'),
        [f's.toml:6: {R0}.from.principal: unknown field "principal", expected one of: '
         "principals, not_principals, ip_blocks, not_ip_blocks"],
    ),
    (
        "unknown-field-in-from-subtable",
        az_rule('[authorization.rules.from]\nnamespaces = ["prod"]\n'),
        [f's.toml:7: {R0}.from.namespaces: unknown field "namespaces", expected one of: '
         "principals, not_principals, ip_blocks, not_ip_blocks"],
    ),
    # ---------------------------------------------------------------- authorization: policy
    (
        "bad-name-and-host",
        '[[authorization]]\nname = "Allow_All"\nhost = "svc b"\naction = "ALLOW"\n',
        [
            's.toml:2: authorization[0].name: name "Allow_All" must be lower-case letters, '
            'digits, "-" or ".", starting and ending with a letter or digit',
            's.toml:3: authorization[0].host: host "svc b" is not a valid DNS name',
        ],
    ),
    (
        "deny-without-rules",
        AZ.replace('"ALLOW"', '"DENY"') + "rules = []\n",
        ["s.toml:5: authorization[0].rules: a DENY policy without rules never matches; "
         "add at least one rule"],
    ),
    (
        "dry-run-audit",
        AZ.replace('"ALLOW"', '"AUDIT"') + "dry_run = true\n[[authorization.rules]]\n",
        ["s.toml:5: authorization[0].dry_run: dry_run has no effect on an AUDIT policy: "
         "auditing never changes the decision"],
    ),
    (
        "duplicate-policy-name",
        AZ + AZ,
        ['s.toml:6: authorization[1].name: duplicate authorization rule name "a", '
         "already used by authorization[0]"],
    ),
    (
        "empty-from-and-to",
        az_rule("from = {}\nto = {}\n"),
        [
            f"s.toml:6: {R0}.from: from has no conditions; leave it out to match every source",
            f"s.toml:7: {R0}.to: to has no conditions; leave it out to match every operation",
        ],
    ),
    # ---------------------------------------------------------------- authorization: from
    (
        "principal-not-spiffe",
        az_rule('from = { principals = ["svca", "cluster.local/ns/prod/sa/svca"] }\n'),
        [
            f's.toml:6: {R0}.from.principals[0]: principal "svca" {SPIFFE_USAGE}',
            f's.toml:6: {R0}.from.principals[1]: principal "cluster.local/ns/prod/sa/svca" '
            'must be a SPIFFE ID: write "spiffe://cluster.local/ns/prod/sa/svca"',
        ],
    ),
    (
        "principal-wildcard-in-the-middle",
        az_rule('from = { not_principals = ["spiffe://td/ns/*/sa/svca", "**", ""] }\n'),
        [
            f's.toml:6: {R0}.from.not_principals[0]: principal "spiffe://td/ns/*/sa/svca" may '
            'hold one "*", as its first or last character only',
            f's.toml:6: {R0}.from.not_principals[1]: principal "**" may hold one "*", as its '
            "first or last character only",
            f"s.toml:6: {R0}.from.not_principals[2]: principal must not be empty",
        ],
    ),
    (
        "principal-spiffe-without-trust-domain",
        az_rule('from = { principals = ["spiffe:///ns/a", "spiffe://td/ns/a b"] }\n'),
        [
            f's.toml:6: {R0}.from.principals[0]: principal "spiffe:///ns/a" {SPIFFE_USAGE}',
            f's.toml:6: {R0}.from.principals[1]: principal "spiffe://td/ns/a b" must not '
            "contain spaces or control characters",
        ],
    ),
    (
        "ip-blocks",
        az_rule('from = { ip_blocks = ["10.0.0.1/8", "10.0.0.300"], '
                'not_ip_blocks = ["fe80::/10", "::1/129"] }\n'),
        [
            f's.toml:6: {R0}.from.ip_blocks[0]: ip block "10.0.0.1/8" has host bits set; '
            'did you mean "10.0.0.0/8"?',
            f's.toml:6: {R0}.from.ip_blocks[1]: ip block "10.0.0.300" is not an IP address or '
            'CIDR block such as "10.0.0.0/8"',
            f's.toml:6: {R0}.from.not_ip_blocks[1]: ip block "::1/129" is not an IP address or '
            'CIDR block such as "10.0.0.0/8"',
        ],
    ),
    # ---------------------------------------------------------------- authorization: to
    (
        "methods-lower-case-and-not-tokens",
        az_rule('to = { methods = ["get", "GE T"], not_methods = ["delete"] }\n'),
        [
            f's.toml:6: {R0}.to.methods[0]: method "get" must be an upper-case HTTP token '
            'such as "GET"',
            f's.toml:6: {R0}.to.methods[1]: method "GE T" must be an upper-case HTTP token '
            'such as "GET"',
            f's.toml:6: {R0}.to.not_methods[0]: method "delete" must be an upper-case HTTP '
            'token such as "GET"',
        ],
    ),
    (
        "paths",
        az_rule('to = { paths = ["api/*", "/a*b", "/a?x=1", "/a//b"], '
                'not_paths = ["/x/../admin/*"] }\n'),
        [
            f's.toml:6: {R0}.to.paths[0]: path "api/*" must start with "/" or "*"',
            f's.toml:6: {R0}.to.paths[1]: path "/a*b" may hold one "*", as its first or last '
            "character only",
            f's.toml:6: {R0}.to.paths[2]: path "/a?x=1" must not contain a query ("?") or '
            'fragment ("#")',
            f's.toml:6: {R0}.to.paths[3]: path "/a//b" is not normalized: requests are matched '
            'after normalization, so write "/a/b"',
            f's.toml:6: {R0}.to.not_paths[0]: path "/x/../admin/*" is not normalized: requests '
            'are matched after normalization, so write "/admin/*"',
        ],
    ),
    (
        "ports",
        az_rule("to = { ports = [0, 8080, 65536], not_ports = [-1] }\n"),
        [
            f"s.toml:6: {R0}.to.ports[0]: port 0 is out of range 1..65535",
            f"s.toml:6: {R0}.to.ports[2]: port 65536 is out of range 1..65535",
            f"s.toml:6: {R0}.to.not_ports[0]: port -1 is out of range 1..65535",
        ],
    ),
    (
        "headers",
        az_rule('[authorization.rules.to]\nheaders = { X-User = ["a"], x-b = [], '
                'x-c = ["a*b", "v\\n"] }\n'),
        [
            f's.toml:7: {R0}.to.headers.X-User: header name "X-User" must be lower case '
            '("x-user")',
            f's.toml:7: {R0}.to.headers.x-b: header "x-b" needs at least one value '
            '("*": any value)',
            f's.toml:7: {R0}.to.headers.x-c[0]: header value "a*b" may hold one "*", as its '
            "first or last character only",
            f's.toml:7: {R0}.to.headers.x-c[1]: value of header "x-c" must not contain CR, LF '
            "or NUL",
        ],
    ),
    # ---------------------------------------------------------------- ratelimit
    (
        "ratelimit-unit-not-in-enum",
        RL.replace('"second"', '"day"'),
        ['s.toml:5: ratelimit[0].unit: invalid value "day", expected one of: '
         "second, minute, hour"],
    ),
    (
        "ratelimit-unit-missing",
        '[[ratelimit]]\nname = "rl"\nhost = "svcb"\nrequests_per_unit = 10\n',
        ['s.toml:1: ratelimit[0].unit: missing required field "unit"'],
    ),
    (
        "ratelimit-scope-not-in-enum",
        RL + 'scope = "cluster"\n',
        ['s.toml:6: ratelimit[0].scope: invalid value "cluster", expected one of: '
         "local, global"],
    ),
    (
        "ratelimit-rate-and-burst",
        RL.replace("= 10", "= 0") + "burst = 0\n",
        [
            "s.toml:4: ratelimit[0].requests_per_unit: requests_per_unit 0 is out of range "
            "1..1000000000",
            "s.toml:6: ratelimit[0].burst: burst 0 is out of range 1..1000000000",
        ],
    ),
    (
        "ratelimit-burst-with-global",
        RL + 'scope = "global"\nburst = 20\n',
        ["s.toml:7: ratelimit[0].burst: burst has no effect on a global limit: it counts "
         "requests per unit window"],
    ),
    (
        "ratelimit-key-forms",
        RL + 'key = "principal"\n' + RL.replace('"rl"', '"rl2"') + 'key = "header:X-User"\n'
        + RL.replace('"rl"', '"rl3"') + 'key = "header:"\n',
        [
            's.toml:6: ratelimit[0].key: key "principal" must be "", "source_principal" or '
            '"header:<name>"',
            's.toml:12: ratelimit[1].key: key "header:X-User" must name a lower-case header '
            '("header:x-user")',
            's.toml:18: ratelimit[2].key: key "header:" has an invalid header name ""',
        ],
    ),
    (
        "ratelimit-duplicate-name-bad-host",
        RL + RL.replace('"svcb"', '"svcb.example:80"'),
        [
            's.toml:7: ratelimit[1].name: duplicate ratelimit rule name "rl", already used by '
            "ratelimit[0]",
            's.toml:8: ratelimit[1].host: host "svcb.example:80" is not a valid DNS name',
        ],
    ),
    (
        "ratelimit-route-without-route-rule",
        RL + 'route = "api"\n',
        ['s.toml:6: ratelimit[0].route: route "api" needs a route rule for host "svcb" naming '
         "it; there is none"],
    ),
    (
        "ratelimit-route-not-named-in-route-rule",
        ROUTES + RL + 'route = "svcb-1"\n',
        ['s.toml:14: ratelimit[0].route: route rule "svcb" of host "svcb" has no http route '
         'named "svcb-1" (named routes: "api")'],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_rejected_with_exact_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_bad_file_table_is_large_enough() -> None:
    assert len(BAD_FILES) >= 15
    assert len({name for name, _, _ in BAD_FILES}) == len(BAD_FILES)


GOOD = '''
[[authorization]]
name = "default-deny"
host = "*"
action = "ALLOW"

[[authorization]]
name = "svcb-allow"
host = "svcb"
action = "ALLOW"
[[authorization.rules]]
from = { principals = ["spiffe://td/ns/prod/sa/svca", "spiffe://td/ns/ops/*", "*/sa/probe"] }
to = { methods = ["GET", "HEAD"], paths = ["/api/*", "*.json", "/health"], ports = [8080] }
[[authorization.rules]]
from = { ip_blocks = ["10.0.0.0/8", "192.168.1.7", "fd00::/8"], not_principals = ["*"] }
[authorization.rules.to]
headers = { x-canary = ["*"], x-team = ["pay*", "*ops", "core"] }

[[authorization]]
name = "deny-admin"
host = "svcb"
action = "DENY"
dry_run = true
[[authorization.rules]]
to = { paths = ["/admin/*"], not_methods = ["OPTIONS"] }

[[authorization]]
name = "audit-writes"
host = "*"
action = "AUDIT"
[[authorization.rules]]
to = { methods = ["POST", "PUT", "DELETE"] }

[[route]]
name = "svcb"
host = "svcb"
[[route.http]]
name = "api"
destinations = [{ host = "svcb" }]

[[ratelimit]]
name = "svcb-api"
host = "svcb"
route = "api"
requests_per_unit = 600
unit = "minute"
burst = 50
key = "header:x-user"

[[ratelimit]]
name = "svcb-global"
host = "svcb"
requests_per_unit = 1000
unit = "second"
scope = "global"
key = "source_principal"
'''


def test_complete_file_is_valid_and_round_trips_as_toml() -> None:
    pushed, merged = validate_push(GOOD, "good.toml", RulesFile())
    assert pushed == merged
    assert [p.name for p in pushed.authorization] == [
        "default-deny", "svcb-allow", "deny-admin", "audit-writes"]
    assert pushed.authorization[1].rules[1].from_ is not None
    assert pushed.authorization[1].rules[1].from_.ip_blocks[1] == "192.168.1.7"
    for kind in ("authorization", "ratelimit"):
        for rule in getattr(pushed, kind):
            text = "\n".join(rule_toml(kind, rule))
            assert msgspec.convert(tomllib.loads(text), RulesFile) == RulesFile(**{kind: [rule]})
            assert parse_rules(text) == RulesFile(**{kind: [rule]}), text


def test_kinds_are_registered() -> None:
    assert KINDS[-2:] == ("authorization", "ratelimit")
    assert RULE_TYPES["authorization"] is AuthorizationRule
    assert RULE_TYPES["ratelimit"] is RateLimitRule
    rules = parse_rules(GOOD)
    assert {kind_of(r) for r in rules.authorization} == {"authorization"}
    assert {kind_of(r) for r in rules.ratelimit} == {"ratelimit"}


def test_merge_diff_and_remove_are_generic_over_the_new_kinds() -> None:
    base = parse_rules(GOOD)
    change = parse_rules(AZ + '[[authorization.rules]]\nfrom = { principals = ["*"] }\n'
                         + RL.replace('"rl"', '"svcb-global"'))
    merged = rv.merge(base, change)
    assert rv.diff(base, merged) == [
        ("create", "authorization", "a"), ("update", "ratelimit", "svcb-global")]
    removed = rv.remove(merged, "authorization", "deny-admin")
    assert [p.name for p in removed.authorization] == [
        "default-deny", "svcb-allow", "audit-writes", "a"]
    assert rv.diff(merged, removed) == [("delete", "authorization", "deny-admin")]
    with pytest.raises(KeyError):
        rv.remove(merged, "ratelimit", "nope")


def test_route_reference_is_checked_on_the_merged_set() -> None:
    stored = parse_rules(ROUTES)
    _, merged = validate_push(RL + 'route = "api"\n', "rl.toml", stored)
    assert merged.ratelimit[0].route == "api"
    # removing the named route (a later push of the route rule) breaks the stored limit
    renamed = ROUTES.replace('name = "api"', 'name = "v2"')
    with pytest.raises(RuleValidationError) as caught:
        validate_push(renamed, "routes.toml", merged, {("ratelimit", "rl"): "rl.toml"})
    assert [str(e) for e in caught.value.errors] == [
        'rl.toml: ratelimit["rl"].route: route rule "svcb" of host "svcb" has no http route '
        'named "api" (named routes: "v2")']
    # and so does deleting the route rule
    errors = rv.check_references(rv.remove(merged, "route", "svcb"),
                                 existing_sources={("ratelimit", "rl"): "rl.toml"})
    assert [str(e) for e in errors] == [
        'rl.toml: ratelimit["rl"].route: route "api" needs a route rule for host "svcb" naming '
        "it; there is none"]


# --------------------------------------------------------------------------- compilation


def test_compiled_policies_and_limits() -> None:
    rules = parse_rules(GOOD)
    policies = security.authorization(rules)
    allow = policies[1]
    assert allow == sm.AuthzPolicy(
        name="svcb-allow", host="svcb", action="ALLOW", rules=(
            sm.AuthzRule(
                source=sm.AuthzSource(principals=(
                    "spiffe://td/ns/prod/sa/svca", "spiffe://td/ns/ops/*", "*/sa/probe")),
                operation=sm.AuthzOperation(methods=("GET", "HEAD"),
                                            paths=("/api/*", "*.json", "/health"),
                                            ports=(8080,))),
            sm.AuthzRule(
                source=sm.AuthzSource(not_principals=("*",),
                                      ip_blocks=("10.0.0.0/8", "192.168.1.7/32", "fd00::/8")),
                operation=sm.AuthzOperation(headers=(
                    sm.AuthzHeader(name="x-canary", values=("*",)),
                    sm.AuthzHeader(name="x-team", values=("pay*", "*ops", "core"))))),
        ))
    assert policies[0] == sm.AuthzPolicy(name="default-deny", host="*", action="ALLOW")
    assert policies[2].dry_run and policies[2].action == "DENY"
    assert security.ratelimits(rules) == (
        sm.RateLimit(name="svcb-api", host="svcb", rate_per_sec=10.0, burst=50,
                     requests_per_unit=600, window=60.0, route="api", key="header:x-user"),
        sm.RateLimit(name="svcb-global", host="svcb", rate_per_sec=1000.0, burst=1000,
                     requests_per_unit=1000, window=1.0, key="source_principal",
                     scope="global"),
    )


def test_snapshot_carries_the_policies_of_the_node_and_every_limit() -> None:
    rules = parse_rules(GOOD)
    mesh = compile_mesh(rules, [Instance("svcb", "b1", "127.0.0.1", 8080)])
    assert len(mesh.authorization) == 4 and len(mesh.ratelimits) == 2
    svcb = for_node(mesh, NodeInfo(node="b1", service="svcb", inbound_port=15006),
                    sm.Version(1, 1))
    assert [p.name for p in svcb.authorization] == [
        "default-deny", "svcb-allow", "deny-admin", "audit-writes"]
    svca = for_node(mesh, NodeInfo(node="a1", service="svca"), sm.Version(1, 1))
    assert [p.name for p in svca.authorization] == ["default-deny", "audit-writes"]
    assert svca.ratelimits == svcb.ratelimits == mesh.ratelimits
    assert sm.decode(sm.encode(svcb)) == svcb
    assert security.problems(svcb) == []


def test_snapshot_without_security_rules_is_unchanged() -> None:
    mesh = compile_mesh(RulesFile(), [Instance("svcb", "b1", "127.0.0.1", 8080)])
    snap = for_node(mesh, NodeInfo(node="b1", service="svcb"), sm.Version(1, 1))
    assert snap.authorization == () and snap.ratelimits == ()
    assert b"authorization" in sm.encode(snap)  # present (empty) in the wire form


def test_security_consistency_problems() -> None:
    bad = sm.Snapshot(
        version=sm.Version(1, 1), node="n",
        authorization=(
            sm.AuthzPolicy(name="p", host="*", action="PERMIT"),
            sm.AuthzPolicy(name="p", host="*", action="ALLOW", rules=(
                sm.AuthzRule(source=sm.AuthzSource(ip_blocks=("nope",)),
                             operation=sm.AuthzOperation(ports=(0,))),)),
        ),
        ratelimits=(sm.RateLimit(name="r", host="h", rate_per_sec=0.0, burst=1,
                                 requests_per_unit=1, window=1.0, scope="mesh"),),
    )
    assert security.problems(bad) == [
        "duplicate authorization policy p",
        "authorization policy p: action 'PERMIT' is not one of ALLOW, DENY, AUDIT",
        "authorization policy p rule[0]: bad ip block 'nope'",
        "authorization policy p rule[0]: port 0 out of range",
        "rate limit r: rate, burst, requests_per_unit and window must be positive",
        "rate limit r: scope 'mesh' is not one of local, global",
    ]
