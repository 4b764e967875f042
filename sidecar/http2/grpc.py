"""gRPC over HTTP/2 (PROTOCOL-HTTP2.md): what the mesh reads and writes. Pure: no trio, socket or ssl.

* ``is_grpc(head)``: ``content-type: application/grpc[+proto|;…]``.
* ``grpc_timeout(value)``: the ``grpc-timeout`` header (``1*8DIGIT unit``, units H M S m u n) in
  seconds, None if absent or malformed; the outbound uses it as the request deadline.
* ``grpc_status_of(headers)``: ``grpc-status`` of a trailers-only answer (HEADERS with
  END_STREAM), what Envoy's ``x-envoy-retry-grpc-on`` checks.
* ``grpc_reply(code, message)``: a trailers-only local answer (HTTP 200, ``grpc-status``,
  ``grpc-message`` percent-encoded), used for gRPC fault aborts and local replies to gRPC calls.
* ``grpc_local_reply(head, response)``: turn the mesh's own HTTP error reply to a gRPC request
  into a gRPC status, as Envoy does for local replies (``Grpc::Utility::httpToGrpcStatus``, the
  gRPC spec's http-grpc-status-mapping; a route timeout is DEADLINE_EXCEEDED).
"""

from __future__ import annotations

from urllib.parse import quote

from sidecar.http.messages import RequestHead, Response, ResponseHead

GRPC_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
CODE_NAMES: dict[int, str] = {v: k for k, v in GRPC_CODES.items()}
# gRPC doc/http-grpc-status-mapping.md (Envoy Grpc::Utility::httpToGrpcStatus)
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
MAX_GRPC_MESSAGE = 1024  # characters of grpc-message we write for a local reply


def is_grpc(head: RequestHead | ResponseHead) -> bool:
    ctype = head.header("content-type")
    return ctype is not None and ctype.startswith("application/grpc")


def grpc_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``"100m"`` -> 0.1); None if absent or malformed."""
    if not value or len(value) > 9 or value[-1] not in _UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def grpc_status_of(headers: tuple[tuple[str, str], ...]) -> int | None:
    """The ``grpc-status`` in ``headers`` as an int, None if absent or not a number."""
    for name, value in headers:
        if name == "grpc-status":
            return int(value) if value.isdigit() else None
    return None


def grpc_reply(code: int, message: str = "", extra: tuple[tuple[str, str], ...] = ()) -> Response:
    """A trailers-only gRPC answer with status ``code``."""
    headers = [("content-type", "application/grpc"), ("grpc-status", str(code))]
    if message:
        headers.append(("grpc-message", quote(message[:MAX_GRPC_MESSAGE], safe=" !#$&'()*+,/:;=?@[]~")))
    return Response(ResponseHead(200, (*headers, *extra)), b"")


def http_to_grpc(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, 2)


def grpc_local_reply(request: RequestHead, resp: Response) -> Response:
    """``resp`` unchanged unless ``request`` is gRPC and ``resp`` is a non-200 local reply
    whose body is ``bytes``; then its gRPC form (flag header kept)."""
    head = resp.head
    if head.status == 200 or not isinstance(resp.body, bytes) or not is_grpc(request):
        return resp
    flag = head.header("x-meshd-response-flags")
    code = 4 if flag == "UT" else http_to_grpc(head.status)
    message = resp.body.decode("utf-8", "replace").strip() or f"HTTP {head.status}"
    extra = (("x-meshd-response-flags", flag),) if flag else ()
    return grpc_reply(code, message, extra)
