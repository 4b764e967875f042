"""Header sanitising and framing checks for HTTP/1.x heads. Pure: no trio, socket or ssl.

Two layers, both raising ``RemoteProtocolError(msg, status_hint)``:

* ``check_raw_head(head, ...)`` runs on the raw bytes of one complete head, *before* the
  parser (``sidecar.http.parser``) sees it, and rejects what parsers let through or silently
  repair (style-and-reliability §B.4): obs-fold, bare LF or CR, control bytes, duplicate or
  list-valued Content-Length (h11 collapses ``Content-Length: 3`` twice, or ``3, 3``, into
  one), plus the size and count caps (431), enforced at every read size.
* ``check_framing(http_version, headers)`` runs on decoded headers and rejects ambiguous
  body framing: Content-Length with Transfer-Encoding (RFC 9112 §6.1, Envoy's default),
  Transfer-Encoding on HTTP/1.0, any coding but ``chunked`` (501), versions but 1.0/1.1 (505).

``encode_response_head`` / ``encode_request_head`` serialise a head with the framing decided by
the caller and refuse CR/LF/NUL (response splitting, request smuggling) and names that are not
tokens. ``strip_hop_by_hop`` removes the RFC 9110 §7.6.1 connection-specific fields before a
head is forwarded. ``check_target`` enforces the request-target forms and Host agreement of
RFC 9112 §3.2; ``forwarded_headers`` sets ``x-forwarded-*`` and drops client-supplied internal
headers as Envoy's header sanitizing does (``docs/security.md`` lists every rule). Headers are
``(name, value)`` tuples: lower-case ``str`` names, latin-1 values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from meshd.errors import LocalProtocolError, RemoteProtocolError

Header = tuple[str, str]

#: Connection-specific fields never forwarded (RFC 9110 §7.6.1, RFC 9112 §7.1, RFC 7230 §6.1).
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

#: Control bytes other than HTAB; CR and LF are checked separately (they must pair up).
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CTL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # the same set, for translate
_CL_LINE = b"\ncontent-length:"
_DIGITS = re.compile(r"[0-9]{1,19}")  # h11 caps Content-Length at 20 digits; 19 fits an int64
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_TARGET = re.compile(r"[\x21-\x7e]+")  # request-target: visible ASCII (h11's rule)
_NO_TOKENS: frozenset[str] = frozenset()
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_TOKENS_SEEN: set[str] = set()  # header names already validated (names repeat on every response)
_TOKENS_SEEN_MAX = 4096
_CONNECTION_VALUES: dict[str, frozenset[str]] = {}  # Connection value -> its tokens ("keep-alive")


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line that ends a head in ``buf``, or -1 if none yet.

    Accepts a bare-LF blank line too, so a bare-LF head is *found* (and then rejected by
    ``check_raw_head``) instead of waiting for the size limit or the header timeout.
    ``start`` lets a reader resume the search without rescanning (pass ``len(old) - 3``).
    """
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start, crlf + 2 if crlf >= 0 else len(buf))
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


def check_raw_head(head: bytes, *, max_bytes: int, max_count: int) -> None:
    """Reject a raw head (start line through the blank line) that is too big or ambiguous.

    Raises ``RemoteProtocolError`` with status_hint 431 when ``len(head) > max_bytes`` or it
    has more than ``max_count`` header lines; 400 for bare CR/LF, control bytes (NUL included),
    obs-fold continuation lines, several Content-Length lines, or a list-valued one.
    """
    if len(head) > max_bytes:
        raise RemoteProtocolError(f"head is {len(head)} bytes, limit {max_bytes}", 431)
    crlf = head.count(b"\r\n")
    if crlf != head.count(b"\n") or crlf != head.count(b"\r"):
        raise RemoteProtocolError("bare CR or LF in head (lines must end with CRLF)", 400)
    if len(head.translate(None, _CTL_BYTES)) != len(head):  # cheaper than the regex search
        bad = _CTL.search(head)
        raise RemoteProtocolError(f"control byte {bad.group() if bad else b'?'!r} in head", 400)
    if b"\n " in head or b"\n\t" in head:
        raise RemoteProtocolError("obs-fold line folding in head (RFC 9112 §5.2)", 400)
    if crlf - 2 > max_count:
        raise RemoteProtocolError(f"{crlf - 2} header lines, limit {max_count}", 431)
    lower = head.lower()
    n_cl = lower.count(_CL_LINE)
    if n_cl > 1:
        raise RemoteProtocolError("several Content-Length header lines", 400)
    if n_cl == 1:
        start = lower.index(_CL_LINE) + len(_CL_LINE)
        if b"," in head[start : head.index(b"\r", start)]:
            raise RemoteProtocolError("list-valued Content-Length", 400)


