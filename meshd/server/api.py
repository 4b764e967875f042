"""meshd's HTTP/JSON API (Starlette on hypercorn's trio worker).

Routes (all JSON; errors are ``{"error": str, "errors": [{file, line, field, reason}]}``):

=========  ========================================  ============================================
GET        /healthz                                  liveness, no auth
POST       /v1/registry/instances                    register ``Instance`` JSON -> 200
PUT        /v1/registry/instances/{id}/heartbeat     renew lease; 404 = unknown, re-register
DELETE     /v1/registry/instances/{id}               deregister; 404 if unknown
GET        /v1/registry/services                     merged view, sources, conflicts (registry_view)
GET        /metrics                                  Prometheus: registry staleness and counts
POST       /v1/rules?file=NAME&dry_run=1             body: TOML text; 200 changes / 400 errors
GET        /v1/rules                                 ``{"rules": RulesFile, "sources": {...}}``
GET        /v1/rules/{kind}/{name}                   one rule; 404
DELETE     /v1/rules/{kind}/{name}                   404 unknown, 400 still referenced
GET        /v1/rules/history?limit=N                 ``{"revision": live, "history": [entry...]}``
GET        /v1/rules/history/{rev}                   ``{"revision", "rules", "sources", "entry"}``; 404
GET        /v1/rules/diff?from=A&to=B                changes + unified diff (``to``: live); 404
POST       /v1/rules/rollback/{rev}                  rev's rules as a new revision; 404 / 400
GET        /v1/snapshot/{node}?version=&wait=&...    long-poll: 200 snapshot, 304 unchanged
POST       /v1/snapshot/{node}/ack                   ``{"version": str, "error": str|null}``
GET        /v1/proxy-status                          intended vs applied version per sidecar
=========  ========================================  ============================================

Rule pushes, deletes and rollbacks record the ``x-meshd-author`` request header (UTF-8,
percent-encoded; the CLI sends ``$USER@host`` or ``--author``) in the rule history. It is
informational, not authenticated: anyone holding the join token can claim any name.

Auth (``api_identity.ApiAuth``; identity, token and CA routes live in ``api_identity.py``): when
meshd runs with an operator token (``--token``/``MESHD_TOKEN``), as Consul's ``X-Consul-Token``
guards its agent API, rule changes, simulate, tokens and CA need ``Authorization: Bearer
<operator token>`` and so do the read-only routes; the sidecar routes (registry, snapshot, ack)
also take a sidecar's join or session token, bound to its service. 401 = no or bad credential,
403 = a valid mesh token where the operator's is needed, or for another service. Without an
operator token every route is open.
"""

from __future__ import annotations

import urllib.parse

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meshd.errors import ConfigError, RuleValidationError
from meshd.identity.service import IdentityService
from meshd.rules import validate as rv
from meshd.rules.schema import KINDS
from meshd.server.api_identity import ApiAuth, identity_routes
from meshd.server.control import ControlPlane
from meshd.server.registry_view import RegistryCollector, services_doc
from meshd.server.simulate import parse_request, simulate
from meshd.snapshot.compile import NodeInfo
from registry.model import Instance

MAX_LONG_POLL = 300.0  # seconds; Consul blocking queries cap wait at 10 min, default 5 min
MAX_RULES_BYTES = 1024 * 1024
MAX_HISTORY = 1000  # entries per /v1/rules/history call
AUTHOR_MAX = 128    # characters kept of x-meshd-author


