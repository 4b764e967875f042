"""HTTP/2 header lists <-> the mesh's message heads. Pure: no trio, socket or ssl.

RFC 9113 §8.3 pseudo-headers map to ``RequestHead``: ``:method``, ``:path`` (the target),
``:authority`` (becomes ``host`` when the request has none, so routing and HTTP/1.1 upstreams
see it; RFC 9113 §8.3.1), ``http_version="2"``. Several ``cookie`` fields are joined with
``"; "`` (RFC 9113 §8.2.3) so an HTTP/1.1 upstream gets one. Connection-specific fields
(``sidecar.core.headers.HOP_BY_HOP``) are never forwarded in either direction; the ``h2``
library already refuses them on input (``validate_inbound_headers``).

Errors: ``RemoteProtocolError`` with ``status_hint`` 431 (header list over ``max_bytes`` /
``max_count``, Envoy's limits) or 400 (missing pseudo-header); ``LocalProtocolError`` (500)
for a response or request head we may not send (CR, LF or NUL in a value).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshd.errors import LocalProtocolError, RemoteProtocolError
from sidecar.core.headers import HOP_BY_HOP
from sidecar.http.messages import RequestHead, ResponseHead

Raw = Iterable[tuple[bytes, bytes]]
Header = tuple[str, str]
_NOT_FORWARDED = HOP_BY_HOP | {"host"}  # host becomes :authority on HTTP/2
_BAD_VALUE = ("\r", "\n", "\x00")


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


def response_headers(head: ResponseHead) -> list[Header]:
    """The HEADERS list of a response: ``:status`` then the forwardable fields."""
    out = [(":status", str(head.status))]
    out.extend(_forwardable(head.headers, "response"))
    return out


def request_headers(head: RequestHead, scheme: str, default_authority: str) -> list[Header]:
    """The HEADERS list of an upstream request (``te: trailers`` added: the sidecar passes
    trailers through, and gRPC servers require it)."""
    if head.method == "CONNECT":
        raise LocalProtocolError("CONNECT is not forwarded over HTTP/2", 500)
    out = [(":method", head.method), (":scheme", scheme),
           (":authority", head.authority or default_authority), (":path", head.path)]
    out.extend(_forwardable(head.headers, "request"))
    out.append(("te", "trailers"))
    return out


def trailer_headers(trailers: Iterable[Header]) -> list[Header]:
    """Trailers to send: forwardable, no pseudo-headers (RFC 9113 §8.1)."""
    return [h for h in _forwardable(trailers, "trailer") if not h[0].startswith(":")]


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


def _forwardable(headers: Iterable[Header], what: str) -> list[Header]:
    out = []
    for name, value in headers:
        if name in _NOT_FORWARDED:
            continue
        if any(c in value for c in _BAD_VALUE):
            raise LocalProtocolError(f"CR, LF or NUL in {what} header {name!r}", 500)
        out.append((name.lower(), value))
    return out
