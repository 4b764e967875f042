"""Protocol detection from the first bytes of a connection, as pure code (no trio/socket/ssl).

``detect(data, final)`` answers which protocol a client speaks, the way Envoy's listener
filters do (``http_inspector`` for HTTP/1.x and the HTTP/2 preface, ``tls_inspector`` for a
ClientHello) and Istio's protocol sniffing uses them:

* ``"h2"``     — the HTTP/2 connection preface ``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`` (RFC 9113 §3.4);
* ``"http1"``  — an HTTP/1.x request line ``METHOD SP target SP HTTP/1.d`` (RFC 9112 §3);
* ``"tls"``    — a TLS handshake record starting a ClientHello (RFC 8446 §5.1, §4.1.2);
* ``"opaque"`` — anything else: raw TCP;
* ``None``     — the bytes so far fit more than one answer: read more (unless ``final``).

``final`` is set when no more bytes will come for the decision (EOF, ``DETECTION_TIMEOUT``
elapsed, or ``DETECTION_MAX_BYTES`` read): an undecided prefix is then ``"opaque"``, as Istio
sets ``continue_on_listener_filters_timeout`` so server-first protocols still pass as TCP.
"""

from __future__ import annotations

import re
from typing import Literal

Detected = Literal["h2", "http1", "tls", "opaque"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Envoy's http_inspector gives up on a request line it cannot finish within its read buffer;
# 8 KiB is the longest request line most servers accept (nginx large_client_header_buffers).
DETECTION_MAX_BYTES = 8 * 1024
# Istio's protocolDetectionTimeout (100 ms by default before Istio turned it off) bounds the wait;
# Envoy's own listener_filters_timeout is 15 s. Clients that speak first send at once, so 1 s
# only delays server-first protocols on an undeclared port; declare them "tcp" to skip it.
DETECTION_TIMEOUT = 1.0

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_REQUEST_LINE = re.compile(rb"[" + _TCHAR + rb"]{1,32} [\x21-\x7e]+ HTTP/1\.[0-9]\r?\n")
# every prefix of a request line (before its LF) matches this
_REQUEST_PREFIX = re.compile(
    rb"[" + _TCHAR + rb"]{1,32}( ([\x21-\x7e]*( (H(T(T(P(/(1(\.([0-9]\r?)?)?)?)?)?)?)?)?)?)?)?")


def _tls(data: bytes) -> Detected | None:
    # record type 0x16, version 0x03 0x00-0x04, length u16, handshake type 0x01 (ClientHello)
    if len(data) > 1 and data[1] != 0x03:
        return "opaque"
    if len(data) > 2 and data[2] > 0x04:
        return "opaque"
    if len(data) > 5:
        return "tls" if data[5] == 0x01 else "opaque"
    return None


def _http1(data: bytes) -> Detected | None:
    line_end = data.find(b"\n")
    if line_end >= 0:
        return "http1" if _REQUEST_LINE.fullmatch(data, 0, line_end + 1) else "opaque"
    return None if _REQUEST_PREFIX.fullmatch(data) else "opaque"


def detect(data: bytes, final: bool = False) -> Detected | None:
    """See the module docstring; ``data`` is every byte received so far."""
    answer: Detected | None
    if not data:
        answer = None
    elif data[0] == 0x16:
        answer = _tls(data)
    elif H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        answer = "h2" if len(data) >= len(H2_PREFACE) else None
    else:
        answer = _http1(data[:DETECTION_MAX_BYTES])
        if answer is None and len(data) >= DETECTION_MAX_BYTES:
            answer = "opaque"
    if answer is None and final:
        return "opaque"
    return answer
