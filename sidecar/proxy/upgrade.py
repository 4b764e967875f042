"""Forward an HTTP/1.1 ``Upgrade`` request on a fresh upstream connection (WebSocket & co).

``forward_upgrade(stream, head)`` sends ``head`` with ``connection: upgrade`` on ``stream``
(never a pooled connection: after a 101 it is no longer HTTP) and reads the answer:

* ``101 Switching Protocols`` -> a ``TunnelResponse``: the server writes the 101 downstream,
  then the tunnel pumps bytes both ways (``pump``: half-close, reset, idle timeout), first
  delivering what either side sent early (bytes after the 101 head, after the request head);
* anything else -> a plain ``Response`` streaming its body; the connection closes after it
  (the downstream connection closes too: ``serve_http1`` never keeps an Upgrade request alive).

Raises ``UpstreamResetError``/``UpstreamProtocolError`` (closed or malformed before a head) and
``UpstreamTimeoutError`` (no head within ``timeout`` s); ``stream`` is closed then.
"""

from __future__ import annotations

import trio

from meshd.errors import RemoteProtocolError, UpstreamResetError, UpstreamTimeoutError
from sidecar.core.headers import check_raw_head, encode_request_head, split_hop_by_hop
from sidecar.http.limits import DEFAULT_CLIENT_LIMITS, ClientLimits
from sidecar.http.messages import RequestHead, Response, ResponseHead
from sidecar.http.parser import parse_response_head
from sidecar.http.server import receive_head
from sidecar.http.upgrade import TunnelResponse
from sidecar.http.upstream_conn import (
    IO_ERRORS,
    ResponseBody,
    UpstreamConn,
    UpstreamProtocolError,
    feed,
    response_parts,
)
from sidecar.proxy.pump import DEFAULT_IDLE_TIMEOUT, pump, tunnel_stream

UPGRADE_RESPONSE_TIMEOUT = 15.0  # seconds for the 101; Envoy's route timeout default


class _OneShot:
    """The ``Pool`` of a connection that is never reused."""

    async def checkin(self, conn: UpstreamConn) -> None:
        await trio.aclose_forcefully(conn.stream)

    async def discard(self, conn: UpstreamConn) -> None:
        await trio.aclose_forcefully(conn.stream)


async def forward_upgrade(stream: trio.abc.Stream, head: RequestHead, *,
                          timeout: float = UPGRADE_RESPONSE_TIMEOUT,  # noqa: ASYNC109
                          idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                          limits: ClientLimits = DEFAULT_CLIENT_LIMITS) -> Response:
    """See the module docstring. ``head`` carries the ``upgrade`` header (hop-by-hop fields
    other than it are already stripped); its target is sent as the origin-form path."""
    conn = UpstreamConn(("upstream", 0), stream)
    try:
        with trio.fail_after(timeout):
            headers = (*head.headers, ("connection", "upgrade"))
            data, _ = encode_request_head(head.method, head.path, headers, default_host="localhost",
                                          length=0, body_method=False)
            await stream.send_all(data)
            buf = bytearray()
            while True:
                end = await receive_head(stream, buf, max_bytes=limits.max_headers_bytes,
                                         max_recv=limits.max_recv)
                if end < 0:
                    raise UpstreamResetError("upstream closed before answering the upgrade")
                raw, rest = bytes(buf[:end]), bytes(buf[end:])
                check_raw_head(raw, max_bytes=limits.max_headers_bytes, max_count=limits.max_headers_count)
                parsed = parse_response_head(raw)
                if parsed.status == 101 or parsed.status >= 200:
                    break
                buf = bytearray(rest)  # 100 Continue, 102, 103: skipped
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise UpstreamTimeoutError(f"no answer to the upgrade within {timeout:g} s") from None
    except RemoteProtocolError as exc:
        await trio.aclose_forcefully(stream)
        raise UpstreamProtocolError(f"malformed answer to the upgrade: {exc}") from exc
    except (*IO_ERRORS, UpstreamResetError) as exc:
        await trio.aclose_forcefully(stream)
        raise UpstreamResetError(f"upgrade: {exc!r}") from exc
    if parsed.status != 101:
        head_out, decoder, _ = response_parts(head, parsed, False, limits.max_headers_bytes)
        first = feed(conn, decoder, rest) if rest else b""
        body = ResponseBody(_OneShot(), conn, decoder, limits, first)
        return Response(head_out, body, body.aclose)
    return _tunnel(stream, parsed.headers, parsed.reason, rest, idle_timeout)


def _tunnel(upstream: trio.abc.Stream, headers: list[tuple[str, str]], reason: str, early: bytes,
            idle_timeout: float) -> TunnelResponse:
    kept, _ = split_hop_by_hop(headers)
    token = next((v for k, v in headers if k == "upgrade"), "")
    started = False

    async def tunnel(downstream: trio.abc.Stream, buffered: bytes) -> None:
        nonlocal started
        started = True
        downstream = tunnel_stream(downstream)
        try:
            if early:
                await downstream.send_all(early)
            if buffered:
                await upstream.send_all(buffered)
        except IO_ERRORS:
            await trio.aclose_forcefully(upstream)
            return
        await pump(downstream, upstream, idle_timeout=idle_timeout)

    async def aclose() -> None:
        if not started:
            await trio.aclose_forcefully(upstream)

    return TunnelResponse(head=ResponseHead(101, (*kept, ("upgrade", token)), reason),
                          aclose=aclose, tunnel=tunnel)
