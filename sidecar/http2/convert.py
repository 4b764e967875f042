"""HTTP/2 header lists <-> the mesh's message heads. Pure: no trio, socket or ssl.

RFC 9113 §8.3 pseudo-headers map to ``RequestHead``: ``:method``, ``:path`` (the target),
``:authority`` (becomes ``host`` when the request has none, so routing and HTTP/1.1 upstreams
see it; RFC 9113 §8.3.1), ``http_version="2"``. Several ``cookie`` fields are joined with
``"; "`` (RFC 9113 §8.2.3) so an HTTP/1.1 upstream gets one. Connection-specific fields
(``sidecar.core.headers.HOP_BY_HOP``) are never forwarded in either direction; the ``h2``
library already refuses them on input (``validate_inbound_headers``).

Outgoing lists are ``(bytes, bytes)`` (latin-1, so obs-text bytes pass unchanged) checked here
as RFC 9113 §8.2 requires (lowercase token names, no CR/LF/NUL, no surrounding whitespace,
no connection-specific fields), so the ``h2`` connections skip their own outbound validation
(``sidecar.http2.h2conn``); ``authorization`` and short cookies are HPACK never-indexed.

Errors: ``RemoteProtocolError`` with ``status_hint`` 431 (header list over ``max_bytes`` /
``max_count``, Envoy's limits) or 400 (missing pseudo-header); ``LocalProtocolError`` (500)
for a response or request head we may not send (CR, LF or NUL in a value).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hpack import NeverIndexedHeaderTuple

from meshd.errors import LocalProtocolError, RemoteProtocolError
from sidecar.core.headers import HOP_BY_HOP
from sidecar.http.messages import RequestHead, ResponseHead

Raw = Iterable[tuple[bytes, bytes]]
Header = tuple[str, str]
Field = tuple[bytes, bytes]  # an outgoing HEADERS entry, ready for h2 (no re-validation there)
_NOT_FORWARDED = HOP_BY_HOP | {"host"}  # host becomes :authority on HTTP/2
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 §5.6.2 token, lowercase (RFC 9113 §8.2.1)
_BAD_VALUE = re.compile(r"[\r\n\x00]")  # RFC 9113 §8.2.1
_OWS = " \t"
# HPACK never-indexed (RFC 7541 §7.1.3), as h2's normalize_outbound_headers (_secure_headers)
_SENSITIVE = frozenset({"authorization", "proxy-authorization"})
_SHORT_COOKIE = 20  # h2: cookie values shorter than this are never indexed (guessable)
_TE_TRAILERS = (b"te", b"trailers")


def request_head(raw: Raw, *, max_bytes: int, max_count: int) -> RequestHead:
    """The ``RequestHead`` of a received HEADERS block (names and values as bytes)."""
    pseudo: dict[bytes, str] = {}
    headers: list[Header] = []
    cookies: list[str] = []
    size = count = 0
    host = False
    for name, value in raw:
        size += len(name) + len(value)
        if name[:1] == b":":
            pseudo[name] = value.decode("latin-1")
            continue
        count += 1
        key = name.decode("latin-1")
        if key == "cookie":
            cookies.append(value.decode("latin-1"))
        elif key not in HOP_BY_HOP:
            host = host or key == "host"
            headers.append((key, value.decode("latin-1")))
    if size > max_bytes or count > max_count:
        raise RemoteProtocolError(f"header list of {count} fields, {size} bytes over the limit", 431)
    method = pseudo.get(b":method")
    authority = pseudo.get(b":authority", "")
    target = authority if method == "CONNECT" else pseudo.get(b":path")
    if not method or not target:
        raise RemoteProtocolError("request without :method or :path", 400)
    if method == "CONNECT":  # tunnels (and RFC 8441 WebSockets) are HTTP/1.1-only in the mesh
        raise RemoteProtocolError("CONNECT over HTTP/2 is not supported", 501)
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    if authority and not host:
        headers.insert(0, ("host", authority))
    return RequestHead(method, target, tuple(headers), "2")


def response_headers(head: ResponseHead) -> list[Field]:
    """The HEADERS list of a response: ``:status`` then the forwardable fields."""
    out: list[Field] = [(b":status", b"%d" % head.status)]
    _forwardable(head.headers, "response", out)
    return out


def request_headers(head: RequestHead, scheme: str, default_authority: str) -> list[Field]:
    """The HEADERS list of an upstream request (``te: trailers`` added: the sidecar passes
    trailers through, and gRPC servers require it)."""
    if head.method == "CONNECT":
        raise LocalProtocolError("CONNECT is not forwarded over HTTP/2", 500)
    authority = head.authority or default_authority
    out: list[Field] = [(b":method", _encode(head.method, ":method")), (b":scheme", scheme.encode()),
                        (b":authority", _encode(authority, ":authority")),
                        (b":path", _encode(head.path, ":path"))]
    _forwardable(head.headers, "request", out)
    out.append(_TE_TRAILERS)
    return out


def trailer_headers(trailers: Iterable[Header]) -> list[Field]:
    """Trailers to send: forwardable, no pseudo-headers (RFC 9113 §8.1)."""
    out: list[Field] = []
    _forwardable((h for h in trailers if not h[0].startswith(":")), "trailer", out)
    return out


def response_head(raw: Raw) -> ResponseHead:
    """The ``ResponseHead`` of a received response HEADERS block."""
    status, headers = 0, []
    for name, value in raw:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name[:1] != b":" and name.decode("latin-1") not in HOP_BY_HOP:
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
    if not 100 <= status <= 999:
        raise RemoteProtocolError("response without a valid :status", 502)
    return ResponseHead(status, tuple(headers))


def trailers_of(raw: Raw) -> tuple[Header, ...]:
    return tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw if n[:1] != b":")


def _forwardable(headers: Iterable[Header], what: str, out: list[Field]) -> None:
    """Append the fields of ``headers`` that may be sent on HTTP/2 to ``out``, encoded."""
    for name, value in headers:
        name = name.lower()
        if name in _NOT_FORWARDED:
            continue
        if not _NAME.fullmatch(name):
            raise LocalProtocolError(f"invalid {what} header name {name!r}", 500)
        if value and (value[0] in _OWS or value[-1] in _OWS):
            value = value.strip(_OWS)
        field = (name.encode("ascii"), _encode(value, name, what))
        if name in _SENSITIVE or (name == "cookie" and len(value) < _SHORT_COOKIE):
            field = NeverIndexedHeaderTuple(*field)
        out.append(field)


def _encode(value: str, name: str, what: str = "request") -> bytes:
    if _BAD_VALUE.search(value):
        raise LocalProtocolError(f"CR, LF or NUL in {what} header {name!r}", 500)
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # text a handler made: UTF-8, as h2 would have sent it
        return value.encode("utf-8")
