"""SNI/ALPN from a TLS ClientHello (sidecar.core.sni): real hellos from OpenSSL, generated
hellos, every prefix, fragmentation across records, and garbage that must never crash it."""

from __future__ import annotations

import functools
import ssl
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.sni import MAX_CLIENT_HELLO, ClientHello, NotClientHello, parse_client_hello


@functools.cache
def openssl_hello(name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if name is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def make_hello(name: bytes | None, alpn: tuple[bytes, ...] = (), record_size: int = 2**14) -> bytes:
    exts = b""
    if name is not None:
        exts += struct.pack(">H", 0) + _vec(2, _vec(2, b"\x00" + _vec(2, name)))
    if alpn:
        exts += struct.pack(">H", 16) + _vec(2, _vec(2, b"".join(_vec(1, p) for p in alpn)))
    body = b"\x03\x03" + b"r" * 32 + _vec(1, b"") + _vec(2, b"\x13\x01") + _vec(1, b"\x00") + _vec(2, exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(hs), record_size):
        frag = hs[i:i + record_size]
        out += b"\x16\x03\x01" + len(frag).to_bytes(2, "big") + frag
    return out


def test_openssl_hellos() -> None:
    hello = openssl_hello("API.Example.com", ("h2", "http/1.1"))
    got = parse_client_hello(hello + b"trailing application bytes")
    assert got == ClientHello(sni="api.example.com", alpn=("h2", "http/1.1"), size=len(hello))
    assert parse_client_hello(openssl_hello(None)) == ClientHello(None, (), len(openssl_hello(None)))


def test_every_prefix_asks_for_more() -> None:
    hello = openssl_hello("db.internal.example", ("meshd-tcp",))
    for i in range(len(hello)):
        assert parse_client_hello(hello[:i]) is None
    assert parse_client_hello(hello).sni == "db.internal.example"


@pytest.mark.parametrize("record_size", [1, 7, 100])
def test_hello_fragmented_across_records(record_size: int) -> None:
    data = make_hello(b"frag.example.", (b"h2",), record_size)
    got = parse_client_hello(data)
    assert got is not None and got.sni == "frag.example" and got.alpn == ("h2",) and got.size == len(data)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n", b"\x16\x02\x01\x00\x05", b"\x16\x03\x01\x00\x00",
    b"\x17\x03\x03\x00\x05hello", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
    make_hello(b"bad_name!"), make_hello(b"a..b"), make_hello(b""),
    b"\x16\x03\x01\x00\x08\x01\xff\xff\xff\x03\x03\x00\x00",
])
def test_rejects(data: bytes) -> None:
    with pytest.raises(NotClientHello):
        parse_client_hello(data)


def test_oversized_hello_is_rejected_not_buffered_forever() -> None:
    declared = (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")  # a hello announcing > 64 KiB
    with pytest.raises(NotClientHello):
        parse_client_hello(b"\x16\x03\x01\x00\x04\x01" + declared)
    endless = b"".join(b"\x16\x03\x01\x00\x01\x01" for _ in range(MAX_CLIENT_HELLO // 6 + 20))
    with pytest.raises(NotClientHello):  # 1-byte records never completing the hello header
        parse_client_hello(endless)


_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@given(st.lists(_label, min_size=1, max_size=5), st.lists(st.binary(min_size=1, max_size=10), max_size=3),
       st.integers(1, 300))
def test_generated_hellos_round_trip(labels: list[str], alpn: list[bytes], record_size: int) -> None:
    name = ".".join(labels)
    data = make_hello(name.encode(), tuple(alpn), record_size)
    got = parse_client_hello(data)
    assert got is not None and got.sni == name and got.size == len(data)
    assert got.alpn == tuple(p.decode("latin-1") for p in alpn)


@given(st.binary(max_size=600))
def test_garbage_never_crashes(data: bytes) -> None:
    try:
        parse_client_hello(data)
    except NotClientHello:
        pass


@given(st.integers(0, 400), st.binary(min_size=1, max_size=4))
def test_corrupted_hellos_never_crash(pos: int, junk: bytes) -> None:
    data = bytearray(openssl_hello("corrupt.example", ("h2",)))
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    try:
        got = parse_client_hello(bytes(data))
    except NotClientHello:
        return
    assert got is None or isinstance(got, ClientHello)
