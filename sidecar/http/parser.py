"""HTTP/1.1 head parsing behind a small interface; with ``decoders``, the only user of httptools.

``parse_request_head(head)`` / ``parse_response_head(head)`` take one complete head (start line
through the blank line) that already passed ``check_raw_head`` and return a ``ParsedRequest`` /
``ParsedResponse`` with decoded headers and checked framing, or raise ``RemoteProtocolError``.
Bodies are decoded by ``sidecar.http.decoders``. Swapping the parser (back to h11, say) means
reimplementing these two functions and ``ChunkedDecoder``.

The start line is matched by the regular expressions h11 uses (one space, a token method, a
visible-ASCII target, ``HTTP/d.d``; versions other than 1.0/1.1 get 505). llhttp then
parses the header section in its strict default mode (no ``set_dangerous_leniencies``) behind a
fixed start line of ours, so methods llhttp does not know (``PURGE``-like extensions) are still
accepted as h11 accepted them. Then the Host rules of RFC 9112 §3.2, ``check_framing`` and
``check_target`` (request-target form, Host syntax, absolute-form authority = Host) apply.
When llhttp refuses a head whose lines all pass h11's header syntax (llhttp also refuses some
framing, e.g. two codings), the later checks on a naive split pick the status h11 gave.
Heads are fed alone, so llhttp never reads a body through them.
"""

from __future__ import annotations

import re

import httptools

from meshd.errors import RemoteProtocolError
from sidecar.core.headers import Header, check_framing, check_target

_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([^\x00\r\n]*))?\r\n")
# llhttp parses the header section behind a start line of ours: the real one was matched above
_REQUEST_PRELUDE = b"GET / HTTP/1.1\r\n"
_RESPONSE_PRELUDE = b"HTTP/1.1 200 OK\r\n"
_H11_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?[ \t]*")
_H11_LENGTH = re.compile(r"[0-9]{1,20}")
_NAMES: dict[bytes, str] = {}  # raw header name -> lower-case str (names repeat on every message)
_NAMES_MAX = 4096


class ParsedRequest:
    """A checked request head; ``length`` None with ``chunked``, 0 when no body is declared."""

    __slots__ = ("chunked", "expect_100", "headers", "length", "method", "target", "upgrade", "version")

    def __init__(self, method: str, target: str, version: str, headers: list[Header]):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.length: int | None = 0
        self.chunked = self.expect_100 = self.upgrade = False


class ParsedResponse:
    """A checked response head; ``length`` and ``chunked`` as declared (neither: until EOF)."""

    __slots__ = ("chunked", "headers", "length", "reason", "status", "version")

    def __init__(self, status: int, reason: str, version: str, headers: list[Header]):
        self.status, self.reason, self.version, self.headers = status, reason, version, headers
        self.length: int | None = None
        self.chunked = False


class _Collector:
    """llhttp callbacks for a head: decoded headers, and whether the head ended."""

    __slots__ = ("complete", "headers")

    def __init__(self) -> None:
        self.headers: list[Header] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = _NAMES.get(name)
        if key is None:
            key = name.decode("ascii").lower()
            if len(_NAMES) < _NAMES_MAX:
                _NAMES[name] = key
        self.headers.append((key, value.rstrip(b" \t").decode("latin-1")))  # llhttp keeps trailing OWS

    def on_headers_complete(self) -> None:
        self.complete = True


def _run(
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
    col: _Collector,
    prelude: bytes,
    head: bytes,
    start: int,
) -> Exception | None:
    """Feed ``prelude`` and the header section ``head[start:]``; llhttp's error, if any."""
    try:
        parser.feed_data(prelude)
        parser.feed_data(memoryview(head)[start:])
    except httptools.HttpParserUpgrade:
        pass  # Connection: upgrade + Upgrade: the head is complete, the caller decides the rest
    except httptools.HttpParserError as exc:
        return exc
    if not col.complete or len(col.headers) != head.count(b"\r\n") - 2:
        return ValueError("header lines and parsed fields differ in number")
    return None


