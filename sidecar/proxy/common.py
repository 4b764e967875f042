"""Pieces shared by the inbound and outbound listeners: peer metadata, local replies, metrics hook.

``x-meshd-peer`` carries the calling workload's identity between sidecars (Istio's
``x-envoy-peer-metadata`` in spirit) as ``workload=svca;namespace=default;version=v1``; the
inbound sidecar reads it for metrics and strips it before the app sees the request. With mTLS
(a later issue) the principal will come from the peer certificate instead.
"""

from __future__ import annotations

from collections.abc import Callable

from meshd.errors import MeshError
from sidecar.bootstrap import Bootstrap
from sidecar.http.messages import Response, ResponseHead, body_trailers, on_close
from sidecar.http2.grpc import grpc_status_of
from sidecar.metrics import UNKNOWN, Peer

PEER_HEADER = "x-meshd-peer"


def peer_header_value(boot: Bootstrap) -> str:
    version = boot.labels.get("version", UNKNOWN)
    return f"workload={boot.service};namespace={boot.namespace};version={version}"


def parse_peer(value: str | None) -> Peer:
    """Inverse of ``peer_header_value``; tolerant: unknown or malformed parts become 'unknown'."""
    if not value:
        return Peer()
    fields = dict(p.split("=", 1) for p in value.split(";") if "=" in p)
    workload = fields.get("workload", UNKNOWN)
    return Peer(workload=workload, app=workload, namespace=fields.get("namespace", UNKNOWN),
                version=fields.get("version", UNKNOWN))


def local_reply(status: int, text: str, flag: str, *, extra: tuple[tuple[str, str], ...] = (),
                content_type: str = "text/plain; charset=utf-8", newline: bool = True) -> Response:
    """A response made by the sidecar itself; ``flag`` goes to ``x-meshd-response-flags``."""
    body = (f"{text}\n" if newline and text else text).encode()
    headers = (("content-type", content_type), ("content-length", str(len(body))), *extra)
    if flag != "-":
        headers = (*headers, ("x-meshd-response-flags", flag))
    return Response(head=ResponseHead(status=status, headers=headers), body=body)


def error_response(exc: MeshError) -> Response:
    """A local reply for a mesh error: its status, a one-line text body, Envoy's response flag."""
    return local_reply(int(getattr(exc, "status", 500)), str(exc),
                       str(getattr(exc, "response_flag", "-")))


def observed(resp: Response, record: Callable[[int, str], None]) -> Response:
    """``record(status, grpc_status)`` exactly once when the exchange ends (metrics);
    ``grpc_status`` from the head (trailers-only) or the trailers, ``"-"`` if not gRPC."""
    status = resp.head.status
    return on_close(resp, lambda: record(status, grpc_status_label(resp)))


def grpc_status_label(resp: Response) -> str:
    """The ``grpc_response_status`` metric label of ``resp``."""
    code = grpc_status_of(resp.head.headers)
    if code is None:
        code = grpc_status_of(body_trailers(resp.body))
    return "-" if code is None else str(code)
