"""Rules v1: parsing, semantic and reference checks, line location, merge/remove/diff."""

from __future__ import annotations

import textwrap
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import ConfigError, RuleValidationError
from meshd.rules.locate import line_of
from meshd.rules.schema import EgressRule, RouteDestination, RulesFile
from meshd.rules.validate import (
    check_references,
    diff,
    merge,
    parse_rules,
    remove,
    validate_push,
)

SEED = """\
# svca -> svcb: iPhone users to v2, everyone else 95/5 canary
[[route]]
name = "svcb-routes"   # comment with [brackets], "quotes" and = signs
host = "svcb"

[[route.http]]
name = "iphone"
match = [{ headers.user-agent.regex = ".*iPhone.*" }]
destinations = [{ subset = "v2" }]

[[route.http]]
name = "canary"
destinations = [
  { subset = "v1", weight = 95 },
  { subset = "v2", weight = 5 },
]

[[destination]]
name = "svcb"
host = "svcb"
load_balancer = "round_robin"

[[destination.subsets]]
name = "v1"
labels = { version = "v1" }

[[destination.subsets]]
name = "v2"
labels = { version = "v2" }

[[egress]]
name = "msgd"
host = "msgd.example"
ports = [80]
endpoints = ["127.0.0.1:9100"]
"""

SEED_SOURCES = {
    ("route", "svcb-routes"): "seed.toml",
    ("destination", "svcb"): "seed.toml",
    ("egress", "msgd"): "seed.toml",
}


