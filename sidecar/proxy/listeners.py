"""Per-connection protocol dispatch of the outbound listener and the localhost upstream ports.

``detect_stream`` is the I/O shell of ``core.sniff`` (Envoy's ``http_inspector`` +
``tls_inspector`` listener filters): it peeks at the first bytes with ``MSG_PEEK`` (nothing
consumed: the usual case, a client's first packet decides) and, when that is not enough, reads
on into a ``PrefixedStream`` that delivers those bytes again — bounded by
``DETECTION_MAX_BYTES`` and ``DETECTION_TIMEOUT``, after which the listener's default applies.

* outbound listener: HTTP/1.1 or the h2 preface -> ``sidecar.http2.dispatch.serve_http``; a TLS
  ClientHello -> SNI passthrough (``Tunnels.sni_passthrough``); nothing decisive within the
  detection timeout (a client that connects early, a slow request line) -> HTTP as before;
  other bytes are reset: an opaque connection to the outbound port names no destination.
* upstream port (``[[upstreams]]`` of the bootstrap): a service declared ``tcp`` is pumped at
  once (no detection delay for server-first protocols); otherwise HTTP/1.1 or h2 are served as
  requests to the service (its name replaces the app's ``Host: 127.0.0.1:<port>``), and other
  bytes are pumped as TCP when the protocol is undeclared (reset when it is declared HTTP).
"""

from __future__ import annotations

import logging
import socket

import trio

from sidecar import lifecycle
from sidecar.bootstrap import Upstream
from sidecar.core.sniff import DETECTION_MAX_BYTES, DETECTION_TIMEOUT, Detected, detect
from sidecar.http.limits import DEFAULT_SERVER_LIMITS, ServerLimits
from sidecar.http.messages import Body, ConnInfo, Handler, RequestHead, Response
from sidecar.http2.dispatch import serve_http
from sidecar.identity.tls import PrefixedStream
from sidecar.proxy.pump import abort
from sidecar.proxy.tcp import TcpProxy
from sidecar.proxy.tunnels import Tunnels

log = logging.getLogger("sidecar.listeners")


async def detect_stream(stream: trio.abc.Stream, timeout: float = DETECTION_TIMEOUT,  # noqa: ASYNC109
                        undecided: Detected = "opaque") -> tuple[Detected, trio.abc.Stream]:
    """The protocol of ``stream`` and a stream that still delivers every byte (see module doc);
    ``undecided`` when the bytes did not decide by the deadline (silence, EOF, or a prefix
    that fits more than one protocol)."""
    sock = getattr(stream, "socket", None)
    buf = bytearray()
    proto: Detected | None = None
    with trio.move_on_after(timeout):
        try:
            if sock is not None:
                data = await sock.recv(DETECTION_MAX_BYTES, socket.MSG_PEEK)
                proto = detect(data, final=len(data) >= DETECTION_MAX_BYTES)
                if proto is not None or not data:
                    return proto or undecided, stream
            while proto is None:
                data = await stream.receive_some(DETECTION_MAX_BYTES)
                if not data:
                    break
                buf += data
                proto = detect(bytes(buf), final=len(buf) >= DETECTION_MAX_BYTES)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            proto = "opaque"
    return proto or undecided, PrefixedStream(stream, bytes(buf)) if buf else stream


async def serve_outbound(handler: Handler, tunnels: Tunnels, stream: trio.abc.Stream,
                         info: ConnInfo, *, h1_limits: ServerLimits = DEFAULT_SERVER_LIMITS) -> None:
    """HTTP (also when undecided: a pre-connected client keeps the HTTP idle timeout), SNI
    passthrough for TLS, reset for anything else."""
    proto, stream = await detect_stream(stream, undecided="http1")
    if proto in ("http1", "h2"):
        await serve_http(stream, handler, info, h1_limits=h1_limits, wrap_h1=lifecycle.drainable)
    elif proto == "tls":
        await tunnels.sni_passthrough(stream)
    else:
        log.info("outbound connection from %s: %s bytes name no destination: reset", info.peer, proto)
        await abort(stream)


def for_service(handler: Handler, authority: str) -> Handler:
    """``handler`` with every request addressed to ``authority`` (an upstream port's service)."""

    async def handle(head: RequestHead, body: Body, info: ConnInfo) -> Response:
        headers = (*(h for h in head.headers if h[0] != "host"), ("host", authority))
        return await handler(head.replace(target=head.path, headers=headers), body, info)

    return handle


async def serve_upstream(up: Upstream, handler: Handler, tcp: TcpProxy, stream: trio.abc.Stream,
                         info: ConnInfo, *, h1_limits: ServerLimits = DEFAULT_SERVER_LIMITS) -> None:
    """One connection to the localhost port of ``up`` (see module doc)."""
    port = up.port or up.local_port
    declared = tcp.protocol(up.service)
    if declared == "tcp":
        await tcp.proxy(stream, up.service, port)
        return
    proto, stream = await detect_stream(stream)
    if proto in ("http1", "h2"):
        http = for_service(handler, up.service if not up.port else f"{up.service}:{up.port}")
        await serve_http(stream, http, info, h1_limits=h1_limits, wrap_h1=lifecycle.drainable)
    elif declared:
        log.info("upstream %s is %s, the client sent %s bytes: reset", up.service, declared, proto)
        await abort(stream)
    else:
        await tcp.proxy(stream, up.service, port)