def encode_response_head(
    status: int,
    reason: str,
    headers: Iterable[Header],
    *,
    length: int | None,
    chunked: bool,
    close: bool,
) -> bytes:
    """Serialise an HTTP/1.1 response head: status line, ``headers``, framing, blank line.

    The framing and persistence fields of ``headers`` (Content-Length, Transfer-Encoding,
    Connection, Keep-Alive) are replaced by ``content-length: <length>`` when ``length`` is not
    None, else ``transfer-encoding: chunked`` when ``chunked``, plus ``connection: close`` when
    ``close``. Raises ``LocalProtocolError`` (500) for a name that is not a token, or CR, LF or
    NUL anywhere (response splitting), or text that is not latin-1: nothing may be sent then.
    """
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        if name in _FRAMING_FIELDS:
            continue
        if name not in _TOKENS_SEEN:
            _check_token(name)
        lines.append(f"{name}: {value}\r\n")
    if length is not None:
        lines.append(f"content-length: {length}\r\n")
    elif chunked:
        lines.append("transfer-encoding: chunked\r\n")
    if close:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    return _finish(lines, "response")


def encode_request_head(
    method: str,
    target: str,
    headers: Iterable[Header],
    *,
    default_host: str,
    length: int | None,
    body_method: bool,
) -> tuple[bytes, int | None]:
    """Serialise an HTTP/1.1 request head; return it and the body length it declares.

    Content-Length and Transfer-Encoding of ``headers`` are replaced: the body is ``length``
    bytes if known, else a numeric Content-Length of ``headers``, else chunked (None is
    returned). ``content-length`` is written for a non-zero length, when ``headers`` had one, or
    when ``body_method`` (POST/PUT/PATCH, RFC 9110 §8.6). ``host: default_host`` comes first
    when ``headers`` has no Host. Raises ``LocalProtocolError`` (500) for a method or name that is
    not a token, a target that is not visible ASCII, CR/LF/NUL anywhere, or non-latin-1 text.
    """
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    declared, has_host = None, False
    for name, value in headers:
        if name == "content-length":
            declared = value
            continue
        if name == "transfer-encoding":
            continue
        if name == "host":
            has_host = True
        elif name not in _TOKENS_SEEN:
            _check_token(name)
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.insert(1, f"host: {default_host}\r\n")
    if length is None and declared is not None and _DIGITS.fullmatch(declared.strip(" \t")):
        length = int(declared)
    if length is None:
        lines.append("transfer-encoding: chunked\r\n")
    elif length or declared is not None or body_method:
        lines.append(f"content-length: {length}\r\n")
    lines.append("\r\n")
    if method not in _TOKENS_SEEN:
        _check_token(method, "method")
    if not _TARGET.fullmatch(target):
        raise LocalProtocolError(f"invalid request target {target!r}", 500)
    return _finish(lines, "request"), length


def _finish(lines: list[str], what: str) -> bytes:
    """Join head lines; refuse CR, LF or NUL inside a line, and text that is not latin-1."""
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\x00" in text:
        raise LocalProtocolError(f"CR, LF or NUL in a {what} head", 500)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} head is not latin-1: {exc}", 500) from exc


def _check_token(name: str, what: str = "header name") -> None:
    """Validate a header name or method (RFC 9110 token) once; remembered in a bounded cache."""
    if not _TOKEN.fullmatch(name):
        raise LocalProtocolError(f"invalid {what} {name!r}", 500)
    if len(_TOKENS_SEEN) < _TOKENS_SEEN_MAX:
        _TOKENS_SEEN.add(name)


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[Header]:
    """Raw header pairs (name bytes, value bytes) -> ``(str, str)`` pairs, names lower-cased."""
    return [(name.decode("ascii").lower(), value.decode("latin-1")) for name, value in raw]