def rules(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def errors_of(text: str, existing: RulesFile | None = None) -> list[str]:
    with pytest.raises(RuleValidationError) as caught:
        validate_push(text, "r.toml", existing or RulesFile(), SEED_SOURCES)
    return [str(e) for e in caught.value.errors]


# --------------------------------------------------------------------------- the good file


def test_seed_file_parses() -> None:
    parsed = parse_rules(SEED, "seed.toml")
    (route,) = parsed.route
    assert route.host == "svcb"
    assert route.http[0].match[0].headers["user-agent"].regex == ".*iPhone.*"
    assert [d.weight for d in route.http[1].destinations] == [95, 5]
    assert [s.name for s in parsed.destination[0].subsets] == ["v1", "v2"]
    assert parsed.egress == [
        EgressRule(name="msgd", host="msgd.example", ports=[80], endpoints=["127.0.0.1:9100"])
    ]


def test_seed_file_pushes_onto_empty_store() -> None:
    pushed, merged = validate_push(SEED, "seed.toml", RulesFile())
    assert pushed == merged == parse_rules(SEED)
    assert check_references(merged, text=SEED, file="seed.toml") == []


# --------------------------------------------------------------------------- bad files

ROUTE_HEAD = """\
[[route]]
name = "r"
host = "svcb"
[[route.http]]
"""

BAD_FILES = [
    (
        "unknown-field",
        ROUTE_HEAD + 'destinations = [{ host = "x" }]\nbogus = 1\n',
        [
            'r.toml:6: route[0].http[0].bogus: unknown field "bogus", '
            "expected one of: name, match, destinations, timeout, retries, fault, mirror, "
            "rewrite, redirect, direct_response, headers"
        ],
    ),
    (
        "unknown-field-in-header-match",
        ROUTE_HEAD + 'match = [{ headers = { user-agent = { regx = "a" } } }]\n'
        'destinations = [{ host = "x" }]\n',
        [
            'r.toml:5: route[0].http[0].match[0].headers.user-agent.regx: unknown field "regx", '
            "expected one of: exact, prefix, suffix, regex, present, absent, invert"
        ],
    ),
    (
        "unknown-top-level-kind",
        "rout = []\n",
        ['r.toml:1: rout: unknown field "rout", expected one of: route, destination, egress, '
         "authorization, ratelimit"],
    ),
    (
        "table-instead-of-array-of-tables",
        '[route]\nname = "r"\n',
        ["r.toml:1: route: expected array, got table; write [[route]] for each rule"],
    ),
    (
        "bad-regex",
        ROUTE_HEAD + 'match = [{ path = { regex = "(abc" } }]\ndestinations = [{ host = "x" }]\n',
        [
            "r.toml:5: route[0].http[0].match[0].path.regex: invalid regex: "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    (
        "regex-too-long",
        ROUTE_HEAD + f'match = [{{ path = {{ regex = "{"a" * 1025}" }} }}]\n'
        'destinations = [{ host = "x" }]\n',
        [
            "r.toml:5: route[0].http[0].match[0].path.regex: "
            "regex is 1025 characters long, at most 1024 allowed"
        ],
    ),
    (
        "weights-sum-to-95",
        ROUTE_HEAD
        + 'destinations = [\n  { host = "a", weight = 90 },\n  { host = "b", weight = 5 },\n]\n',
        ["r.toml:5: route[0].http[0].destinations: weights sum to 95, must be 100"],
    ),
    (
        "weight-missing-and-out-of-range",
        ROUTE_HEAD + 'destinations = [\n  { host = "a", weight = 101 },\n  { host = "b" },\n]\n',
        [
            "r.toml:6: route[0].http[0].destinations[0].weight: weight 101 is out of range 0..100",
            "r.toml:7: route[0].http[0].destinations[1].weight: "
            "weight is required when there are several destinations",
        ],
    ),
    (
        "single-destination-weight",
        ROUTE_HEAD + 'destinations = [{ host = "a", weight = 50 }]\n',
        [
            "r.toml:5: route[0].http[0].destinations[0].weight: "
            "weight of a single destination must be 100, got 50"
        ],
    ),
    (
        "no-destinations",
        ROUTE_HEAD + 'name = "empty"\n',
        ["r.toml:4: route[0].http[0].destinations: at least one destination is required"],
    ),
    (
        "no-http-routes",
        '[[route]]\nname = "r"\nhost = "svcb"\n',
        ["r.toml:1: route[0].http: at least one http route is required"],
    ),
    (
        "subset-without-destination-rule",
        ROUTE_HEAD + 'destinations = [{ subset = "v3" }]\n',
        [
            'r.toml:5: route[0].http[0].destinations[0].subset: subset "v3" is not defined by '
            'any destination rule for host "svcb"'
        ],
    ),
    (
        "duplicate-rule-names",
        ROUTE_HEAD + 'destinations = [{ host = "x" }]\n'
        '[[route]]\nname = "r"\nhost = "svcc"\n[[route.http]]\ndestinations = [{ host = "x" }]\n',
        ['r.toml:7: route[1].name: duplicate route rule name "r", already used by route[0]'],
    ),
    (
        "two-route-rules-for-one-host",
        ROUTE_HEAD + 'destinations = [{ host = "x" }]\n'
        '[[route]]\nname = "s"\nhost = "svcb"\n[[route.http]]\ndestinations = [{ host = "x" }]\n',
        ['r.toml:8: route[1].host: host "svcb" already has route rule "r"'],
    ),
    (
        "toml-syntax-error",
        '[[route]]\nname = "r"\nhost = = "svcb"\n',
        ["r.toml:3: invalid TOML: invalid value (column 8)"],
    ),
    (
        "toml-unterminated-string",
        'x = "abc\n',
        ["r.toml:1: invalid TOML: illegal character '\\n' (column 9)"],
    ),
    (
        "wrong-type",
        '[[egress]]\nname = "e"\nhost = "msgd"\nports = ["80"]\n',
        ["r.toml:4: egress[0].ports[0]: expected integer, got string"],
    ),
    (
        "missing-required-field",
        '[[egress]]\nhost = "msgd"\n',
        ['r.toml:1: egress[0].name: missing required field "name"'],
    ),
    (
        "bad-enum",
        '[[destination]]\nname = "d"\nhost = "svcb"\nload_balancer = "fastest"\n',
        [
            'r.toml:4: destination[0].load_balancer: invalid value "fastest", '
            "expected one of: round_robin, least_request, random, ring_hash, maglev"
        ],
    ),
    (
        "upper-case-header-name",
        ROUTE_HEAD + 'match = [{ headers = { User-Agent = { regex = ".*iPhone.*" } } }]\n'
        'destinations = [{ host = "x" }]\n',
        [
            "r.toml:5: route[0].http[0].match[0].headers.User-Agent: "
            'header name "User-Agent" must be lower case ("user-agent")'
        ],
    ),
    (
        "header-name-not-a-token",
        ROUTE_HEAD + 'match = [{ headers = { "x y" = { exact = "1" } } }]\n'
        'destinations = [{ host = "x" }]\n',
        [
            'r.toml:5: route[0].http[0].match[0].headers["x y"]: '
            'header name "x y" is not a valid HTTP token'
        ],
    ),
    (
        "string-match-sets-two",
        ROUTE_HEAD + 'match = [{ path = { exact = "/x", prefix = "/y" } }]\n'
        'destinations = [{ host = "x" }]\n',
        [
            "r.toml:5: route[0].http[0].match[0].path: "
            "set exactly one of exact, prefix, suffix, regex, present, absent "
            "(got exact and prefix)"
        ],
    ),
    (
        "string-match-sets-none",
        ROUTE_HEAD + "[[route.http.match]]\nheaders.x-test = {}\n"
        '[[route.http.destinations]]\nhost = "x"\n',
        [
            "r.toml:6: route[0].http[0].match[0].headers.x-test: "
            "set exactly one of exact, prefix, suffix, regex, present, absent (got none)"
        ],
    ),
    (
        "path-and-method",
        ROUTE_HEAD
        + 'match = [\n  { path = { prefix = "api" } },\n  { method = { exact = "get" } },\n]\n'
        'destinations = [{ host = "x" }]\n',
        [
            "r.toml:6: route[0].http[0].match[0].path.prefix: "
            'path prefix "api" must start with "/"',
            "r.toml:7: route[0].http[0].match[1].method.exact: "
            'method "get" must be an upper-case HTTP token such as "GET"',
        ],
    ),
    (
        "duplicate-http-route-names",
        ROUTE_HEAD + 'name = "a"\ndestinations = [{ host = "x" }]\n'
        '[[route.http]]\nname = "a"\ndestinations = [{ host = "y" }]\n',
        ['r.toml:8: route[0].http[1].name: duplicate name "a", already used by route[0].http[0]'],
    ),
    (
        "bad-names-and-hosts",
        '[[destination]]\nname = "D"\nhost = "SvcB"\n[[destination]]\nname = ""\nhost = "svc_c"\n',
        [
            'r.toml:2: destination[0].name: name "D" must be lower-case letters, digits, '
            '"-" or ".", starting and ending with a letter or digit',
            'r.toml:3: destination[0].host: host "SvcB" must be lower case ("svcb")',
            "r.toml:5: destination[1].name: name must not be empty",
            'r.toml:6: destination[1].host: host "svc_c" is not a valid DNS name',
        ],
    ),
    (
        "subsets-duplicate-and-unlabelled",
        '[[destination]]\nname = "d"\nhost = "svcb"\n'
        '[[destination.subsets]]\nname = "v1"\nlabels = {}\n'
        '[[destination.subsets]]\nname = "v1"\nlabels = { version = "v1" }\n',
        [
            "r.toml:6: destination[0].subsets[0].labels: a subset needs at least one label",
            'r.toml:8: destination[0].subsets[1].name: duplicate subset name "v1", '
            "already used by destination[0].subsets[0]",
        ],
    ),
    (
        "bad-ports",
        '[[egress]]\nname = "e"\nhost = "msgd"\nports = [0, 80, 80, 70000]\n',
        [
            "r.toml:4: egress[0].ports[0]: port 0 is out of range 1..65535",
            "r.toml:4: egress[0].ports[2]: duplicate port 80",
            "r.toml:4: egress[0].ports[3]: port 70000 is out of range 1..65535",
        ],
    ),
    (
        "no-ports",
        '[[egress]]\nname = "e"\nhost = "msgd"\nports = []\n',
        ["r.toml:4: egress[0].ports: at least one port is required"],
    ),
    (
        "bad-endpoints",
        '[[egress]]\nname = "e"\nhost = "msgd"\nendpoints = [\n'
        '  "127.0.0.1",\n  "[::1]:80",\n  "::1:80",\n  "h:99999",\n  "[zz]:1",\n]\n',
        [
            'r.toml:5: egress[0].endpoints[0]: endpoint "127.0.0.1" must be "host:port" '
            '(IPv6 as "[::1]:80")',
            'r.toml:7: egress[0].endpoints[2]: endpoint "::1:80" must be "host:port" '
            '(IPv6 as "[::1]:80")',
            'r.toml:8: egress[0].endpoints[3]: endpoint "h:99999" has port "99999" '
            "out of range 1..65535",
            'r.toml:9: egress[0].endpoints[4]: endpoint "[zz]:1" has an invalid IPv6 address',
        ],
    ),
    (
        "egress-host-with-port",
        '[[egress]]\nname = "e"\nhost = "msgd.example:80"\n',
        [
            'r.toml:3: egress[0].host: host "msgd.example:80" must not contain a port; '
            'list ports in "ports"'
        ],
    ),
    (
        "egress-host-with-scheme",
        '[[egress]]\nname = "e"\nhost = "http://msgd.example"\n',
        ['r.toml:3: egress[0].host: host "http://msgd.example" must not contain a scheme'],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_rejected_with_exact_errors(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_parse_rules_alone_skips_references_but_raises_semantic_errors() -> None:
    parse_rules(ROUTE_HEAD + 'destinations = [{ subset = "v3" }]\n')  # no reference check
    with pytest.raises(RuleValidationError) as caught:
        parse_rules('[[egress]]\nname = "e"\nhost = "msgd"\nports = [0]\n', "e.toml")
    assert isinstance(caught.value, ConfigError)
    assert (caught.value.file, caught.value.line, caught.value.field) == (
        "e.toml",
        4,
        "egress[0].ports[0]",
    )


# ------------------------------------------------------------------ pushes onto stored rules


def test_push_breaking_a_stored_route_names_the_stored_file() -> None:
    stored = parse_rules(SEED, "seed.toml")
    push = rules("""
        [[destination]]
        name = "svcb"
        host = "svcb"
        [[destination.subsets]]
        name = "v1"
        labels = { version = "v1" }
    """)
    assert errors_of(push, stored) == [
        'seed.toml: route["svcb-routes"].http[0].destinations[0].subset: '
        'subset "v2" is not defined by any destination rule for host "svcb"',
        'seed.toml: route["svcb-routes"].http[1].destinations[1].subset: '
        'subset "v2" is not defined by any destination rule for host "svcb"',
    ]


def test_push_second_route_rule_for_stored_host_blames_the_push() -> None:
    stored = parse_rules(SEED, "seed.toml")
    push = ROUTE_HEAD + 'destinations = [{ subset = "v1" }]\n'
    assert errors_of(push, stored) == [
        'r.toml:3: route[0].host: host "svcb" already has route rule "svcb-routes"'
    ]


def test_push_may_use_subsets_of_stored_destination_rules() -> None:
    stored = parse_rules(SEED, "seed.toml")
    push = rules("""
        [[route]]
        name = "svcb-routes"
        host = "svcb"
        [[route.http]]
        destinations = [{ subset = "v1" }]
    """)
    pushed, merged = validate_push(push, "r.toml", stored, SEED_SOURCES)
    assert merged.route == pushed.route
    assert merged.destination == stored.destination


def test_check_references_after_delete() -> None:
    stored = parse_rules(SEED, "seed.toml")
    after = remove(stored, "destination", "svcb")
    errors = check_references(after, existing_sources=SEED_SOURCES)
    assert str(errors[0]) == (
        'seed.toml: route["svcb-routes"].http[0].destinations[0].subset: '
        'subset "v2" is not defined by any destination rule for host "svcb"'
    )
    assert len(errors) == 3
    unsourced = check_references(after, file="all.toml")
    assert str(unsourced[1]) == (
        "all.toml: route[0].http[1].destinations[0].subset: "
        'subset "v1" is not defined by any destination rule for host "svcb"'
    )


def test_destination_host_overrides_route_host_for_subset_lookup() -> None:
    push = rules("""
        [[route]]
        name = "r"
        host = "svcb"
        [[route.http]]
        destinations = [{ host = "svcc", subset = "v1" }]
    """)
    assert errors_of(push) == [
        "r.toml:5: route[0].http[0].destinations[0].subset: "
        'subset "v1" is not defined by any destination rule for host "svcc"'
    ]


# --------------------------------------------------------------------------- locate


def test_locate_arrays_of_tables_count_per_parent() -> None:
    text = rules("""
        [[route]]
        name = "a"
        [[route.http]]
        name = "a0"
        [[route.http]]
        name = "a1"
        [[route]]
        name = "b"
        [[route.http]]
        name = "b0"
    """)
    assert line_of(text, ("route", 0, "http", 1, "name")) == 6
    assert line_of(text, ("route", 1, "http", 0)) == 9
    assert line_of(text, ("route", 1, "http", 0, "name")) == 10
    assert line_of(text, ("route", 1, "http", 0, "match", 3, "path")) == 9  # longest prefix


def test_locate_multiline_array_of_inline_tables() -> None:
    text = SEED
    assert line_of(text, ("route", 0, "http", 1, "destinations")) == 13
    assert line_of(text, ("route", 0, "http", 1, "destinations", 0, "weight")) == 14
    assert line_of(text, ("route", 0, "http", 1, "destinations", 1, "weight")) == 15
    assert line_of(text, ("route", 0, "http", 1, "destinations", 1)) == 15


def test_locate_dotted_quoted_and_inline_keys() -> None:
    text = rules("""
        [[route]]
        [[route.http]]
        [[route.http.match]]
        headers.user-agent.regex = "a#[b]=c"  # comment = [x]
        headers."x-b3".exact = 'lit # [ ='
        path = { prefix = "/x", regex = '''
        multi # [line] = "
        ''' }
        method.exact = "GET"
    """)
    base = ("route", 0, "http", 0, "match", 0)
    tomllib.loads(text)  # valid TOML
    assert line_of(text, (*base, "headers", "user-agent", "regex")) == 4
    assert line_of(text, (*base, "headers")) == 4
    assert line_of(text, (*base, "headers", "x-b3", "exact")) == 5
    assert line_of(text, (*base, "path", "regex")) == 6
    assert line_of(text, (*base, "method", "exact")) == 9


def test_locate_table_header_and_unknowns() -> None:
    text = '[destination.subsets]\nname = "v1"\n\n["quoted key"]\nx = 1\n'
    assert line_of(text, ("destination", "subsets", "name")) == 2
    assert line_of(text, ("quoted key", "x")) == 5
    assert line_of(text, ("nowhere",)) == 0
    assert line_of("", ("route", 0)) == 0


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 2)), min_size=1, max_size=8))
def test_locate_element_i_of_multiline_array(items: list[tuple[int, int]]) -> None:
    lines = ["[[route]]", "[[route.http]]", "destinations = ["]
    where = []
    for weight, blanks in items:
        lines += ["  # filler, [x] = y"] * blanks
        where.append(len(lines) + 1)
        lines.append(f'  {{ subset = "v{weight}", weight = {weight} }},')
    text = "\n".join([*lines, "]", ""])
    for i, line in enumerate(where):
        assert line_of(text, ("route", 0, "http", 0, "destinations", i, "weight")) == line


# --------------------------------------------------------------------------- merge / remove / diff


def test_merge_upserts_in_place_and_appends() -> None:
    stored = parse_rules(SEED)
    pushed = parse_rules(
        '[[egress]]\nname = "new"\nhost = "n.example"\n'
        '[[egress]]\nname = "msgd"\nhost = "msgd.example"\nports = [8080]\n'
    )
    merged = merge(stored, pushed)
    assert [(e.name, e.ports) for e in merged.egress] == [("msgd", [8080]), ("new", [80])]
    assert merged.route == stored.route
    assert diff(stored, merged) == [("update", "egress", "msgd"), ("create", "egress", "new")]


def test_remove_and_diff_delete() -> None:
    stored = parse_rules(SEED)
    after = remove(stored, "egress", "msgd")
    assert after.egress == [] and after.route == stored.route
    assert diff(stored, after) == [("delete", "egress", "msgd")]
    assert diff(stored, stored) == []
    with pytest.raises(KeyError):
        remove(stored, "egress", "nope")
    with pytest.raises(KeyError):
        remove(stored, "gateway", "msgd")


def test_diff_ignores_spelled_out_defaults() -> None:
    stored = parse_rules(SEED)
    same = parse_rules(SEED.replace('load_balancer = "round_robin"\n', ""))
    assert diff(stored, merge(stored, same)) == []


# --------------------------------------------------------------------------- properties


def weights_file(weights: list[int]) -> str:
    dests = "".join(f'  {{ host = "h{i}", weight = {w} }},\n' for i, w in enumerate(weights))
    return ROUTE_HEAD + f"destinations = [\n{dests}]\n"


@given(st.lists(st.integers(0, 100), min_size=2, max_size=6))
def test_weights_pass_exactly_when_they_sum_to_100(weights: list[int]) -> None:
    text = weights_file(weights)
    if sum(weights) == 100:
        parse_rules(text)
    else:
        assert errors_of(text) == [
            f"r.toml:5: route[0].http[0].destinations: weights sum to {sum(weights)}, must be 100"
        ]


@given(st.lists(st.integers(1, 99), min_size=1, max_size=5).map(lambda ws: [*ws, 100]))
def test_weights_split_from_100_always_pass(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    weights = [b - a for a, b in zip([0, *points], points, strict=False)]
    route = parse_rules(weights_file(weights)).route[0]
    assert route.http[0].destinations == [
        RouteDestination(host=f"h{i}", weight=w) for i, w in enumerate(weights)
    ]


@settings(max_examples=300)
@given(
    st.integers(0, len(SEED) - 1),
    st.integers(0, 3),
    st.text(alphabet="[]{}=\",.'#\n abc1-", max_size=4),
)
def test_any_text_parses_or_raises_rule_validation_error(start: int, cut: int, junk: str) -> None:
    text = SEED[:start] + junk + SEED[start + cut :]
    try:
        validate_push(text, "f.toml", RulesFile())
    except RuleValidationError as exc:
        assert exc.errors and all(e.file == "f.toml" for e in exc.errors)


def test_two_destination_rules_for_one_host_are_rejected() -> None:
    text = ('[[destination]]\nname = "a"\nhost = "svcb"\n\n'
            '[[destination]]\nname = "b"\nhost = "svcb"\n')
    with pytest.raises(RuleValidationError) as exc:
        parse_rules(text, "d.toml")
    assert str(exc.value) == 'd.toml:7: destination[1].host: host "svcb" already has destination rule "a"'
