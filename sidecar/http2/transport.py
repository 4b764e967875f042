"""The protocol seam of the upstream side: HTTP/1.1 (``UpstreamPool``) or HTTP/2 (``H2Pool``)
per request, behind ``UpstreamPool.request``'s signature (forwarder, inbound and mirror call
it unchanged).

Choices (``use_h2(head, host, port)``):

* ``mesh_h2`` — between sidecars: HTTP/2 (mTLS, ALPN ``h2``) when the downstream request came
  over HTTP/2, is gRPC or accepts trailers (``TE: trailers``), so streams stay multiplexed and
  trailers survive; other HTTP/1.1 requests stay HTTP/1.1 (the peer's inbound converts to
  what its app speaks).
* ``app_h2(protocol)`` — inbound to the local app: HTTP/2 with prior knowledge (h2c) when the app
  declares ``http2`` or ``grpc`` (bootstrap label ``mesh.protocol``, as the registry's
  ``Instance.protocol``), and for every gRPC request (gRPC exists only on HTTP/2).

"Where semantics allow": an HTTP/1.1 client reaches an HTTP/2 app (its request converted at
the last hop) and an HTTP/2 client an HTTP/1.1 app; trailers reach an HTTP/1.1 client only
chunked and when it sent ``TE: trailers``. An endpoint whose TLS refuses ``h2`` (``NotH2``) is
remembered and served over HTTP/1.1, except gRPC (then the connect error stands).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from sidecar.http.client import PoolStatistics, UpstreamPool
from sidecar.http.messages import Body, RequestHead, Response
from sidecar.http2.client import H2Pool, NotH2
from sidecar.http2.grpc import is_grpc

UseH2 = Callable[[RequestHead, str, int], bool]
H2_PROTOCOLS = frozenset({"http2", "grpc"})  # Istio/Consul protocol names that mean HTTP/2
PROTOCOL_LABEL = "mesh.protocol"


def mesh_h2(head: RequestHead, host: str, port: int) -> bool:
    return head.http_version == "2" or is_grpc(head) or head.header("te") == "trailers"


def app_h2(protocol: str) -> UseH2:
    declared = protocol in H2_PROTOCOLS

    def use_h2(head: RequestHead, host: str, port: int) -> bool:
        return declared or is_grpc(head)

    return use_h2


def app_protocol(boot: Any) -> str:
    """The local app's declared protocol: bootstrap ``app_protocol``/``protocol`` if the
    bootstrap has one, else the ``mesh.protocol`` label; ``""`` when undeclared."""
    for name in ("app_protocol", "protocol"):
        value = getattr(boot, name, "")
        if isinstance(value, str) and value:
            return value.lower()
    return str(getattr(boot, "labels", {}).get(PROTOCOL_LABEL, "")).lower()


class Transport:
    """``request`` goes to ``h2`` when ``use_h2`` says so, else to ``h1``."""

    def __init__(self, h1: UpstreamPool, h2: H2Pool, use_h2: UseH2) -> None:
        self.h1 = h1
        self.h2 = h2
        self.use_h2 = use_h2

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the HTTP/2 pool's tasks (``nursery.start(transport.run)``)."""
        await self.h2.run(task_status=task_status)

    async def request(self, host: str, port: int, head: RequestHead, body: Body | bytes = b"",
                      **kw: Any) -> Response:
        if self.use_h2(head, host, port) and (host, port) not in self.h2.not_h2:
            try:
                return await self.h2.request(host, port, head, body, **kw)
            except NotH2:
                if is_grpc(head):
                    raise
        elif (host, port) in self.h2.not_h2 and is_grpc(head):
            raise NotH2(f"{host}:{port} does not speak HTTP/2; gRPC needs it")
        return await self.h1.request(host, port, head, body, **kw)

    def statistics(self) -> PoolStatistics:
        return self.h1.statistics()

    async def aclose(self) -> None:
        await self.h1.aclose()
        await self.h2.aclose()