def check_framing(http_version: str, headers: Sequence[Header]) -> tuple[int | None, bool]:
    """Reject ambiguous or unsupported body framing in a decoded head.

    Returns ``(content_length, chunked)``: the declared Content-Length (None without one) and
    whether the body is chunked. Raises ``RemoteProtocolError``: 505 for versions other than
    ``1.0``/``1.1``; 400 for several or non-numeric Content-Length values, Content-Length
    together with Transfer-Encoding, or Transfer-Encoding on HTTP/1.0; 501 for any
    Transfer-Encoding other than exactly one ``chunked`` (case-insensitive).
    """
    if http_version not in ("1.1", "1.0"):
        raise RemoteProtocolError(f"HTTP/{http_version} not supported", 505)
    length = coding = None
    codings = 0
    for name, value in headers:
        if name == "content-length":
            if length is not None:
                raise RemoteProtocolError("several Content-Length headers", 400)
            length = value
        elif name == "transfer-encoding":
            codings += 1
            coding = value
    if length is not None:
        length = length.strip(" \t")
        if not _DIGITS.fullmatch(length):
            raise RemoteProtocolError("Content-Length is not a decimal number", 400)
    if coding is None:
        return (None if length is None else int(length)), False
    if length is not None:
        raise RemoteProtocolError("Content-Length with Transfer-Encoding (smuggling)", 400)
    if http_version == "1.0":
        raise RemoteProtocolError("Transfer-Encoding on HTTP/1.0", 400)
    if codings > 1 or coding.strip(" \t").lower() != "chunked":
        raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501)
    return None, True


def declared_length(headers: Sequence[Header]) -> int | None:
    """Body length declared by checked headers: the Content-Length, None if chunked, else 0."""
    for name, value in headers:
        if name == "content-length":
            return int(value)
        if name == "transfer-encoding":
            return None
    return 0


def connection_tokens(headers: Iterable[Header]) -> frozenset[str]:
    """Lower-case field names listed in every ``Connection`` header (``close`` included)."""
    tokens = _NO_TOKENS
    for name, value in headers:
        if name == "connection":
            parsed = _CONNECTION_VALUES.get(value)
            if parsed is None:
                parsed = frozenset(t.strip(" \t").lower() for t in value.split(",")) - {""}
                if len(_CONNECTION_VALUES) < _TOKENS_SEEN_MAX:
                    _CONNECTION_VALUES[value] = parsed
            tokens = tokens | parsed if tokens else parsed
    return tokens


def split_hop_by_hop(
    headers: Iterable[Header], *, keep_te_trailers: bool = False, upgrade: bool = False
) -> tuple[tuple[Header, ...], frozenset[str]]:
    """``(strip_hop_by_hop(headers), connection_tokens(headers))`` in one pass when possible.

    ``keep_te_trailers``: a ``TE`` listing ``trailers`` is forwarded as ``te: trailers`` (Envoy
    keeps only that value; gRPC needs it). ``upgrade``: an upgrade is in progress, so ``Upgrade``
    is kept and ``connection: upgrade`` sent on (the other Connection tokens still go).
    """
    items = tuple(headers)
    for name, _ in items:
        if name in HOP_BY_HOP:
            break
    else:  # no Connection header either, so no field is nominated
        return items, _NO_TOKENS
    tokens = connection_tokens(items)
    drop = HOP_BY_HOP if tokens <= HOP_BY_HOP else HOP_BY_HOP | tokens
    out = [item for item in items if item[0] not in drop]
    if keep_te_trailers and any(n == "te" and "trailers" in _te_codings(v) for n, v in items):
        out.append(("te", "trailers"))
    if upgrade:
        out += [item for item in items if item[0] == "upgrade"]
        out.append(("connection", "upgrade"))
    return tuple(out), tokens


def _te_codings(value: str) -> list[str]:
    """``"trailers, deflate;q=0.5"`` -> ``["trailers", "deflate"]`` (RFC 9110 §10.1.4)."""
    return [t.partition(";")[0].strip(" \t").lower() for t in value.split(",")]


def strip_hop_by_hop(headers: Iterable[Header]) -> tuple[Header, ...]:
    """Drop ``HOP_BY_HOP`` fields and every field named in Connection; keep the rest in order."""
    return split_hop_by_hop(headers)[0]


# -- request target and Host (RFC 9112 §3.2) ---------------------------------------------------

#: Characters Envoy accepts in Host/:authority (``HeaderUtility::authorityIsValid``, nghttp2's
#: ``check_authority``): no space, slash, CTL or non-ASCII byte.
_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:%@\[\]]*")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#]*)(.*)", re.DOTALL)
_DEFAULT_PORT = {"http": ":80", "https": ":443"}


