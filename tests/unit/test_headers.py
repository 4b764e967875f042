"""Pure tests of sidecar.core.headers (raw-head checks, framing checks, hop-by-hop stripping,
head serialisation) and of sidecar.http.parser / decoders (llhttp in strict mode)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.errors import LocalProtocolError, RemoteProtocolError
from sidecar.core import headers as hdr
from sidecar.core.headers import (
    HOP_BY_HOP,
    check_framing,
    check_raw_head,
    connection_tokens,
    declared_length,
    decode_headers,
    encode_request_head,
    encode_response_head,
    find_head_end,
    split_hop_by_hop,
    strip_hop_by_hop,
)
from sidecar.http.decoders import ChunkedDecoder, EOFDecoder, LengthDecoder
from sidecar.http.parser import parse_request_head, parse_response_head

LIMITS = {"max_bytes": 60 * 1024, "max_count": 100}


def head(*lines: str, start: str = "GET / HTTP/1.1") -> bytes:
    return ("\r\n".join((start, *lines)) + "\r\n\r\n").encode("latin-1")


RAW_CASES = [
    ("plain", head("Host: a"), None),
    ("obs-text value", head("Host: a", "X: caf\xe9"), None),
    ("tab in value", head("Host: a", "X: a\tb"), None),
    ("CL in another value", head("Host: a", "X-Note: content-length: 3"), None),
    ("single CL", head("Host: a", "Content-Length: 3"), None),
    ("100 headers", head(*[f"X-{i}: v" for i in range(100)]), None),
    ("bare LF line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("bare LF head", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare CR", head("Host: a", "X: a\rb"), 400),
    ("NUL in value", head("Host: a", "X: a\x00b"), 400),
    ("control byte", head("Host: a", "X: a\x01b"), 400),
    ("DEL byte", head("Host: a", "X: a\x7fb"), 400),
    ("obs-fold space", head("Host: a", "X: a", " folded"), 400),
    ("obs-fold tab", head("Host: a", "X: a", "\tfolded"), 400),
    ("duplicate identical CL", head("Host: a", "Content-Length: 3", "Content-Length: 3"), 400),
    ("duplicate CL mixed case", head("Host: a", "content-length: 3", "CONTENT-LENGTH: 4"), 400),
    ("list-valued CL", head("Host: a", "Content-Length: 3, 3"), 400),
    ("101 headers", head(*[f"X-{i}: v" for i in range(101)]), 431),
    ("61 KiB head", head("Host: a", "X: " + "a" * 61 * 1024), 431),
]


@pytest.mark.parametrize(("name", "raw", "status"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_check_raw_head(name: str, raw: bytes, status: int | None) -> None:
    if status is None:
        check_raw_head(raw, **LIMITS)
        return
    with pytest.raises(RemoteProtocolError) as info:
        check_raw_head(raw, **LIMITS)
    assert info.value.status_hint == status


FRAMING_CASES = [
    ("no body", "1.1", [], None),
    ("CL", "1.1", [("content-length", "5")], None),
    ("chunked", "1.1", [("transfer-encoding", "chunked")], None),
    ("Chunked any case", "1.1", [("transfer-encoding", "Chunked")], None),
    ("HTTP/1.0 CL", "1.0", [("content-length", "5")], None),
    ("CL + TE", "1.1", [("content-length", "4"), ("transfer-encoding", "chunked")], 400),
    ("TE + CL", "1.1", [("transfer-encoding", "chunked"), ("content-length", "4")], 400),
    ("two CL", "1.1", [("content-length", "4"), ("content-length", "4")], 400),
    ("CL not a number", "1.1", [("content-length", "abc")], 400),
    ("CL negative", "1.1", [("content-length", "-1")], 400),
    ("CL plus sign", "1.1", [("content-length", "+4")], 400),
    ("CL hex", "1.1", [("content-length", "0x4")], 400),
    ("TE on HTTP/1.0", "1.0", [("transfer-encoding", "chunked")], 400),
    ("TE xchunked", "1.1", [("transfer-encoding", "xchunked")], 501),
    ("TE chunked, identity", "1.1", [("transfer-encoding", "chunked, identity")], 501),
    ("TE gzip", "1.1", [("transfer-encoding", "gzip")], 501),
    ("two TE", "1.1", [("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")], 501),
    ("HTTP/2.0 on HTTP/1", "2.0", [], 505),
    ("HTTP/0.9", "0.9", [], 505),
]


@pytest.mark.parametrize(
    ("name", "version", "headers", "status"), FRAMING_CASES, ids=[c[0] for c in FRAMING_CASES]
)
def test_check_framing(name: str, version: str, headers: list[tuple[str, str]], status: int | None) -> None:
    if status is None:
        length, chunked = check_framing(version, headers)
        assert chunked == any(n == "transfer-encoding" for n, _ in headers)
        assert length == next((int(v) for n, v in headers if n == "content-length"), None)
        return
    with pytest.raises(RemoteProtocolError) as info:
        check_framing(version, headers)
    assert info.value.status_hint == status


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 27),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", -1),
        (b"GET / HTTP/1.1\nHost: a\n\nrest", 24),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 26),
        (b"", -1),
    ],
)
def test_find_head_end(buf: bytes, expected: int) -> None:
    assert find_head_end(buf) == expected
    if expected > 0:  # resuming the scan from any earlier point finds the same end
        assert all(find_head_end(buf, max(0, s - 3)) == expected for s in range(expected))


def test_declared_length() -> None:
    assert declared_length([("host", "a")]) == 0
    assert declared_length([("content-length", "12")]) == 12
    assert declared_length([("transfer-encoding", "chunked")]) is None


def test_decode_headers_lowercases_and_keeps_latin1() -> None:
    assert decode_headers([(b"X-A", b"caf\xe9")]) == [("x-a", "caf\u00e9")]


def test_strip_hop_by_hop_example() -> None:
    headers = [
        ("host", "a"),
        ("connection", "keep-alive, X-Secret , close"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic x"),
        ("x-keep", "2"),
    ]
    assert strip_hop_by_hop(headers) == (("host", "a"), ("x-keep", "2"))
    assert connection_tokens(headers) == {"keep-alive", "x-secret", "close"}


def test_encode_response_head_replaces_framing_fields() -> None:
    headers = [
        ("content-type", "text/plain"),
        ("content-length", "99"),
        ("transfer-encoding", "gzip"),
        ("connection", "keep-alive"),
        ("x-v", "caf\u00e9"),
    ]
    out = encode_response_head(200, "OK", headers, length=5, chunked=False, close=True)
    assert out == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-v: caf\xe9\r\n"
        b"content-length: 5\r\nconnection: close\r\n\r\n"
    )
    chunked = encode_response_head(404, "Not Found", [], length=None, chunked=True, close=False)
    assert chunked == b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("x-a", "b\r\nset-cookie: evil")], "OK"),
        ([("x-a", "b\nc")], "OK"),
        ([("x-a", "b\rc")], "OK"),
        ([("x-a", "b\x00c")], "OK"),
        ([("x a", "b")], "OK"),
        ([("x-a:", "b")], "OK"),
        ([("x-a", "\u20ac")], "OK"),
        ([], "OK\r\nx-injected: 1"),
    ],
)
def test_encode_response_head_refuses_response_splitting(headers: list[tuple[str, str]], reason: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_response_head(200, reason, headers, length=0, chunked=False, close=False)
    assert info.value.status_hint == 500


NAMES = st.sampled_from(
    [*sorted(HOP_BY_HOP), "host", "x-a", "x-b", "content-length", "authorization", "x-secret"]
)
VALUES = st.text(alphabet="abc ,-", max_size=8)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    items = draw(st.lists(st.tuples(NAMES, VALUES), max_size=12))
    nominated = draw(st.lists(NAMES, max_size=3))
    if nominated:  # a Connection header naming other fields, with odd spacing and case
        pos = draw(st.integers(0, len(items)))
        items.insert(pos, ("connection", " , ".join(n.upper() for n in nominated)))
    return items


@given(header_lists())
def test_strip_never_leaves_hop_by_hop_and_keeps_order(items: list[tuple[str, str]]) -> None:
    out = strip_hop_by_hop(items)
    drop = HOP_BY_HOP | connection_tokens(items)
    assert not any(name in drop for name, _ in out)
    assert list(out) == [item for item in items if item[0] not in drop]
    assert strip_hop_by_hop(out) == out
    assert split_hop_by_hop(items) == (out, connection_tokens(items))


@given(st.binary(max_size=300))
def test_raw_check_only_raises_protocol_errors(junk: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\n" + junk + b"\r\n\r\n"
    try:
        check_raw_head(raw, max_bytes=1024, max_count=10)
    except RemoteProtocolError as exc:
        assert exc.status_hint in (400, 431)
    else:  # whatever passes has CRLF-only line ends, no fold, no control bytes
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
        assert b"\n " not in raw and b"\n\t" not in raw and b"\x00" not in raw


def test_module_is_pure() -> None:
    tree = ast.parse(Path(hdr.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & {"trio", "socket", "ssl", "h11"}


# -- encode_request_head ---------------------------------------------------------------------


def _request(headers: list[tuple[str, str]], **kw: object) -> tuple[bytes, int | None]:
    opts: dict = {"default_host": "svc:8080", "length": 0, "body_method": False, **kw}
    return encode_request_head("GET", "/a?b=1", headers, **opts)


def test_encode_request_head_framing_and_host() -> None:
    assert _request([("x-a", "1")]) == (b"GET /a?b=1 HTTP/1.1\r\nhost: svc:8080\r\nx-a: 1\r\n\r\n", 0)
    head, length = _request([("host", "h"), ("content-length", "9"), ("transfer-encoding", "gzip")], length=3)
    assert (head, length) == (b"GET /a?b=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\n\r\n", 3)
    assert _request([("host", "h")], body_method=True)[0].endswith(b"content-length: 0\r\n\r\n")
    assert _request([("host", "h"), ("content-length", "0")])[0].endswith(b"content-length: 0\r\n\r\n")
    assert _request([("host", "h"), ("content-length", " 7 ")], length=None) == (
        b"GET /a?b=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 7\r\n\r\n",
        7,
    )
    assert _request([("host", "h"), ("content-length", "x")], length=None) == (
        b"GET /a?b=1 HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n",
        None,
    )


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/", [("x-a", "b\r\nx-injected: 1")]),
        ("GET", "/", [("x-a", "b\nc")]),
        ("GET", "/", [("x-a", "b\x00c")]),
        ("GET", "/", [("x a", "b")]),
        ("GET", "/", [("x-a", "\u20ac")]),
        ("GET", "/a b", []),
        ("GET", "/a\r\nx-injected: 1", []),
        ("GET", "", []),
        ("G T", "/", []),
        ("GET /x HTTP/1.1\r\n", "/", []),
    ],
)
def test_encode_request_head_refuses_smuggling(method: str, target: str, headers: list) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_request_head(method, target, headers, default_host="h", length=0, body_method=False)
    assert info.value.status_hint == 500


# -- sidecar.http.parser: heads ----------------------------------------------------------------


def test_parse_request_head() -> None:
    req = parse_request_head(
        head("Host: a", "X-Sp:  v \t", "X-Empty:", "Expect: 100-Continue", start="PUT /u HTTP/1.1")
    )
    assert (req.method, req.target, req.version) == ("PUT", "/u", "1.1")
    assert req.headers == [("host", "a"), ("x-sp", "v"), ("x-empty", ""), ("expect", "100-Continue")]
    assert (req.length, req.chunked, req.expect_100, req.upgrade) == (0, False, True, False)
    chunked = parse_request_head(head("Host: a", "Transfer-Encoding: Chunked", "Upgrade: ws"))
    assert (chunked.length, chunked.chunked, chunked.upgrade) == (None, True, True)
    assert parse_request_head(head("Content-Length: 12", start="POST / HTTP/1.0")).length == 12
    # methods llhttp does not know pass, as they did with h11 (the start line is ours to check)
    assert parse_request_head(head("Host: a", start="FOO /x HTTP/1.1")).method == "FOO"
    assert parse_request_head(head("Host: a", start="CONNECT a:443 HTTP/1.1")).upgrade


REQUEST_REFUSALS = [
    ("two spaces", head("Host: a", start="GET  / HTTP/1.1"), 400),
    ("no version", head("Host: a", start="GET /"), 400),
    ("lower-case version", head("Host: a", start="GET / http/1.1"), 400),
    ("obs-text target", head("Host: a", start="GET /caf\xe9 HTTP/1.1"), 400),
    ("HTTP/2.0", head("Host: a", start="GET / HTTP/2.0"), 505),
    ("HTTP/1.2", head("Host: a", start="GET / HTTP/1.2"), 505),
    ("space before colon", head("Host: a", "X-A : b"), 400),
    ("empty name", head("Host: a", ": b"), 400),
    ("no colon", head("Host: a", "Foo"), 400),
    ("non-token name", head("Host: a", "X(: b"), 400),
    ("missing host", head("X: b"), 400),
    ("two hosts", head("Host: a", "Host: b"), 400),
    ("CL + TE", head("Host: a", "Content-Length: 3", "Transfer-Encoding: chunked"), 400),
    ("TE + CL", head("Host: a", "Transfer-Encoding: chunked", "Content-Length: 3"), 400),
    ("CL plus", head("Host: a", "Content-Length: +3"), 400),
    ("CL overflow", head("Host: a", "Content-Length: 99999999999999999999"), 400),
    ("TE gzip", head("Host: a", "Transfer-Encoding: gzip"), 501),
    ("TE chunked, identity", head("Host: a", "Transfer-Encoding: chunked, identity"), 501),
    ("TE twice", head("Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 501),
    ("TE on HTTP/1.0", head("Transfer-Encoding: chunked", start="POST / HTTP/1.0"), 400),
    ("TE gzip on HTTP/1.0", head("Transfer-Encoding: gzip", start="POST / HTTP/1.0"), 501),
]


@pytest.mark.parametrize(("name", "raw", "status"), REQUEST_REFUSALS, ids=[c[0] for c in REQUEST_REFUSALS])
def test_parse_request_head_refusals(name: str, raw: bytes, status: int) -> None:
    check_raw_head(raw, **LIMITS)  # what the raw checks let through, the parser refuses
    with pytest.raises(RemoteProtocolError) as info:
        parse_request_head(raw)
    assert info.value.status_hint == status


def test_parse_response_head() -> None:
    resp = parse_response_head(head("Content-Length: 5", "X: caf\xe9 ", start="HTTP/1.1 404 Not Found"))
    assert (resp.status, resp.reason, resp.version, resp.length, resp.chunked) == (
        404,
        "Not Found",
        "1.1",
        5,
        False,
    )
    assert resp.headers == [("content-length", "5"), ("x", "caf\u00e9")]
    assert parse_response_head(head(start="HTTP/1.0 200")).reason == ""
    assert parse_response_head(head("Transfer-Encoding: chunked", start="HTTP/1.1 200 OK")).chunked
    assert parse_response_head(head(start="HTTP/1.1 100 Continue")).status == 100
    for start in ("HTTP/1.1 099 Low", "HTTP/1.1 2000 OK", "SSH-2.0-OpenSSH_9.6", "HTTP/2.0 200 OK"):
        with pytest.raises(RemoteProtocolError):
            parse_response_head(head(start=start))
    with pytest.raises(RemoteProtocolError):
        parse_response_head(head("Bad Header", start="HTTP/1.1 200 OK"))


@given(st.binary(max_size=200))
def test_parsers_only_raise_protocol_errors(junk: bytes) -> None:
    for parse, start in ((parse_request_head, b"GET / HTTP/1.1"), (parse_response_head, b"HTTP/1.1 200 OK")):
        raw = start + b"\r\nHost: a\r\n" + junk + b"\r\n\r\n"
        try:
            check_raw_head(raw, max_bytes=1024, max_count=20)
            parsed = parse(raw)
        except RemoteProtocolError:
            continue
        assert len(parsed.headers) == raw.count(b"\r\n") - 2  # every header line became one field


# -- sidecar.http.parser: bodies ---------------------------------------------------------------

NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


def _decode_in_pieces(body: bytes, cut: list[int]) -> tuple[bytes, bytes]:
    """Feed ``body`` cut at the offsets ``cut``; the payload and what came after the body."""
    decoder, payload, rest = ChunkedDecoder(), b"", b""
    bounds = [0, *cut, len(body)]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue  # b"" would mean EOF
        if decoder.done:
            rest += body[a:b]
            continue
        got, after = decoder.feed(body[a:b])
        payload, rest = payload + got, rest + after
    assert decoder.done
    return payload, rest


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b"3\r\nabc\r\n0\r\n\r\n", b"abc"),
        (b"4\r\n\r\n\r\n\r\nA\r\n" + b"\r\n" * 5 + b"\r\n0\r\n\r\n", b"\r\n\r\n" + b"\r\n" * 5),
        (b"3;ext=1\r\nabc\r\n0;last\r\nTrailer: v\r\nT2: w\r\n\r\n", b"abc"),
        (b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n", b"0123456789" * 2),
        (b"0\r\n\r\n", b""),
    ],
)
def test_chunked_decoder_finds_the_end_at_any_split(body: bytes, payload: bytes) -> None:
    """The bytes after the body (a pipelined request) come back untouched, wherever reads end;
    a CRLF CRLF inside chunk data does not end the body."""
    data = body + NEXT
    for i in range(len(data) + 1):
        assert _decode_in_pieces(data, [i]) == (payload, NEXT)
    assert _decode_in_pieces(data, list(range(1, len(data)))) == (payload, NEXT)


CHUNKED_REFUSALS = [
    ("bad footer (CVE-2025-43859)", b"3\r\nabcXX0\r\n\r\n"),
    ("data longer than size", b"3\r\nabcd\r\n0\r\n\r\n"),
    ("bare LF after size", b"3\nabc\r\n0\r\n\r\n"),
    ("bare LF after data", b"3\r\nabc\n0\r\n\r\n"),
    ("bare CR after data", b"3\r\nabc\r0\r\n\r\n"),
    ("bare LF ends trailers", b"3\r\nabc\r\n0\r\n\n"),
    ("space after size", b"3 \r\nabc\r\n0\r\n\r\n"),
    ("hex prefix", b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("negative size", b"-3\r\nabc\r\n0\r\n\r\n"),
    ("not hex", b"zz\r\nabc\r\n0\r\n\r\n"),
    ("size overflow", b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    ("obs-fold in trailers", b"0\r\nT: v\r\n folded\r\n\r\n"),
    ("space before trailer colon", b"0\r\nT : v\r\n\r\n"),
]


@pytest.mark.parametrize(("name", "body"), CHUNKED_REFUSALS, ids=[c[0] for c in CHUNKED_REFUSALS])
def test_chunked_decoder_is_strict(name: str, body: bytes) -> None:
    """llhttp runs without leniencies: each of these is a 400, whole or byte by byte."""
    for pieces in ([body], [body[i : i + 1] for i in range(len(body))]):
        decoder = ChunkedDecoder()
        with pytest.raises(RemoteProtocolError) as info:
            for piece in pieces:
                decoder.feed(piece)
            decoder.feed(b"")  # EOF: an unfinished body is an error too
        assert info.value.status_hint == 400


def test_chunked_decoder_bounds_extensions_and_trailers() -> None:
    """Bytes that carry no payload (chunk extensions, trailers) are capped, as h11 capped them."""
    for framing in (b"1;" + b"e" * 5000, b"1\r\nx\r\n0\r\nT: " + b"v" * 5000):
        decoder = ChunkedDecoder(max_framing=4096)
        with pytest.raises(RemoteProtocolError):
            for i in range(0, len(framing), 512):
                decoder.feed(framing[i : i + 512])
    decoder = ChunkedDecoder(max_framing=4096)  # payload resets the count
    for _ in range(100):
        assert decoder.feed(b"1;" + b"e" * 1000 + b"\r\nx\r\n") == (b"x", b"")


def test_length_and_eof_decoders() -> None:
    decoder = LengthDecoder(5)
    assert decoder.feed(b"abc") == (b"abc", b"") and not decoder.done
    assert decoder.feed(b"deNEXT") == (b"de", b"NEXT") and decoder.done
    assert decoder.feed(b"more") == (b"", b"more")
    short = LengthDecoder(5)
    short.feed(b"ab")
    with pytest.raises(RemoteProtocolError):
        short.feed(b"")  # EOF before the end
    assert LengthDecoder(0).done
    eof = EOFDecoder()
    assert eof.feed(b"abc") == (b"abc", b"") and not eof.done
    assert eof.feed(b"") == (b"", b"") and eof.done
    chunked = ChunkedDecoder()
    chunked.feed(b"3\r\nab")
    with pytest.raises(RemoteProtocolError):
        chunked.feed(b"")
