"""Authorization (sidecar.core.authz): the allow/deny/audit matrix, DENY before ALLOW, default
deny, dry-run, wildcard principals, IP blocks, path normalization, TCP, and Hypothesis checks
against a direct reading of the rules."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshd.snapshot.model import (
    AuthzHeader,
    AuthzOperation,
    AuthzPolicy,
    AuthzRule,
    AuthzSource,
)
from sidecar.core.authz import (
    Authorizer,
    AuthzRequest,
    Decision,
    applicable,
    decide,
    normalize_path,
    parse_ip,
)

PROD = "spiffe://td/ns/prod/sa/svca"
DEV = "spiffe://td/ns/dev/sa/svca"
ADMIN = "spiffe://td/ns/ops/sa/admin"
LB_IP, BLOCKED_IP, OUTSIDE_IP = "10.1.2.3", "203.0.113.9", "198.51.100.1"


def policy(name: str, action: str, *rules: AuthzRule, host: str = "svcb",
           dry_run: bool = False) -> AuthzPolicy:
    return AuthzPolicy(name=name, host=host, action=action, dry_run=dry_run, rules=rules)


def rule(source: AuthzSource | None = None, operation: AuthzOperation | None = None) -> AuthzRule:
    return AuthzRule(source=source, operation=operation)


def req(principal: str | None = PROD, ip: str = LB_IP, method: str = "GET",
        path: str = "/api/users", port: int = 8080, headers: dict[str, str] | None = None,
        tcp: bool = False) -> AuthzRequest:
    return AuthzRequest(principal, ip, method, path, port, headers or {}, tcp)


MATRIX_POLICIES = (
    policy("audit-writes", "AUDIT",
           rule(operation=AuthzOperation(methods=("POST", "PUT", "DELETE"))), host="*"),
    policy("allow-prod", "ALLOW",
           rule(AuthzSource(principals=("spiffe://td/ns/prod/*",)),
                AuthzOperation(methods=("GET", "POST"), paths=("/api/*", "*.json")))),
    policy("allow-lb", "ALLOW",
           rule(AuthzSource(ip_blocks=("10.0.0.0/8",)),
                AuthzOperation(methods=("GET",), paths=("/health",)))),
    policy("allow-ops", "ALLOW", rule(AuthzSource(principals=("*/sa/admin",)))),
    policy("deny-blocked-ip", "DENY", rule(AuthzSource(ip_blocks=("203.0.113.0/24",)))),
    policy("deny-admin", "DENY",
           rule(AuthzSource(not_principals=(ADMIN,)), AuthzOperation(paths=("/admin/*",)))),
)

ALLOW_PROD = Decision(True, "allow-prod", 'allowed by ALLOW policy "allow-prod"')
ALLOW_LB = Decision(True, "allow-lb", 'allowed by ALLOW policy "allow-lb"')
ALLOW_OPS = Decision(True, "allow-ops", 'allowed by ALLOW policy "allow-ops"')
NO_ALLOW = Decision(False, None, "denied: no ALLOW policy matched")
DENY_IP = Decision(False, "deny-blocked-ip", 'denied by DENY policy "deny-blocked-ip"')
DENY_ADMIN = Decision(False, "deny-admin", 'denied by DENY policy "deny-admin"')
AUDITED = ("audit-writes",)


def audited(d: Decision) -> Decision:
    return Decision(d.allowed, d.policy, d.reason, AUDITED, d.dry_run_denials)


MATRIX: list[tuple[str, AuthzRequest, Decision]] = [
    ("prod-get-api", req(), ALLOW_PROD),
    ("prod-get-json-suffix", req(path="/reports/q1.json"), ALLOW_PROD),
    ("prod-post-api-audited", req(method="POST"), audited(ALLOW_PROD)),
    ("prod-delete-not-allowed-audited", req(method="DELETE"), audited(NO_ALLOW)),
    ("dev-principal-not-allowed", req(DEV), NO_ALLOW),
    ("plaintext-lb-health", req(None, path="/health"), ALLOW_LB),
    ("plaintext-outside-health", req(None, OUTSIDE_IP, path="/health"), NO_ALLOW),
    ("plaintext-lb-api", req(None), NO_ALLOW),
    ("empty-principal-is-plaintext", req("", path="/health"), ALLOW_LB),
    ("blocked-ip-prod", req(ip=BLOCKED_IP), DENY_IP),
    ("blocked-ip-admin-deny-first", req(ADMIN, BLOCKED_IP), DENY_IP),
    ("blocked-ip-ipv4-mapped", req(ip="::ffff:203.0.113.9"), DENY_IP),
    ("blocked-ip-bracketed-v4-mapped", req(ip="[::ffff:203.0.113.9]"), DENY_IP),
    ("prod-admin-path", req(path="/admin/users"), DENY_ADMIN),
    ("prod-admin-path-post-audited", req(method="POST", path="/admin/x"), audited(DENY_ADMIN)),
    ("admin-admin-path-not-principal", req(ADMIN, path="/admin/users"), ALLOW_OPS),
    ("plaintext-admin-path", req(None, path="/admin/x"), DENY_ADMIN),
    ("dot-segments-normalized", req(path="/api/../admin/x"), DENY_ADMIN),
    ("escaped-letter-normalized", req(path="/%61dmin/x"), DENY_ADMIN),
    ("double-slash-normalized", req(path="//admin//x"), DENY_ADMIN),
    ("escaped-slash-normalized", req(path="/admin%2Fx"), DENY_ADMIN),
    ("backslash-normalized", req(path="\\admin\\x"), DENY_ADMIN),
    ("query-ignored", req(path="/api/users?role=admin"), ALLOW_PROD),
    ("path-case-sensitive", req(path="/API/users"), NO_ALLOW),
    ("method-case-sensitive", req(method="get"), NO_ALLOW),
    ("unparseable-ip-matches-no-block", req(None, "unix:/tmp/s", path="/health"), NO_ALLOW),
    ("admin-suffix-any-trust-domain", req("spiffe://other/ns/x/sa/admin", OUTSIDE_IP, "PUT",
                                          "/x"), audited(ALLOW_OPS)),
    ("prefix-needs-the-slash", req("spiffe://td/ns/production/sa/x"), NO_ALLOW),
    ("prefix-not-the-namespace-itself", req("spiffe://td/ns/prod"), NO_ALLOW),
    ("suffix-is-not-a-substring", req("spiffe://td/ns/ops/sa/admin2"), NO_ALLOW),
]


@pytest.mark.parametrize(("request_", "expected"), [c[1:] for c in MATRIX],
                         ids=[c[0] for c in MATRIX])
def test_matrix(request_: AuthzRequest, expected: Decision) -> None:
    assert Authorizer(MATRIX_POLICIES).decide(request_) == expected
    assert decide(MATRIX_POLICIES, request_) == expected


def test_matrix_is_large_enough() -> None:
    assert len(MATRIX) >= 24
    outcomes = {(d.allowed, d.policy, bool(d.audited)) for _, _, d in MATRIX}
    assert len(outcomes) >= 7


def test_no_policy_allows() -> None:
    assert Authorizer(()).decide(req(None)) == Decision(True, None,
                                                       "allowed: no ALLOW policy applies")


def test_deny_is_evaluated_before_allow_whatever_the_order() -> None:
    allow_all = policy("allow-all", "ALLOW", rule())
    deny_dev = policy("deny-dev", "DENY", rule(AuthzSource(principals=("spiffe://td/ns/dev/*",))))
    for order in ((allow_all, deny_dev), (deny_dev, allow_all)):
        z = Authorizer(order)
        assert z.decide(req(DEV)) == Decision(False, "deny-dev", 'denied by DENY policy "deny-dev"')
        assert z.decide(req(PROD)) == Decision(True, "allow-all",
                                               'allowed by ALLOW policy "allow-all"')


def test_first_matching_policy_is_named() -> None:
    a = policy("a", "DENY", rule(operation=AuthzOperation(ports=(8080,))))
    b = policy("b", "DENY", rule())
    assert Authorizer((a, b)).decide(req()).policy == "a"
    assert Authorizer((b, a)).decide(req()).policy == "b"


def test_default_deny_switch() -> None:
    default_deny = policy("default-deny", "ALLOW", host="*")
    allow_svcb = policy("svcb-allow", "ALLOW", rule(AuthzSource(principals=(PROD,))))
    every = (default_deny, allow_svcb)
    svcb = Authorizer(every, host="svcb")
    assert svcb.decide(req(PROD)) == Decision(True, "svcb-allow",
                                              'allowed by ALLOW policy "svcb-allow"')
    assert svcb.decide(req(DEV)) == NO_ALLOW
    svcc = Authorizer(every, host="svcc")  # no ALLOW of its own: nothing gets in
    for r in (req(PROD), req(ADMIN), req(None), req(method="OPTIONS", path="/")):
        assert svcc.decide(r) == NO_ALLOW
    assert applicable(every, "SVCC") == (default_deny,)
    assert Authorizer((), host="svcc").decide(req()).allowed


def test_allow_with_no_rules_and_empty_rule() -> None:
    assert Authorizer((policy("nothing", "ALLOW"),)).decide(req()) == NO_ALLOW
    assert Authorizer((policy("all", "ALLOW", rule()),)).decide(req(None)).allowed
    # DENY/AUDIT without rules match nothing
    quiet = (policy("d", "DENY"), policy("a", "AUDIT"))
    assert Authorizer(quiet).decide(req()) == Decision(True, None,
                                                       "allowed: no ALLOW policy applies")


def test_dry_run_reports_but_never_decides() -> None:
    dry_deny = policy("dry-deny", "DENY", rule(AuthzSource(principals=(DEV,))), dry_run=True)
    dry_allow = policy("dry-allow", "ALLOW", rule(AuthzSource(principals=(PROD,))), dry_run=True)
    z = Authorizer((dry_deny, dry_allow))
    assert z.decide(req(DEV)) == Decision(True, None, "allowed: no ALLOW policy applies",
                                          dry_run_denials=("dry-deny", "dry-allow"))
    assert z.decide(req(PROD)) == Decision(True, None, "allowed: no ALLOW policy applies")
    assert z.decide(req(None)) == Decision(True, None, "allowed: no ALLOW policy applies",
                                           dry_run_denials=("dry-allow",))
    # an enforced ALLOW exists: a dry-run ALLOW can only widen it, never deny more
    enforced = policy("allow-dev", "ALLOW", rule(AuthzSource(principals=(DEV,))))
    z = Authorizer((dry_deny, dry_allow, enforced))
    assert z.decide(req(DEV)) == Decision(True, "allow-dev", 'allowed by ALLOW policy "allow-dev"',
                                          dry_run_denials=("dry-deny",))
    assert z.decide(req(None)) == NO_ALLOW


def test_wildcard_principals() -> None:
    any_peer = policy("mtls-only", "ALLOW", rule(AuthzSource(principals=("*",))))
    z = Authorizer((any_peer,))
    assert z.decide(req(PROD)).allowed and z.decide(req("spiffe://x/y")).allowed
    assert z.decide(req(None)) == NO_ALLOW and z.decide(req("")) == NO_ALLOW
    deny_plain = policy("deny-plaintext", "DENY", rule(AuthzSource(not_principals=("*",))))
    z = Authorizer((deny_plain,))
    assert z.decide(req(None)) == Decision(False, "deny-plaintext",
                                           'denied by DENY policy "deny-plaintext"')
    assert z.decide(req(PROD)).allowed
    ns = policy("ns", "ALLOW", rule(AuthzSource(principals=("spiffe://td/ns/prod/*", "*/sa/admin",
                                                            DEV))))
    z = Authorizer((ns,))
    allowed = [p for p in (PROD, DEV, ADMIN, "spiffe://td/ns/prod/sa/x", "spiffe://td/ns/dev/sa/y",
                           "spiffe://td/ns/prodx/sa/a", "spiffe://x/sa/admin")
               if z.decide(req(p)).allowed]
    assert allowed == [PROD, DEV, ADMIN, "spiffe://td/ns/prod/sa/x", "spiffe://x/sa/admin"]


def test_ip_blocks_v4_v6_and_negation() -> None:
    p = policy("net", "ALLOW", rule(AuthzSource(ip_blocks=("10.0.0.0/8", "fd00::/8", "192.0.2.7/32"),
                                                not_ip_blocks=("10.9.0.0/16",))))
    z = Authorizer((p,))
    results = {ip: z.decide(req(ip=ip)).allowed
               for ip in ("10.1.1.1", "10.9.1.1", "fd00::1", "fe80::1", "192.0.2.7", "192.0.2.8",
                          "::ffff:10.1.1.1", "garbage", "")}
    assert results == {"10.1.1.1": True, "10.9.1.1": False, "fd00::1": True, "fe80::1": False,
                       "192.0.2.7": True, "192.0.2.8": False, "::ffff:10.1.1.1": True,
                       "garbage": False, "": False}
    assert parse_ip("::ffff:1.2.3.4") == parse_ip("1.2.3.4")


def test_methods_ports_headers_and_negations() -> None:
    p = policy("op", "ALLOW", rule(operation=AuthzOperation(
        not_methods=("DELETE",), ports=(8080, 9090), not_paths=("/internal/*",),
        headers=(AuthzHeader(name="x-canary", values=("*",)),
                 AuthzHeader(name="x-team", values=("pay*", "*ops", "core"))))))
    z = Authorizer((p,))
    h = {"x-canary": "", "x-team": "payments"}
    assert z.decide(req(headers=h)).allowed
    assert z.decide(req(headers={**h, "x-team": "devops"})).allowed
    assert z.decide(req(headers={**h, "x-team": "core"})).allowed
    assert not z.decide(req(headers={**h, "x-team": "corex"})).allowed
    assert not z.decide(req(headers={"x-team": "core"})).allowed  # x-canary absent
    assert not z.decide(req(method="DELETE", headers=h)).allowed
    assert not z.decide(req(port=80, headers=h)).allowed
    assert z.decide(req(port=9090, headers=h)).allowed
    assert not z.decide(req(path="/internal/x", headers=h)).allowed
    assert not z.decide(req(path="/api/../internal/x", headers=h)).allowed


def test_tcp_http_only_fields() -> None:
    allow_get = policy("allow-get", "ALLOW", rule(operation=AuthzOperation(methods=("GET",))))
    allow_port = policy("allow-port", "ALLOW", rule(operation=AuthzOperation(ports=(5432,))))
    deny_admin = policy("deny-admin", "DENY",
                        rule(operation=AuthzOperation(paths=("/admin/*",), ports=(5432,))))
    tcp = req(method="", path="", port=5432, tcp=True)
    # ALLOW with HTTP-only fields never matches TCP
    assert Authorizer((allow_get,)).decide(tcp) == NO_ALLOW
    assert Authorizer((allow_get, allow_port)).decide(tcp).policy == "allow-port"
    # DENY ignores them: it denies more, never less
    assert Authorizer((deny_admin, allow_port)).decide(tcp).policy == "deny-admin"
    assert Authorizer((deny_admin, allow_port)).decide(
        req(method="", path="", port=5433, tcp=True)) == NO_ALLOW


NORMALIZED = [
    ("/a/b", "/a/b"),
    ("/a//b///c", "/a/b/c"),
    ("/a/./b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/..", "/"),
    ("/../../x", "/x"),
    ("/", "/"),
    ("//", "/"),
    ("/a/", "/a/"),
    ("/%61%62%7E%2e", "/ab~."),
    ("/a%2Fb%2fc%5Cd", "/a/b/c/d"),
    ("/a%2e%2e/b", "/a../b"),
    ("/x/%2e%2e/y", "/y"),
    ("/sp%20ace%3a", "/sp%20ace%3A"),
    ("/bad%zz%4", "/bad%zz%4"),
    ("/a\\..\\b", "/b"),
    ("/p?q=/../x#f", "/p"),
    ("*", "*"),
    ("/.well-known/x", "/.well-known/x"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZED)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected
    assert normalize_path(expected) == expected  # idempotent


# --------------------------------------------------------------------------- Hypothesis

PRINCIPALS = [PROD, DEV, ADMIN, "spiffe://other/ns/prod/sa/svca"]
PRINCIPAL_PATTERNS = ["*", PROD, DEV, "spiffe://td/ns/prod/*", "spiffe://td/*", "*/sa/svca",
                      "*/sa/admin"]
IPS = ["10.1.2.3", "10.200.0.1", "203.0.113.9", "fd00::5", "::ffff:10.1.2.3", "bogus"]
BLOCKS = ["10.0.0.0/8", "10.200.0.0/16", "203.0.113.0/24", "fd00::/8", "10.1.2.3/32"]
METHODS = ["GET", "POST", "DELETE"]
PATHS = ["/", "/api/users", "/api/../admin/x", "/admin/x", "/data.json", "/health", "//api/x"]
PATH_PATTERNS = ["*", "/api/*", "/admin/*", "*.json", "/health", "/"]
PORTS = [80, 8080]
HEADER_VALUES = ["a", "ab", "ba", ""]
HEADER_PATTERNS = ["*", "a*", "*a", "a"]

sub = st.lists  # short alias


def _lists(pool: Sequence[object], empty: int = 1) -> st.SearchStrategy[tuple[object, ...]]:
    """Empty with weight ``empty`` against 1, else one or two values of ``pool``: conditions
    are mostly absent, so that rules match often enough for the decisions to vary."""
    some = sub(st.sampled_from(pool), min_size=1, max_size=2).map(tuple)
    return st.one_of(*([st.just(())] * empty), some)


sources = st.builds(AuthzSource, principals=_lists(PRINCIPAL_PATTERNS),
                    not_principals=_lists(PRINCIPAL_PATTERNS, 3), ip_blocks=_lists(BLOCKS, 2),
                    not_ip_blocks=_lists(BLOCKS, 3))
operations = st.builds(
    AuthzOperation, methods=_lists(METHODS), not_methods=_lists(METHODS, 3),
    paths=_lists(PATH_PATTERNS), not_paths=_lists(PATH_PATTERNS, 3), ports=_lists(PORTS, 2),
    not_ports=_lists(PORTS, 3),
    headers=sub(st.builds(AuthzHeader, name=st.just("x-h"), values=_lists(HEADER_PATTERNS, 0)),
                max_size=1).map(tuple))
rules = st.builds(AuthzRule, source=st.none() | sources, operation=st.none() | operations)


def policies(dry: bool | None = None) -> st.SearchStrategy[AuthzPolicy]:
    actions = ["ALLOW", "DENY"] if dry else ["ALLOW", "DENY", "AUDIT"]
    return st.builds(
        AuthzPolicy, name=st.text("abcdefgh", min_size=1, max_size=3), host=st.just("svcb"),
        action=st.sampled_from(actions),
        dry_run=st.booleans() if dry is None else st.just(dry),
        rules=sub(rules, max_size=2).map(tuple))


requests = st.builds(
    AuthzRequest, principal=st.none() | st.sampled_from(PRINCIPALS), source_ip=st.sampled_from(IPS),
    method=st.sampled_from(METHODS), path=st.sampled_from(PATHS), port=st.sampled_from(PORTS),
    headers=st.dictionaries(st.just("x-h"), st.sampled_from(HEADER_VALUES)),
    tcp=st.booleans())


def _pattern(pat: str, value: str | None) -> bool:
    if value is None:
        return False
    if pat == "*":
        return True
    if pat.endswith("*"):
        return value.startswith(pat[:-1])
    if pat.startswith("*"):
        return value.endswith(pat[1:])
    return value == pat


def _in_block(ip: str, block: str) -> bool:
    import ipaddress

    addr = parse_ip(ip)
    return addr is not None and addr in ipaddress.ip_network(block)


def ref_rule(r: AuthzRule, q: AuthzRequest, deny: bool) -> bool:
    """The rule semantics read straight from the docs, one condition after the other."""
    principal = q.principal or None
    s, o = r.source, r.operation
    conds: list[bool] = []
    if s is not None:
        if s.principals:
            conds.append(any(_pattern(p, principal) for p in s.principals))
        if s.not_principals:
            conds.append(not any(_pattern(p, principal) for p in s.not_principals))
        if s.ip_blocks:
            conds.append(any(_in_block(q.source_ip, b) for b in s.ip_blocks))
        if s.not_ip_blocks:
            conds.append(not any(_in_block(q.source_ip, b) for b in s.not_ip_blocks))
    if o is not None:
        if o.ports:
            conds.append(q.port in o.ports)
        if o.not_ports:
            conds.append(q.port not in o.not_ports)
        http = [bool(o.methods), bool(o.not_methods), bool(o.paths), bool(o.not_paths),
                bool(o.headers)]
        if q.tcp:
            if any(http) and not deny:
                conds.append(False)
        else:
            path = normalize_path(q.path)
            if o.methods:
                conds.append(q.method in o.methods)
            if o.not_methods:
                conds.append(q.method not in o.not_methods)
            if o.paths:
                conds.append(any(_pattern(p, path) for p in o.paths))
            if o.not_paths:
                conds.append(not any(_pattern(p, path) for p in o.not_paths))
            for h in o.headers:
                conds.append(any(_pattern(v, q.headers.get(h.name)) for v in h.values))
    return all(conds)


def ref_decide(pols: Sequence[AuthzPolicy], q: AuthzRequest) -> tuple[bool, str | None, tuple[str, ...]]:
    def matches(p: AuthzPolicy) -> bool:
        return any(ref_rule(r, q, p.action == "DENY") for r in p.rules)

    audited = tuple(p.name for p in pols if p.action == "AUDIT" and matches(p))
    enforced = [p for p in pols if not p.dry_run]
    for p in enforced:
        if p.action == "DENY" and matches(p):
            return False, p.name, audited
    allows = [p for p in enforced if p.action == "ALLOW"]
    if not allows:
        return True, None, audited
    for p in allows:
        if matches(p):
            return True, p.name, audited
    return False, None, audited


@settings(max_examples=200, deadline=None)
@given(pols=st.lists(policies(), max_size=5), q=requests)
@example(pols=[policy("d", "DENY", rule(operation=AuthzOperation(paths=("/admin/*",))))],
         q=req(method="", path="", tcp=True))
@example(pols=[policy("a", "ALLOW", rule(operation=AuthzOperation(ports=(8080,),
                                                                   methods=("GET",))))],
         q=req(tcp=True))
def test_decisions_follow_the_rules_as_written(pols: list[AuthzPolicy], q: AuthzRequest) -> None:
    d = Authorizer(pols).decide(q)
    assert (d.allowed, d.policy, d.audited) == ref_decide(pols, q)


@settings(max_examples=150, deadline=None)
@given(enforced=st.lists(policies(dry=False), max_size=4),
       dry=st.lists(policies(dry=True), min_size=1, max_size=3), q=requests)
def test_dry_run_never_changes_the_decision(enforced: list[AuthzPolicy], dry: list[AuthzPolicy],
                                            q: AuthzRequest) -> None:
    enforced = [msgspec.structs.replace(p, name=f"e{i}") for i, p in enumerate(enforced)]
    dry = [msgspec.structs.replace(p, name=f"dry{i}") for i, p in enumerate(dry)]
    alone = Authorizer(enforced).decide(q)
    assert alone.dry_run_denials == ()
    with_dry = Authorizer([*dry, *enforced]).decide(q)
    assert (with_dry.allowed, with_dry.policy, with_dry.reason, with_dry.audited) == (
        alone.allowed, alone.policy, alone.reason, alone.audited)
    # what is reported is what enforcing the dry-run policies would have decided
    as_enforced = [msgspec.structs.replace(p, dry_run=False) for p in dry]
    shadow = Authorizer([*as_enforced, *enforced]).decide(q)
    if alone.allowed and not shadow.allowed:
        assert with_dry.dry_run_denials
    by_name = {p.name: p for p in as_enforced}
    has_allow = any(p.action == "ALLOW" for p in enforced)
    for name in with_dry.dry_run_denials:
        p = by_name[name]
        if p.action == "DENY":
            assert not Authorizer([p]).decide(q).allowed
        else:
            dry_allows = [d for d in as_enforced if d.action == "ALLOW"]
            assert not has_allow and not Authorizer(dry_allows).decide(q).allowed


@settings(max_examples=300, deadline=None)
@given(raw=st.text(alphabet="/.%2fFe5cC\\a?", max_size=16))
def test_normalize_path_is_idempotent_and_clean(raw: str) -> None:
    once = normalize_path("/" + raw)
    assert normalize_path(once) == once
    assert once.startswith("/") and "//" not in once and "?" not in once
    assert "/./" not in once + "/" and "/../" not in once + "/"