def check_target(method: str, target: str, host: str | None, *, secure: bool = False) -> None:
    """Reject a request-target that is not in the form its method allows, or that disagrees
    with Host; ``host`` is the (single) Host value or None, ``secure``: the connection is TLS.

    Origin-form ``/p?q``; absolute-form ``http://authority/p`` (``https`` only over TLS, Envoy's
    rule), no userinfo, authority identical to Host (RFC 9112 §3.2.2, ignoring case and the
    default port); ``*`` for OPTIONS only; authority-form ``host:port`` for CONNECT only; no
    fragment (Envoy rejects ``#`` in the path). Raises ``RemoteProtocolError`` (400).
    """
    if host is not None and not _AUTHORITY.fullmatch(host):
        raise RemoteProtocolError("invalid characters in Host", 400)
    if "#" in target:
        raise RemoteProtocolError("fragment in request-target", 400)
    if method == "CONNECT":
        name, sep, port = target.rpartition(":")
        if not (sep and name and port.isdigit() and _AUTHORITY.fullmatch(target)) or "@" in target:
            raise RemoteProtocolError("CONNECT needs an authority-form target host:port", 400)
        return
    if target[:1] == "/":
        return
    if target == "*":
        if method != "OPTIONS":
            raise RemoteProtocolError("asterisk-form target is for OPTIONS only", 400)
        return
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        raise RemoteProtocolError("request-target is not origin-form or absolute-form", 400)
    scheme, authority = m[1].lower(), m[2]
    if scheme not in _DEFAULT_PORT or (scheme == "https" and not secure):
        raise RemoteProtocolError(f"scheme {scheme!r} not allowed on this connection", 400)
    if not authority or "@" in authority or not _AUTHORITY.fullmatch(authority):
        raise RemoteProtocolError("invalid authority (or userinfo) in absolute-form target", 400)
    if host is not None and _same_authority(authority, scheme) != _same_authority(host, scheme):
        raise RemoteProtocolError("Host differs from the absolute-form target's authority", 400)


def _same_authority(authority: str, scheme: str) -> str:
    authority = authority.lower()
    return authority.removesuffix(_DEFAULT_PORT[scheme])


# -- x-forwarded-* and internal headers (Envoy header sanitizing) ------------------------------

XFF, XFP, XFCC = "x-forwarded-for", "x-forwarded-proto", "x-forwarded-client-cert"
#: Prefixes of headers only the mesh may set; dropped when a request enters from outside it
#: (Envoy ``cleanInternalHeaders`` / ``internal_only_headers`` on edge requests).
INTERNAL_PREFIXES = ("x-envoy-", "x-meshd-")


def forwarded_headers(
    headers: Iterable[Header],
    *,
    remote_ip: str | None,
    scheme: str = "http",
    peer_id: str | None = None,
    own_id: str | None = None,
) -> tuple[Header, ...]:
    """The ``x-forwarded-*`` and internal headers of a request about to be forwarded, as Envoy
    sets them. ``remote_ip``: the downstream address; ``scheme``: ``"http"`` or ``"https"`` of
    the downstream connection; ``peer_id``: the caller's verified SPIFFE ID (mTLS) or None;
    ``own_id``: this sidecar's SPIFFE ID.

    Without ``peer_id`` the request comes from outside the mesh (the app at the outbound
    listener, or a plain-text caller): ``use_remote_address: true`` — ``remote_ip`` is appended
    to ``x-forwarded-for`` (several lines are merged into one), ``x-forwarded-proto`` is
    overwritten with ``scheme`` (0 trusted hops), ``x-forwarded-client-cert`` is removed
    (``SANITIZE``), and every ``x-envoy-*`` / ``x-meshd-*`` header is dropped. With ``peer_id``
    (a sidecar over mTLS, trusted): ``x-forwarded-for`` and internal headers pass unchanged,
    ``x-forwarded-proto`` is set only if absent, and ``By=<own_id>;URI=<peer_id>`` is appended
    to ``x-forwarded-client-cert`` (Istio's inbound ``APPEND_FORWARD`` with the URI SAN). Other
    headers keep their order; the rewritten ones go last.
    """
    trusted = peer_id is not None
    out: list[Header] = []
    xff: list[str] = []
    xfp: str | None = None
    xfcc: list[str] = []
    for item in headers:
        name = item[0]
        if name == XFF:
            xff.append(item[1].strip(" \t"))
        elif name == XFP:
            xfp = item[1] if trusted and xfp is None else xfp
        elif name == XFCC:
            if trusted:
                xfcc.append(item[1].strip(" \t"))
        elif trusted or not name.startswith(INTERNAL_PREFIXES):
            out.append(item)
    xff = [v for v in xff if v]
    if not trusted and remote_ip:
        xff.append(remote_ip)
    if xff:
        out.append((XFF, ", ".join(xff)))
    out.append((XFP, xfp or scheme))
    if trusted:
        element = (f"By={own_id};" if own_id else "") + f"URI={peer_id}"
        out.append((XFCC, ", ".join([*[v for v in xfcc if v], element])))
    return tuple(out)