def _json(data: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json")


def _error(msg: str, status: int, errors: list[ConfigError] | None = None) -> Response:
    return _json({"error": msg, "errors": [e.to_dict() for e in errors or []]}, status)


def _int(q: dict[str, str] | object, key: str) -> int:
    try:
        return int(q.get(key, 0))  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return 0


def _author(request: Request) -> str:
    """``x-meshd-author``, percent-decoded, printable characters only, at most AUTHOR_MAX."""
    raw = request.headers.get("x-meshd-author", "")
    try:  # raw UTF-8 bytes as curl sends them (Starlette decodes headers as latin-1)
        raw = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    raw = urllib.parse.unquote(raw, errors="replace")
    return "".join(ch for ch in raw if ch.isprintable())[:AUTHOR_MAX].strip()


def build_app(cp: ControlPlane, token: str = "", identity: IdentityService | None = None) -> Starlette:
    """The ASGI app bound to one ``ControlPlane``; ``token`` = the operator token (empty = no
    auth); ``identity`` adds the identity routes and lets sidecars use join/session tokens."""
    auth = ApiAuth(cp, token, identity)

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok", "version": str(cp.version)})

    async def register(request: Request) -> Response:
        try:
            inst = msgspec.json.decode(await request.body(), type=Instance)
            cp.register(inst)
        except msgspec.ValidationError as exc:
            return _error(f"bad instance: {exc}", 400)
        except ConfigError as exc:
            return _error(str(exc), 400)
        return _json({"instance_id": inst.instance_id, "version": str(cp.version)})

    async def heartbeat(request: Request) -> Response:
        ok = cp.heartbeat(request.path_params["iid"])
        return _json({"ok": ok}, 200 if ok else 404)

    async def deregister(request: Request) -> Response:
        ok = cp.deregister(request.path_params["iid"])
        return _json({"ok": ok}, 200 if ok else 404)

    async def services(request: Request) -> Response:
        return _json(services_doc(cp))

    metrics_registry = CollectorRegistry()
    metrics_registry.register(RegistryCollector(cp))

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics_registry), media_type=content_type)

    async def push_rules(request: Request) -> Response:
        body = await request.body()
        file = request.query_params.get("file", "<input>")
        if len(body) > MAX_RULES_BYTES:
            return _error(f"{file}: rules file larger than {MAX_RULES_BYTES} bytes", 413)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(f"{file}: not UTF-8 text", 400)
        try:
            result = cp.push_rules(text, file, request.query_params.get("dry_run") == "1",
                                   author=_author(request))
        except RuleValidationError as exc:
            return _error("rules rejected", 400, exc.errors)
        except ConfigError as exc:
            return _error("rules rejected", 400, [exc])
        return _json(result)

    async def list_rules(request: Request) -> Response:
        return _json({"rules": cp.rules, "sources": cp.sources, "version": str(cp.version)})

    def _find(kind: str, name: str) -> object | None:
        if kind not in KINDS:
            return None
        return next((r for r in getattr(cp.rules, kind) if r.name == name), None)

    async def get_rule(request: Request) -> Response:
        rule = _find(request.path_params["kind"], request.path_params["name"])
        return _json(rule) if rule is not None else _error("no such rule", 404)

    async def delete_rule(request: Request) -> Response:
        kind, name = request.path_params["kind"], request.path_params["name"]
        if _find(kind, name) is None:
            return _error(f"no {kind} rule named {name!r}", 404)
        try:
            return _json(cp.delete_rule(kind, name, author=_author(request)))
        except RuleValidationError as exc:
            return _error("delete rejected", 400, exc.errors)

    async def history(request: Request) -> Response:
        limit = request.query_params.get("limit", "50")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_HISTORY:
            return _error(f"limit must be a number from 1 to {MAX_HISTORY}", 400)
        return _json({"revision": cp.revision, "history": cp.store.history(int(limit))})

    async def revision(request: Request) -> Response:
        rev: int = request.path_params["rev"]
        try:
            stored = cp.rules_at(rev)
        except KeyError:
            return _error(f"no rule revision {rev}", 404)
        except ConfigError as exc:
            return _error(str(exc), 500)
        return _json({"revision": rev, "rules": stored.rules, "sources": stored.sources,
                      "entry": stored.entry})

    async def rule_diff(request: Request) -> Response:
        q = request.query_params
        try:
            a, b = int(q["from"]), (int(q["to"]) if q.get("to") else None)
        except (KeyError, ValueError):
            return _error("want from=REV and optionally to=REV (default: the live revision)", 400)
        try:
            return _json(cp.rule_diff(a, b))
        except KeyError as exc:
            return _error(str(exc.args[0]), 404)
        except ConfigError as exc:
            return _error(str(exc), 500)

    async def rollback(request: Request) -> Response:
        rev: int = request.path_params["rev"]
        try:
            return _json(cp.rollback(rev, author=_author(request)))
        except KeyError:
            return _error(f"no rule revision {rev}", 404)
        except RuleValidationError as exc:
            return _error(f"rollback to {rev} rejected", 400, exc.errors)
        except ConfigError as exc:
            return _error(f"rollback to {rev} rejected", 400, [exc])

    async def snapshot(request: Request) -> Response:
        q = request.query_params
        node = request.path_params["node"]
        info = NodeInfo(node=node, service=q.get("service", ""),
                        inbound_port=_int(q, "inbound_port"), outbound_port=_int(q, "outbound_port"),
                        admin_port=_int(q, "admin_port"), app_port=_int(q, "app_port"))
        cp.subscribe(info)
        try:
            wait = min(float(q.get("wait", "0")), MAX_LONG_POLL)
        except ValueError:
            wait = 0.0
        entry = await cp.cache.wait_for(node, q.get("version", ""), wait)
        if entry is None:
            return Response(status_code=304)
        return Response(entry.body, media_type="application/json")

    async def ack(request: Request) -> Response:
        try:
            doc = msgspec.json.decode(await request.body(), type=dict[str, str | None])
        except msgspec.DecodeError as exc:
            return _error(f"bad ack: {exc}", 400)
        ok = cp.cache.ack(request.path_params["node"], doc.get("version") or "", doc.get("error"))
        return _json({"ok": ok}, 200 if ok else 404)

    async def proxy_status(request: Request) -> Response:
        return _json({"version": str(cp.version), "proxies": cp.cache.status()})

    def guard(handler, level: str = "read"):  # type: ignore[no-untyped-def]
        """``level``: "read", "operator" or "sidecar" (see ``api_identity.ApiAuth``)."""
        async def wrapped(request: Request) -> Response:
            denied = await auth.check(request, level)
            return denied if denied is not None else await handler(request)
        return wrapped

    async def simulate_rule(request: Request) -> Response:
        try:
            doc = msgspec.json.decode(await request.body())
            sim = parse_request(doc if isinstance(doc, dict) else {})
            rules = cp.rules
            if doc.get("rules"):
                _, rules = rv.validate_push(str(doc["rules"]), str(doc.get("file") or "<proposed>"),
                                            cp.rules, cp._source_tuples())
        except (msgspec.DecodeError, ValueError) as exc:
            return _error(f"bad simulate request: {exc}", 400)
        except RuleValidationError as exc:
            return _error("proposed rules rejected", 400, exc.errors)
        return _json(simulate(rules, cp.instances(), sim))

    routes = [
        Route("/healthz", healthz),
        Route("/v1/registry/instances", guard(register, "sidecar"), methods=["POST"]),
        Route("/v1/registry/instances/{iid}/heartbeat", guard(heartbeat, "sidecar"), methods=["PUT"]),
        Route("/v1/registry/instances/{iid}", guard(deregister, "sidecar"), methods=["DELETE"]),
        Route("/v1/registry/services", guard(services)),
        Route("/metrics", guard(metrics)),
        Route("/v1/rules", guard(push_rules, "operator"), methods=["POST"]),
        Route("/v1/rules", guard(list_rules), methods=["GET"]),
        Route("/v1/rules/history", guard(history)),
        Route("/v1/rules/simulate", guard(simulate_rule, "operator"), methods=["POST"]),
        Route("/v1/rules/history/{rev:int}", guard(revision)),
        Route("/v1/rules/diff", guard(rule_diff)),
        Route("/v1/rules/rollback/{rev:int}", guard(rollback, "operator"), methods=["POST"]),
        Route("/v1/rules/{kind}/{name}", guard(get_rule), methods=["GET"]),
        Route("/v1/rules/{kind}/{name}", guard(delete_rule, "operator"), methods=["DELETE"]),
        Route("/v1/snapshot/{node}", guard(snapshot, "sidecar")),
        Route("/v1/snapshot/{node}/ack", guard(ack, "sidecar"), methods=["POST"]),
        Route("/v1/proxy-status", guard(proxy_status)),
        Route("/v1/quota", guard(cp.quotas.handle, "sidecar"), methods=["POST"]),
    ]
    routes += identity_routes(identity, auth)
    return Starlette(routes=routes)
