"""Server Name Indication from a TLS ClientHello, as pure code over bytes (no ssl import).

``parse_client_hello(data)`` reads the first TLS record(s) a client sends and answers:

* ``None`` — ``data`` is a consistent prefix of a ClientHello: read more bytes;
* ``ClientHello(sni, alpn, size)`` — the server name (lower case, trailing dot dropped; ``None``
  when the client sent none), the offered ALPN protocols, and the bytes the hello took;
* raises ``NotClientHello`` — anything else: not TLS, another handshake message, a length
  that does not fit, a malformed extension, a hello over ``MAX_CLIENT_HELLO`` bytes.

Layout (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2; SNI RFC 6066 §3; ALPN RFC 7301 §3.1)::

    record:     type 0x16 | version 0x03xx | length u16     (a hello may span several records)
    handshake:  type 0x01 | length u24 | client_version u16 | random[32]
                | session_id <u8> | cipher_suites <u16> | compression <u8> | extensions <u16>
    extension:  type u16 | data <u16>; server_name = 0, ALPN = 16

Like Envoy's ``tls_inspector``, the parser only looks, never answers: the bytes are forwarded
untouched (TLS passthrough). It never raises anything but ``NotClientHello`` on any input.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CLIENT_HELLO = 64 * 1024   # Envoy tls_inspector max_client_hello_size default (64 KiB)
_RECORD_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0
_MAX_RECORD = 2**14 + 256      # RFC 8446 §5.1 plaintext limit plus slack (TLS 1.2 allowed 2^14+2048)
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-._")


class NotClientHello(ValueError):
    """The bytes are not (the start of) a well-formed TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    size: int  # bytes of the records that carried the hello


def _handshake_bytes(data: bytes) -> tuple[bytes, int] | None:
    """Concatenated handshake fragments of the leading records until the hello is complete,
    and the bytes consumed; None when more records are needed."""
    body, pos, need = bytearray(), 0, -1
    while need < 0 or len(body) < need:
        if len(data) - pos < 5:
            _check_record_prefix(data[pos:])
            return None
        rtype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if rtype != _RECORD_HANDSHAKE or major != 3 or not 0 < length <= _MAX_RECORD:
            raise NotClientHello("not a TLS handshake record")
        if len(data) - pos - 5 < length:
            _check_fragment(body + data[pos + 5:])
            return None
        body += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if need < 0 and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                raise NotClientHello("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise NotClientHello(f"ClientHello larger than {MAX_CLIENT_HELLO} bytes")
    return bytes(body[4:need]), pos


def _check_record_prefix(head: bytes) -> None:
    if head and head[0] != _RECORD_HANDSHAKE:
        raise NotClientHello("not a TLS handshake record")
    if len(head) > 1 and head[1] != 3:
        raise NotClientHello("not a TLS record version")


def _check_fragment(fragment: bytes | bytearray) -> None:
    if fragment and fragment[0] != _CLIENT_HELLO:
        raise NotClientHello("first handshake message is not a ClientHello")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NotClientHello("length runs past the end of the ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.uint(n))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _server_name(data: bytes) -> str | None:
    r = _Reader(data)
    names = _Reader(r.vector(2))
    if r.left:
        raise NotClientHello("trailing bytes in server_name")
    while names.left:
        kind, name = names.uint(1), names.vector(2)
        if kind == _HOST_NAME:
            return _host(name)
    return None


def _host(raw: bytes) -> str:
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > 253 or not set(name) <= _NAME_CHARS or b".." in name:
        raise NotClientHello("server_name is not a DNS host name")
    return name.decode("ascii")


def _alpn(data: bytes) -> tuple[str, ...]:
    r = _Reader(data)
    protos = _Reader(r.vector(2))
    out = []
    while protos.left:
        proto = protos.vector(1)
        if not proto:
            raise NotClientHello("empty ALPN protocol name")
        out.append(proto.decode("latin-1"))
    return tuple(out)


def _extensions(r: _Reader) -> tuple[str | None, tuple[str, ...]]:
    sni, alpn, seen = None, (), set()
    if not r.left:  # extensions are optional before TLS 1.3
        return sni, alpn
    exts = _Reader(r.vector(2))
    if r.left:
        raise NotClientHello("trailing bytes after the extensions")
    while exts.left:
        kind, data = exts.uint(2), exts.vector(2)
        if kind in seen:
            raise NotClientHello(f"duplicate extension {kind}")  # RFC 8446 §4.2
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            sni = _server_name(data)
        elif kind == _EXT_ALPN:
            alpn = _alpn(data)
    return sni, alpn


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of ``data``; None if incomplete. Raises NotClientHello."""
    found = _handshake_bytes(bytes(data[:MAX_CLIENT_HELLO + 5 * 8]))
    if found is None:
        if len(data) > MAX_CLIENT_HELLO + 5 * 8:
            raise NotClientHello(f"ClientHello larger than {MAX_CLIENT_HELLO} bytes")
        return None
    body, size = found
    r = _Reader(body)
    if r.uint(1) != 3:
        raise NotClientHello("client_version is not 3.x")
    r.take(1 + 32)
    session = r.vector(1)
    if len(session) > 32:
        raise NotClientHello("session_id longer than 32 bytes")
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise NotClientHello("bad cipher_suites")
    if not r.vector(1):
        raise NotClientHello("no compression methods")
    sni, alpn = _extensions(r)
    return ClientHello(sni=sni, alpn=alpn, size=size)
