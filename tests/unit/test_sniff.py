"""Protocol detection from first bytes (sidecar.core.sniff): HTTP/1.x, h2 preface, TLS, opaque."""

from __future__ import annotations

import ssl

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.sniff import DETECTION_MAX_BYTES, H2_PREFACE, detect


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="db.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


REQUESTS = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"POST /x?y=1 HTTP/1.0\r\n\r\n",
            b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n", b"GET http://svcb/a HTTP/1.1\n"]


def test_whole_first_packets() -> None:
    for req in REQUESTS:
        assert detect(req) == "http1", req
    assert detect(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00") == "h2"
    assert detect(_client_hello()) == "tls"
    for raw in (b"\x00\x01\x02", b"*1\r\n$4\r\nPING\r\n", b"SSH-2.0-OpenSSH_9.6\r\n",
                b"GET / HTTP/2.0\r\n", b"GET /a b HTTP/1.1\r\n", b"\x16\x03\x01\x00\x10\x02",
                b"\x16\x01", b"\x05\x01\x00", b"PRI * HTTP/2.0\r\n\r\nXX"):
        assert detect(raw) == "opaque", raw


def test_prefixes_wait_for_more_then_decide() -> None:
    for whole, proto in [(REQUESTS[0], "http1"), (H2_PREFACE, "h2"), (_client_hello(), "tls")]:
        cut = whole.index(b"\n") if proto == "http1" else (len(H2_PREFACE) - 1 if proto == "h2" else 5)
        for i in range(1, cut):
            assert detect(whole[:i]) is None, (proto, whole[:i])
            assert detect(whole[:i], final=True) == "opaque"
        assert detect(whole) == proto


def test_endless_request_line_is_opaque() -> None:
    assert detect(b"GET /" + b"a" * (DETECTION_MAX_BYTES + 10)) == "opaque"
    assert detect(b"") is None and detect(b"", final=True) == "opaque"


@given(st.binary(max_size=200))
def test_never_crashes_and_final_always_decides(data: bytes) -> None:
    assert detect(data) in (None, "h2", "http1", "tls", "opaque")
    assert detect(data, final=True) in ("h2", "http1", "tls", "opaque")


@given(st.binary(min_size=1, max_size=64), st.binary(max_size=64))
def test_a_decision_does_not_change_with_more_bytes(data: bytes, more: bytes) -> None:
    first = detect(data)
    if first is not None:
        assert detect(data + more) == first


@given(st.from_regex(rb"\A[A-Z]{3,7} /[a-z0-9/?=&]{0,40} HTTP/1\.[01]\r\n\Z"))
def test_generated_request_lines(line: bytes) -> None:
    assert detect(line) == "http1"
    for i in range(1, len(line) - 1):
        assert detect(line[:i]) is None
