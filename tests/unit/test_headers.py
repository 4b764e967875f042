"""Pure tests of sidecar.core.headers: raw-head checks, framing checks, hop-by-hop stripping."""

from __future__ import annotations

import ast
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
    encode_response_head,
    find_head_end,
    strip_hop_by_hop,
)

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
        check_framing(version, headers)
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
