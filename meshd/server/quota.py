"""Global rate limits: meshd hands out slices of each limit's per-window quota (``QuotaLedger``).

``POST /v1/quota`` (sidecar credential) with ``{"limit": name, "client": node, "key": str,
"want": int | null}`` answers ``{"tokens": int, "window": int, "expires_in": seconds}``; 0 tokens
means the window's quota is spent (ask again after ``expires_in``). The ledger follows every
rebuild (``sync``), so N callers together never exceed a limit within one window.
"""

from __future__ import annotations

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response

from meshd.snapshot.compile import MeshConfig
from sidecar.core.ratelimit import QuotaLedger


class QuotaRequest(msgspec.Struct, forbid_unknown_fields=True):
    limit: str
    client: str
    key: str = ""
    want: int | None = None


class Quotas:
    def __init__(self) -> None:
        self.ledger = QuotaLedger(())

    def sync(self, mesh: MeshConfig) -> None:
        self.ledger.set_limits(mesh.ratelimits)

    async def handle(self, request: Request) -> Response:
        try:
            req = msgspec.json.decode(await request.body(), type=QuotaRequest)
            grant = self.ledger.grant(req.limit, req.client, trio.current_time(), req.key, req.want)
        except msgspec.MsgspecError as exc:
            return Response(msgspec.json.encode({"error": f"bad quota request: {exc}"}), 400,
                            media_type="application/json")
        except KeyError:
            return Response(msgspec.json.encode({"error": "no such global limit"}), 404,
                            media_type="application/json")
        body = {"tokens": grant.tokens, "window": grant.window, "expires_in": grant.expires_in}
        return Response(msgspec.json.encode(body), media_type="application/json")
