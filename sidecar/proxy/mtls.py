"""Which identity each mesh endpoint must present, and the outbound pool's mTLS connect.

``MeshIdentities.sync(applied)`` maps every endpoint of the applied snapshot to the SPIFFE ID
its sidecar must prove, ``spiffe://<our trust domain>/ns/<endpoint namespace>/sa/<service>``
(the service is the cluster's host). ``identity_of(host, port)`` answers the pool's connect
seam: that ID, or ``None`` (plain text) while this sidecar holds no certificate yet.
``mesh_connector`` maps an identity refusal to ``OSError`` so the pool reports it as a connect
failure (Envoy flag UF): nothing was sent, so another endpoint may be tried.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from meshd.errors import IdentityError
from sidecar.http.client import Connect
from sidecar.identity.agent import IdentityAgent
from sidecar.identity.tls import TlsContexts, connector
from sidecar.state import Applied


class MeshIdentities:
    def __init__(self, agent: IdentityAgent) -> None:
        self.agent = agent
        self._by_endpoint: dict[tuple[str, int], tuple[str, str]] = {}
        self._synced: Applied | None = None

    def sync(self, applied: Applied | None) -> None:
        if applied is None or applied is self._synced:
            return
        table: dict[tuple[str, int], tuple[str, str]] = {}
        for name, endpoints in applied.endpoints.items():
            host = applied.clusters[name].host
            for ep in endpoints:
                table[(ep.address, ep.port)] = (ep.namespace, host)
        self._by_endpoint = table
        self._synced = applied

    def identity_of(self, host: str, port: int) -> str | None:
        creds = self.agent.current
        found = self._by_endpoint.get((host, port))
        if creds is None or found is None:
            return None
        trust_domain = creds.spiffe_id.split("/")[2]
        namespace, service = found
        return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def mesh_connector(ctxs: TlsContexts, identity_of: Callable[[str, int], str | None],
                   alpn: tuple[str, ...] | None = None) -> Connect:
    inner = connector(ctxs, identity_of, alpn=alpn)

    async def connect(host: str, port: int) -> trio.abc.Stream:
        try:
            return await inner(host, port)
        except IdentityError as exc:
            raise OSError(f"mTLS refused: {exc}") from exc

    return connect
