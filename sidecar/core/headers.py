"""Header sanitising and framing checks for HTTP/1.x heads. Pure: no trio, socket or ssl.

Two layers, both raising ``RemoteProtocolError(msg, status_hint)``:

* ``check_raw_head(head, ...)`` runs on the raw bytes of one complete head, *before* h11
  parses it, and rejects what h11 0.16 lets through or silently repairs (style-and-reliability
  §B.4): obs-fold, bare LF or CR, control bytes, duplicate or list-valued Content-Length
  (h11 collapses ``Content-Length: 3`` twice, or ``3, 3``, into one), plus the size and
  count caps (431) that h11 cannot enforce when a head arrives in one read.
* ``check_framing(http_version, headers)`` runs on decoded headers and rejects ambiguous
  body framing: Content-Length with Transfer-Encoding (RFC 9112 §6.1, Envoy's default),
  Transfer-Encoding on HTTP/1.0, any coding but ``chunked`` (501), versions but 1.0/1.1 (505).

``encode_response_head`` serialises a response head with the framing decided by the caller and
refuses CR/LF/NUL (response splitting). ``strip_hop_by_hop`` removes the RFC 9110 §7.6.1
connection-specific fields before a head is forwarded. Headers are ``(name, value)`` tuples:
lower-case ``str`` names, latin-1 values.
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
_CL_LINE = b"\ncontent-length:"
_DIGITS = re.compile(r"[0-9]{1,19}")  # h11 caps Content-Length at 20 digits; 19 fits an int64
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_TOKENS_SEEN: set[str] = set()  # header names already validated (names repeat on every response)
_TOKENS_SEEN_MAX = 4096


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
    bad = _CTL.search(head)
    if bad is not None:
        raise RemoteProtocolError(f"control byte {bad.group()!r} in head", 400)
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
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\x00" in text:
        raise LocalProtocolError("CR, LF or NUL in a response head", 500)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"response head is not latin-1: {exc}", 500) from exc


def _check_token(name: str) -> None:
    """Validate a header name (RFC 9110 token) once; remembered in a bounded cache."""
    if not _TOKEN.fullmatch(name):
        raise LocalProtocolError(f"invalid response header name {name!r}", 500)
    if len(_TOKENS_SEEN) < _TOKENS_SEEN_MAX:
        _TOKENS_SEEN.add(name)


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[Header]:
    """h11 header pairs (lower-case name bytes, value bytes) -> ``(str, str)`` pairs."""
    return [(name.decode("ascii").lower(), value.decode("latin-1")) for name, value in raw]


def check_framing(http_version: str, headers: Sequence[Header]) -> None:
    """Reject ambiguous or unsupported body framing in a decoded head.

    Raises ``RemoteProtocolError``: 505 for versions other than ``1.0``/``1.1``; 400 for
    several or non-numeric Content-Length values, Content-Length together with
    Transfer-Encoding, or Transfer-Encoding on HTTP/1.0; 501 for any Transfer-Encoding
    other than exactly one ``chunked`` (case-insensitive).
    """
    if http_version not in ("1.1", "1.0"):
        raise RemoteProtocolError(f"HTTP/{http_version} not supported", 505)
    lengths = [v for n, v in headers if n == "content-length"]
    codings = [v for n, v in headers if n == "transfer-encoding"]
    if len(lengths) > 1:
        raise RemoteProtocolError("several Content-Length headers", 400)
    if lengths and not _DIGITS.fullmatch(lengths[0].strip(" \t")):
        raise RemoteProtocolError("Content-Length is not a decimal number", 400)
    if not codings:
        return
    if lengths:
        raise RemoteProtocolError("Content-Length with Transfer-Encoding (smuggling)", 400)
    if http_version == "1.0":
        raise RemoteProtocolError("Transfer-Encoding on HTTP/1.0", 400)
    if len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked":
        raise RemoteProtocolError("only Transfer-Encoding: chunked is supported", 501)


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
    tokens: set[str] = set()
    for name, value in headers:
        if name == "connection":
            tokens.update(t.strip(" \t").lower() for t in value.split(","))
    tokens.discard("")
    return frozenset(tokens)


def strip_hop_by_hop(headers: Iterable[Header]) -> tuple[Header, ...]:
    """Drop ``HOP_BY_HOP`` fields and every field named in Connection; keep the rest in order."""
    items = tuple(headers)
    drop = HOP_BY_HOP | connection_tokens(items)
    return tuple(item for item in items if item[0] not in drop)