def _check_request(version: str, headers: list[Header], req: ParsedRequest | None) -> tuple[int | None, bool]:
    """The checks after the syntax, in the order h11 + ``check_framing`` ran them: per header
    Content-Length (400) and Transfer-Encoding (501), then Host (400), then ``check_framing``
    (505 first). Notes Expect and Upgrade in ``req``. Returns ``check_framing``'s result."""
    hosts, coded = 0, False
    for name, value in headers:
        if name == "host":
            hosts += 1
        elif name == "content-length":
            if not _H11_LENGTH.fullmatch(value):
                raise RemoteProtocolError("bad Content-Length", 400)
        elif name == "transfer-encoding":
            if coded or value.lower() != "chunked":
                raise RemoteProtocolError("only one Transfer-Encoding: chunked is supported", 501)
            coded = True
        elif req is None:
            pass
        elif name == "expect":  # h11: a comma list, case-insensitive
            req.expect_100 = req.expect_100 or any(
                t.strip(" \t") == "100-continue" for t in value.lower().split(",")
            )
        elif name == "upgrade":
            req.upgrade = req.upgrade or bool(value.strip(" \t,"))
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise RemoteProtocolError("missing or repeated Host header", 400)
    return check_framing(version, headers)


def _refusal(head: bytes, version: str, exc: Exception) -> RemoteProtocolError:
    """The error for a head llhttp refused: 400 if a line breaks h11's header syntax, else the
    status of the first later check that fails (llhttp also refuses, e.g., two codings)."""
    lines = head.split(b"\r\n")[1:-2]
    if all(_H11_FIELD.fullmatch(line) for line in lines):
        split = (line.partition(b":") for line in lines)
        headers = [(n.decode("ascii").lower(), v.strip(b" \t").decode("latin-1")) for n, _, v in split]
        try:
            _check_request(version, headers, None)
        except RemoteProtocolError as err:
            return err
    return RemoteProtocolError(f"malformed head: {exc}", 400)


def parse_request_head(head: bytes, *, secure: bool = False) -> ParsedRequest:
    """Parse and check a request head (see the module docstring); raises ``RemoteProtocolError``.

    A head with several faults gets the status h11 + ``check_framing`` gave it: request line
    (400), header syntax (400), then ``_check_request``, then ``check_target`` (target form,
    Host syntax and agreement; ``secure``: the connection is TLS, so ``https://`` may appear).
    """
    m = _REQUEST_LINE.match(head)
    if m is None:
        raise RemoteProtocolError("malformed request line", 400)
    version = m[3].decode("ascii")
    col = _Collector()
    error = _run(httptools.HttpRequestParser(col), col, _REQUEST_PRELUDE, head, m.end())
    if error is not None:
        raise _refusal(head, version, error)
    req = ParsedRequest(m[1].decode("ascii"), m[2].decode("ascii"), version, col.headers)
    req.length, req.chunked = _check_request(version, col.headers, req)
    check_target(req.method, req.target, _host(col.headers), secure=secure)
    if req.length is None and not req.chunked:
        req.length = 0
    req.expect_100 = req.expect_100 and version == "1.1"
    req.upgrade = req.upgrade or req.method == "CONNECT"
    return req


def _host(headers: list[Header]) -> str | None:
    for name, value in headers:
        if name == "host":
            return value
    return None


def parse_response_head(head: bytes) -> ParsedResponse:
    """Parse and check a response head; raises ``RemoteProtocolError``."""
    m = _STATUS_LINE.match(head)
    if m is None:
        raise RemoteProtocolError("malformed status line", 502)
    version = m[1].decode("ascii")
    status = int(m[2])
    if status < 100:
        raise RemoteProtocolError(f"status {status}", 502)
    col = _Collector()
    error = _run(httptools.HttpResponseParser(col), col, _RESPONSE_PRELUDE, head, m.end())
    if error is not None:
        raise RemoteProtocolError(f"malformed response head: {error}", 502)
    resp = ParsedResponse(status, (m[3] or b"").decode("latin-1"), version, col.headers)
    resp.length, resp.chunked = check_framing(version, col.headers)
    return resp
