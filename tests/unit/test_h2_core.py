"""Pure HTTP/2 and gRPC logic: header conversion, the rapid-reset and flood guards (Hypothesis
against a reference model of Envoy's rule), grpc-timeout parsing, gRPC local replies, the
gRPC retry and fault-abort rule fields."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import LocalProtocolError, RemoteProtocolError, RuleValidationError
from meshd.rules.schema import RulesFile
from meshd.rules.validate import validate_push
from meshd.snapshot.model import FaultPolicy, RetryPolicy
from sidecar.core.retry import retriable
from sidecar.core.rewrite import fault_decision
from sidecar.http.messages import RequestHead, Response, ResponseHead
from sidecar.http2.convert import request_head, request_headers, response_head, response_headers
from sidecar.http2.grpc import grpc_local_reply, grpc_reply, grpc_status_of, grpc_timeout
from sidecar.http2.guard import RateGuard, ResetGuard
from sidecar.http2.transport import app_h2, app_protocol, mesh_h2

PSEUDO = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svcb:80"), (b":path", b"/p?q=1")]


def test_request_head_from_h2_fields() -> None:
    raw = [*PSEUDO, (b"cookie", b"a=1"), (b"x-id", b"7"), (b"cookie", b"b=2"), (b"te", b"trailers")]
    head = request_head(raw, max_bytes=60 * 1024, max_count=100)
    assert (head.method, head.target, head.http_version, head.authority) == ("POST", "/p?q=1", "2", "svcb:80")
    assert head.headers == (("host", "svcb:80"), ("x-id", "7"), ("cookie", "a=1; b=2"))


@pytest.mark.parametrize(("raw", "status"), [
    ([*PSEUDO, *[(b"x-%d" % i, b"v") for i in range(101)]], 431),  # Envoy max_headers_count
    ([*PSEUDO, (b"x-big", b"v" * (60 * 1024))], 431),  # Envoy max_request_headers_kb
    ([(b":method", b"GET"), (b":scheme", b"http")], 400),  # no :path
    ([(b":method", b"CONNECT"), (b":authority", b"db:5432")], 501),  # tunnels: HTTP/1.1 only
])
def test_request_head_limits(raw: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        request_head(raw, max_bytes=60 * 1024, max_count=100)
    assert err.value.status_hint == status


def test_upstream_request_and_response_fields() -> None:
    head = RequestHead("GET", "/x", (("host", "svcb"), ("connection", "close"), ("x-a", "1")), "1.1")
    assert request_headers(head, "http", "10.0.0.1:8080") == [
        (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svcb"), (b":path", b"/x"),
        (b"x-a", b"1"), (b"te", b"trailers")]
    out = response_headers(ResponseHead(200, (("transfer-encoding", "chunked"), ("X-B", " 2 "),
                                              ("Connection", "close"), ("x-o", "caf\xe9"))))
    assert out == [(b":status", b"200"), (b"x-b", b"2"), (b"x-o", b"caf\xe9")]  # obs-text kept as is
    # h2 does not re-validate what we send: convert must refuse what RFC 9113 §8.2 forbids
    for bad in [("x-split", "a\r\nset-cookie: evil"), ("x-nul", "a\x00"), ("bad name", "v"),
                (":status", "200"), ("", "v")]:
        with pytest.raises(LocalProtocolError):
            response_headers(ResponseHead(200, (bad,)))
    sent = request_headers(RequestHead("GET", "/", (("authorization", "Bearer x"), ("cookie", "a=1"),
                                                    ("cookie2", "c" * 30))), "http", "a")
    assert [type(f).__name__ for f in sent[4:7]] == ["NeverIndexedHeaderTuple"] * 2 + ["tuple"]
    parsed = response_head([(b":status", b"503"), (b"grpc-status", b"14"), (b"keep-alive", b"5")])
    assert parsed == ResponseHead(503, (("grpc-status", "14"),))
    with pytest.raises(RemoteProtocolError):
        response_head([(b"x", b"y")])


@pytest.mark.parametrize(("value", "seconds"), [
    ("1S", 1.0), ("100m", 0.1), ("2H", 7200.0), ("5M", 300.0), ("250u", 250e-6), ("7n", 7e-9),
    ("12345678S", 12345678.0), ("123456789S", None), ("1x", None), ("S", None), ("-1S", None),
    ("", None), (None, None)])
def test_grpc_timeout(value: str | None, seconds: float | None) -> None:
    assert grpc_timeout(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_grpc_local_reply_maps_status_as_envoy() -> None:
    grpc_req = RequestHead("POST", "/s/M", (("content-type", "application/grpc+proto"),), "2")
    plain_req = RequestHead("GET", "/", (), "2")
    timeout = Response(ResponseHead(504, (("x-meshd-response-flags", "UT"),)), b"upstream timeout\n")
    refused = Response(ResponseHead(503, ()), b"no healthy upstream\n")
    assert grpc_status_of(grpc_local_reply(grpc_req, timeout).head.headers) == 4  # DEADLINE_EXCEEDED
    converted = grpc_local_reply(grpc_req, refused).head
    assert converted.status == 200 and grpc_status_of(converted.headers) == 14  # UNAVAILABLE
    assert converted.header("grpc-message") == "no healthy upstream"
    assert grpc_local_reply(plain_req, refused) is refused
    reply = grpc_reply(8, "100% full\n")
    assert reply.head.header("grpc-message") == "100%25 full%0A"  # percent-encoded (gRPC spec)


def test_protocol_choice_seam() -> None:
    grpc_head = RequestHead("POST", "/s/M", (("content-type", "application/grpc"),), "1.1")
    h1 = RequestHead("GET", "/", (), "1.1")
    assert mesh_h2(grpc_head, "a", 1) and mesh_h2(h1.replace(http_version="2"), "a", 1)
    assert mesh_h2(h1.replace(headers=(("te", "trailers"),)), "a", 1) and not mesh_h2(h1, "a", 1)
    assert app_h2("grpc")(h1, "a", 1) and app_h2("")(grpc_head, "a", 1) and not app_h2("http")(h1, "a", 1)

    class Boot:
        labels = {"mesh.protocol": "HTTP2"}

    assert app_protocol(Boot()) == "http2"


def _envoy_rule(events: list[tuple[bool, float]], min_streams: int) -> bool:
    """Reference model: after each close, trip when >= min_streams closed and >= 50 % premature."""
    closed = premature = 0
    for reset, lifetime in events:
        closed += 1
        premature += reset and lifetime < 1.0
        if closed >= min_streams and premature * 2 >= closed:
            return True
    return False


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 3)), max_size=60), st.integers(1, 30))
def test_reset_guard_is_envoys_premature_reset_rule(events: list[tuple[bool, float]],
                                                    min_streams: int) -> None:
    guard = ResetGuard(min_streams=min_streams)
    now = 0.0
    for sid, (reset, lifetime) in enumerate(events):
        guard.opened(sid, now)
        guard.closed(sid, now + lifetime, reset_by_peer=reset)
        now += 0.01
    assert guard.tripped == _envoy_rule(events, min_streams)
    assert guard.open_streams == 0


def test_rapid_reset_trips_at_500_streams_and_unknown_ids_do_not_count() -> None:
    guard = ResetGuard()
    for sid in range(1, 1000, 2):
        guard.opened(sid, 0.0)
        guard.closed(sid, 0.0, reset_by_peer=True)
        guard.closed(sid + 10_000, 0.0, reset_by_peer=True)  # never opened: ignored
        assert guard.tripped == (guard.closed_streams >= 500)
    assert guard.tripped and guard.closed_streams == 500


def test_rate_guard_window() -> None:
    guard = RateGuard(limit=1000)
    assert all(guard.hit(t / 1000) for t in range(1000))  # 1000 in one second: fine
    assert guard.hit(1.5)  # the window slid
    burst = RateGuard(limit=1000)
    assert burst.hit(0.0, 1000) and not burst.hit(0.1) and not burst.hit(10.0)  # stays tripped


def test_grpc_retry_conditions_and_fault_decision() -> None:
    policy = RetryPolicy(attempts=2, retry_on=("unavailable", "resource-exhausted"))
    assert retriable(policy, status=200, grpc_status=14) and retriable(policy, status=200, grpc_status=8)
    assert not retriable(policy, status=200, grpc_status=5) and not retriable(policy, status=200)
    decision = fault_decision(FaultPolicy(abort_grpc_status=14, abort_percentage=100.0), lambda: 0.0)
    assert decision.abort_grpc_status == 14 and decision.abort_status is None
    missed = fault_decision(FaultPolicy(abort_grpc_status=14, abort_percentage=10.0), lambda: 50.0)
    assert missed.abort_grpc_status is None


ROUTE = '[[route]]\nname = "r"\nhost = "svcb"\n[[route.http]]\ndestinations = [{}]\n'


def _errors(text: str) -> list[str]:
    try:
        validate_push(text, "r.toml", RulesFile())
    except RuleValidationError as exc:
        return [str(e) for e in exc.errors]
    return []


def test_rules_accept_grpc_retry_on_and_grpc_abort() -> None:
    conditions = "unavailable,cancelled,deadline-exceeded,resource-exhausted"
    assert _errors(ROUTE + f'retries = {{ attempts = 2, retry_on = "{conditions}" }}\n'
                   'fault = { abort = { grpc_status = "UNAVAILABLE" } }\n') == []
    bad = _errors(ROUTE + 'fault = { abort = { grpc_status = "NOPE" } }\n')
    assert len(bad) == 1 and 'unknown gRPC status "NOPE"' in bad[0]
    both = _errors(ROUTE + 'fault = { abort = { status = 503, grpc_status = "UNAVAILABLE" } }\n')
    assert len(both) == 1 and "exactly one of status, grpc_status" in both[0]
