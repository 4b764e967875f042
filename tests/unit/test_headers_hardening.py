"""Pure tests of the hardening rules in sidecar.core.headers and sidecar.http.limits: request
target forms and Host agreement, hop-by-hop stripping with ``te: trailers`` and upgrades,
Envoy-style ``x-forwarded-*`` / internal-header sanitizing, and limits from a config table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import ConfigError, RemoteProtocolError
from sidecar.core.headers import (
    INTERNAL_PREFIXES,
    XFCC,
    XFF,
    XFP,
    check_target,
    forwarded_headers,
    split_hop_by_hop,
)
from sidecar.http.limits import MAX_CONNECTIONS, ServerLimits, server_limits
from sidecar.http.parser import parse_request_head

ACCEPTED = [
    ("GET", "/", "a"),
    ("GET", "/p?q=1&r=/x", "a:8080"),
    ("GET", "//double", "a"),
    ("GET", "http://a/p", "a"),
    ("GET", "HTTP://A:80/p", "a"),  # scheme and host case, default port
    ("GET", "http://a:8080", "A:8080"),
    ("GET", "http://[::1]:8080/", "[::1]:8080"),
    ("GET", "http://a/p", None),  # HTTP/1.0 without Host
    ("OPTIONS", "*", "a"),
    ("CONNECT", "a:443", "a:443"),
    ("CONNECT", "[::1]:443", "[::1]:443"),
    ("GET", "/", "xn--bcher-kva.example"),
]
REFUSED = [
    ("GET", "a", "a", "origin-form"),
    ("GET", "/a#frag", "a", "fragment"),
    ("GET", "*", "a", "OPTIONS only"),
    ("GET", "http://b/", "a", "differs"),
    ("GET", "http://a:8080/", "a", "differs"),
    ("GET", "http://u:p@a/", "a", "userinfo"),
    ("GET", "http:///p", "a", "authority"),
    ("GET", "ftp://a/", "a", "scheme"),
    ("GET", "https://a/", "a", "scheme"),  # https over plain text (Envoy)
    ("GET", "/", "a b", "Host"),
    ("GET", "/", "a/b", "Host"),
    ("GET", "/", "a\tb", "Host"),
    ("GET", "/", "caf\u00e9", "Host"),
    ("CONNECT", "/x", "a", "authority-form"),
    ("CONNECT", "a", "a", "authority-form"),
    ("CONNECT", "u@a:443", "a", "authority-form"),
]


@pytest.mark.parametrize(("method", "target", "host"), ACCEPTED)
def test_check_target_accepts(method: str, target: str, host: str | None) -> None:
    check_target(method, target, host)


@pytest.mark.parametrize(("method", "target", "host", "why"), REFUSED)
def test_check_target_refuses_with_400(method: str, target: str, host: str, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why) as info:
        check_target(method, target, host)
    assert info.value.status_hint == 400


def test_https_absolute_form_only_over_tls() -> None:
    check_target("GET", "https://a/p", "a", secure=True)
    head = b"GET https://a/p HTTP/1.1\r\nHost: a\r\n\r\n"
    assert parse_request_head(head, secure=True).target == "https://a/p"
    with pytest.raises(RemoteProtocolError):
        parse_request_head(head)


@given(st.text(max_size=40), st.sampled_from(["GET", "POST", "OPTIONS", "CONNECT"]),
       st.one_of(st.none(), st.text(max_size=20)))
def test_check_target_only_raises_400_and_accepts_known_forms(target: str, method: str,
                                                              host: str | None) -> None:
    try:
        check_target(method, target, host)
    except RemoteProtocolError as exc:
        assert exc.status_hint == 400
        return
    assert "#" not in target
    if method == "CONNECT":
        assert "/" not in target and ":" in target
    else:
        assert target.startswith(("/", "http://", "HTTP://", "Http")) or target == "*" or "://" in target


def test_te_trailers_kept_and_upgrade_kept_only_when_asked() -> None:
    headers = [("host", "a"), ("te", "trailers, deflate;q=0.5"), ("connection", "TE, upgrade, x-p"),
               ("upgrade", "websocket"), ("x-p", "1"), ("content-length", "0")]
    assert split_hop_by_hop(headers)[0] == (("host", "a"), ("content-length", "0"))
    out, tokens = split_hop_by_hop(headers, keep_te_trailers=True, upgrade=True)
    assert out == (("host", "a"), ("content-length", "0"), ("te", "trailers"), ("upgrade", "websocket"),
                   ("connection", "upgrade"))
    assert tokens == {"te", "upgrade", "x-p"}
    gzip_only = split_hop_by_hop([("te", "gzip")], keep_te_trailers=True)[0]
    assert gzip_only == ()


EDGE_IN = [("host", "a"), ("x-forwarded-for", "1.2.3.4"), ("X-A", "1"), ("x-forwarded-for", "5.6.7.8 "),
           ("x-forwarded-proto", "https"), ("x-envoy-retry-on", "5xx"), ("x-meshd-peer", "workload=evil"),
           ("x-forwarded-client-cert", "URI=spiffe://evil"), ("x-request-id", "r1")]


def test_edge_request_appends_xff_overwrites_xfp_and_drops_internal_headers() -> None:
    out = forwarded_headers(EDGE_IN, remote_ip="10.0.0.9")
    assert out == (("host", "a"), ("X-A", "1"), ("x-request-id", "r1"),
                   (XFF, "1.2.3.4, 5.6.7.8, 10.0.0.9"), (XFP, "http"))


def test_mesh_request_from_verified_peer_is_trusted_and_gets_xfcc() -> None:
    out = forwarded_headers(EDGE_IN, remote_ip="10.0.0.9", scheme="https",
                            peer_id="spiffe://cluster.local/ns/default/sa/b",
                            own_id="spiffe://cluster.local/ns/default/sa/a")
    assert (XFF, "1.2.3.4, 5.6.7.8") in out  # use_remote_address false: not appended
    assert (XFP, "https") in out  # the trusted hop's value
    assert ("x-envoy-retry-on", "5xx") in out and ("x-meshd-peer", "workload=evil") in out
    assert (XFCC, "URI=spiffe://evil, By=spiffe://cluster.local/ns/default/sa/a;"
                  "URI=spiffe://cluster.local/ns/default/sa/b") in out
    plain = forwarded_headers([("host", "a")], remote_ip=None, peer_id="spiffe://x")
    assert plain == (("host", "a"), (XFP, "http"), (XFCC, "URI=spiffe://x"))


NAMES = st.sampled_from(["host", "x-a", XFF, XFP, XFCC, "x-envoy-max-retries", "x-meshd-peer",
                         "x-envoy-internal", "authorization", "x-forwarded-host"])
HEADERS = st.lists(st.tuples(NAMES, st.text(alphabet="abc.1 ,=", max_size=10)), max_size=12)


@given(HEADERS, st.sampled_from(["127.0.0.1", "10.1.2.3", "::1"]), st.sampled_from(["http", "https"]))
def test_edge_sanitizing_properties(headers: list[tuple[str, str]], remote: str, scheme: str) -> None:
    out = forwarded_headers(headers, remote_ip=remote, scheme=scheme)
    names = [n for n, _ in out]
    assert not any(n.startswith(INTERNAL_PREFIXES) for n in names) and XFCC not in names
    assert names.count(XFF) == 1 and names.count(XFP) == 1
    assert dict(out)[XFF].split(", ")[-1] == remote and dict(out)[XFP] == scheme
    kept = [h for h in headers if h[0] not in (XFF, XFP, XFCC) and not h[0].startswith(INTERNAL_PREFIXES)]
    assert list(out[: len(kept)]) == kept  # everything else in order, untouched
    assert forwarded_headers(out, remote_ip=remote, scheme=scheme)[-2][1].count(remote) >= 2  # 2nd hop


def test_server_limits_from_a_table() -> None:
    lim = server_limits({"header_timeout": 2, "max_connections": 500, "idle_timeout": 0.5})
    assert (lim.header_timeout, lim.max_connections, lim.idle_timeout) == (2, 500, 0.5)
    assert ServerLimits().max_connections == MAX_CONNECTIONS == 10_000
    for bad, field in [({"max_conns": 1}, "limits.max_conns"),
                       ({"max_connections": 0}, "limits.max_connections"),
                       ({"max_headers_count": 1.5}, "limits.max_headers_count"),
                       ({"header_timeout": "2"}, "limits.header_timeout"),
                       ({"max_recv": True}, "limits.max_recv")]:
        with pytest.raises(ConfigError) as info:
            server_limits(bad)
        assert info.value.field == field
