"""Identity routes of meshd's API and the API's access rules (``ApiAuth``).

=========  ========================  ====================================================  ========
GET        /v1/identity/bundle       ``{"trust_bundle": [PEM], "trust_domain": str}``       none
POST       /v1/identity/csr          certificate request (``meshd.identity.service``)       in body
GET        /v1/identity/stats        ``{"refused": {reason: n}, "refused_total", "issued"}`` read
POST       /v1/tokens                ``{"service", "namespace"?, "ttl"?}`` -> ``{"token",
                                     "jti", "expires_at", "spiffe_id"}``                    operator
GET        /v1/tokens                ``{"tokens": [{jti, service, namespace, spiffe_id,
                                     created, expires, revoked, state}]}``                 operator
DELETE     /v1/tokens/{jti}          ``{"jti", "revoked": true}``; 404 unknown              operator
GET        /v1/ca                    CA status (``CertificateAuthority.status``)            operator
POST       /v1/ca/{action}?force=1   action rotate | activate | retire -> CA status; 409     operator
=========  ========================  ====================================================  ========

Errors are ``{"error": str, "errors": [], "reason": str}``: 400 bad input, 401 not authenticated
(bad/expired/revoked token, bad proof, expired or untrusted certificate), 403 authenticated but
not allowed (another identity, a mesh token on an operator route), 409 rotation step out of order.

Access levels (``ApiAuth.check``), when meshd runs with an operator token (``--token`` /
``MESHD_TOKEN``): ``operator`` routes and ``read`` routes need that token; ``sidecar`` routes
(register, heartbeat, deregister, snapshot, ack) also take a valid join or session token, and
then the service acted for (the registered instance's, the snapshot's ``service`` query) must
be the token's ``svc`` (403 otherwise). Without an operator token every route is open (a warning
is logged at start); the certificate request still checks its token or proof.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshd.identity import Refusal
from meshd.identity.ca import RotationError
from meshd.identity.service import IdentityService
from meshd.server.control import ControlPlane

log = logging.getLogger("meshd.api")
MAX_IDENTITY_BODY = 64 * 1024  # bytes; a CSR plus a certificate is ~2 KiB
LEVELS = ("operator", "read", "sidecar")


def _json(data: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json")


def _error(msg: str, status: int, reason: str = "") -> Response:
    return _json({"error": msg, "errors": [], "reason": reason}, status)


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _bearer(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ").strip()


class ApiAuth:
    """Decides whether a request may reach a route of level ``operator``, ``read`` or ``sidecar``."""

    def __init__(self, cp: ControlPlane, operator_token: str, identity: IdentityService | None) -> None:
        self.cp = cp
        self.operator_token = operator_token
        self.identity = identity

    def _refuse(self, request: Request, exc: Refusal) -> Response:
        what = f"{request.method} {request.url.path}"
        if self.identity is not None:
            self.identity.refuse(exc, what, _client(request))
        else:
            log.warning("api: refused %s from %s: %s [%s]", what, _client(request), exc, exc.reason)
        return _error(str(exc), exc.status, exc.reason)

    async def check(self, request: Request, level: str) -> Response | None:
        """None if allowed, else the 401/403 answer (counted and logged)."""
        if not self.operator_token:
            return None
        given = _bearer(request)
        if given and hmac.compare_digest(given.encode(), self.operator_token.encode()):
            return None
        if not given:
            return self._refuse(request, Refusal("missing credential (Authorization: Bearer)",
                                                 "unauthenticated"))
        if self.identity is None:
            return self._refuse(request, Refusal("wrong token", "unauthenticated"))
        try:
            claims = self.identity.bearer(given)
        except Refusal as exc:
            if level != "sidecar" and exc.reason == "bad_token":
                exc = Refusal("wrong token", "unauthenticated")
            return self._refuse(request, exc)
        if level != "sidecar":
            return self._refuse(request, Refusal("this route needs the operator token",
                                                 "operator_required", 403))
        acting_for = await self._acting_for(request)
        if acting_for is not None and acting_for != claims.svc:
            return self._refuse(request, Refusal(f"token of service {claims.svc!r} may not act for "
                                                 f"{acting_for!r}", "wrong_service", 403))
        request.state.mesh_claims = claims
        return None

    async def _acting_for(self, request: Request) -> str | None:
        """The service a sidecar call acts for; None = not bound to one (or unknown: 404 later)."""
        iid = request.path_params.get("iid")
        if iid is not None:  # heartbeat / deregister; BuiltinRegistry has no public lookup yet
            lease = self.cp.registry._leases.get(iid)
            return None if lease is None else lease.instance.service
        if request.url.path == "/v1/registry/instances":
            try:
                doc = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                return None  # the handler answers 400
            return str(doc.get("service", "")) if isinstance(doc, dict) else None
        if "node" in request.path_params and not request.url.path.endswith("/ack"):
            return request.query_params.get("service", "")
        return None


async def _doc(request: Request) -> object:
    body = await request.body()
    if len(body) > MAX_IDENTITY_BODY:
        raise Refusal(f"request body larger than {MAX_IDENTITY_BODY} bytes", "bad_request", 413)
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None


class _Handlers:
    """The identity route handlers of one ``IdentityService``."""

    def __init__(self, identity: IdentityService) -> None:
        self.identity = identity

    async def csr(self, request: Request) -> Response:
        try:
            doc = await _doc(request)
        except Refusal as exc:
            self.identity.refuse(exc, "certificate request", _client(request))
            return _error(str(exc), exc.status, exc.reason)
        try:
            return _json(self.identity.request_certificate(doc, _client(request)))
        except Refusal as exc:
            return _error(str(exc), exc.status, exc.reason)

    async def bundle(self, request: Request) -> Response:
        return _json(self.identity.bundle())

    async def stats(self, request: Request) -> Response:
        return _json(self.identity.stats())

    async def create_token(self, request: Request) -> Response:
        try:
            return _json(self.identity.create_token(await _doc(request)))
        except ValueError as exc:
            return _error(str(exc), 400, "bad_request")
        except Refusal as exc:
            return _error(str(exc), exc.status, exc.reason)

    async def list_tokens(self, request: Request) -> Response:
        return _json({"tokens": self.identity.list_tokens()})

    async def revoke(self, request: Request) -> Response:
        jti = request.path_params["jti"]
        if not self.identity.revoke(jti):
            return _error(f"no token {jti!r}", 404, "not_found")
        return _json({"jti": jti, "revoked": True})

    async def ca_status(self, request: Request) -> Response:
        return _json(self.identity.ca.status())

    async def ca_step(self, request: Request) -> Response:
        try:
            return _json(self.identity.ca_step(request.path_params["action"],
                                               request.query_params.get("force") == "1"))
        except ValueError as exc:
            return _error(str(exc), 404, "not_found")
        except RotationError as exc:
            return _error(str(exc), 409, "rotation_order")


def identity_routes(identity: IdentityService | None, auth: ApiAuth) -> list[Route]:
    """The routes above; ``[]`` when meshd runs without an identity service."""
    if identity is None:
        return []
    h = _Handlers(identity)

    def guard(handler: Any, level: str) -> Any:
        async def wrapped(request: Request) -> Response:
            denied = await auth.check(request, level)
            return denied if denied is not None else await handler(request)
        return wrapped

    return [
        Route("/v1/identity/bundle", h.bundle),
        Route("/v1/identity/csr", h.csr, methods=["POST"]),
        Route("/v1/identity/stats", guard(h.stats, "read")),
        Route("/v1/tokens", guard(h.create_token, "operator"), methods=["POST"]),
        Route("/v1/tokens", guard(h.list_tokens, "operator"), methods=["GET"]),
        Route("/v1/tokens/{jti}", guard(h.revoke, "operator"), methods=["DELETE"]),
        Route("/v1/ca", guard(h.ca_status, "operator")),
        Route("/v1/ca/{action}", guard(h.ca_step, "operator"), methods=["POST"]),
    ]
