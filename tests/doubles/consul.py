"""A Consul API double: the agent/catalog/health behaviour meshd's adapter depends on.

Implemented from Consul's API docs (``api-docs/features/blocking.mdx``, ``health.mdx``,
``catalog.mdx``, ``agent/service.mdx``, ``agent/check.mdx``):

* a raft-like index bumped on every write; ``X-Consul-Index`` on blocking endpoints; a request
  with ``?index=N`` (N > 0) is held until the resource's index exceeds N or ``wait`` (Go
  duration, default 5m, max 10m) passes; ``index`` 0/absent answers at once;
* ``GET /v1/catalog/services`` (name -> tags, plus ``consul``), ``GET /v1/health/service/:name``
  (``?passing`` keeps entries whose checks are all passing; ``?dc`` other than ours -> 500);
* ``PUT /v1/agent/service/register`` (keys case-insensitive like Consul's decoder; invalid Meta
  keys -> 400; ``Check``/``Checks`` with ``TTL``, ``Status``, ``DeregisterCriticalServiceAfter``;
  ``?replace-existing-checks``), ``PUT /v1/agent/service/deregister/:id`` (404 unknown),
  ``PUT /v1/agent/check/pass|warn|fail/:id`` (404 unknown), ``GET /v1/agent/services``;
* TTL checks turn ``critical`` when not updated within TTL; a service whose check has been
  critical for ``DeregisterCriticalServiceAfter`` (at least ``min_deregister_after``, Consul:
  1m) is deregistered by a reaper (every ``reap_interval``; Consul: 30 s);
* ACL: with ``acl_token`` set, requests without that ``X-Consul-Token`` get 403.

Knobs for outage tests: ``fail_all`` (500 everywhere), ``fail_services`` (500 for those
services' health), ``reset_index(to)`` (a snapshot restore: every index drops to ``to`` and
blocked queries return at once, as Consul's abandoned state store does), ``stop()``/``start()``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from typing import Any

from consul.std import parse_duration

from tests.doubles.server import DoubleServer, Reply, json_reply, text_reply

META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_WAIT = 600.0  # blocking.mdx: wait is limited to 10 minutes
DEFAULT_WAIT = 300.0  # 5 minutes


def _lower(d: Any) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in d.items()} if isinstance(d, dict) else {}


class ConsulDouble(DoubleServer):
    def __init__(self, datacenter: str = "dc1", node: str = "node1", node_address: str = "127.0.0.1",
                 min_deregister_after: float = 60.0, reap_interval: float = 0.05,
                 acl_token: str | None = None) -> None:
        super().__init__()
        self.datacenter, self.node = datacenter, node
        self.min_deregister_after, self.reap_interval, self.acl_token = (
            min_deregister_after, reap_interval, acl_token)
        self.cond = threading.Condition()
        self.index = 10
        self.generation = 0
        self.catalog_index = self.index
        self.svc_index: dict[str, int] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}  # (node, service id) -> Service
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}  # (node, check id) -> check state
        self.fail_all = False
        self.fail_services: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.add_node(node, node_address)
        self._reaper: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap_loop, daemon=True)
            self._reaper.start()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _reap_loop(self) -> None:
        while self._srv is not None or not self.closing:
            time.sleep(self.reap_interval)
            self.reap(time.monotonic())

    # -- state changes -----------------------------------------------------------------------
    def _bump(self, service: str, catalog: bool = False) -> None:
        self.index += 1
        self.svc_index[service] = self.index
        if catalog:
            self.catalog_index = self.index
        self.cond.notify_all()

    def add_node(self, node: str, address: str, datacenter: str | None = None) -> None:
        with self.cond:
            self.nodes[node] = {"ID": f"00000000-0000-0000-0000-{len(self.nodes):012d}", "Node": node,
                                "Address": address, "Datacenter": datacenter or self.datacenter,
                                "TaggedAddresses": {"lan": address, "wan": address}, "Meta": {}}

    def register(self, payload: dict[str, Any], node: str | None = None,
                 replace_checks: bool = False) -> None:
        """Agent (or catalog, with ``node``) service registration; raises ValueError -> 400."""
        p = _lower(payload)
        name, sid = p.get("name"), p.get("id") or p.get("name")
        meta = p.get("meta") or {}
        if not isinstance(name, str) or not name:
            raise ValueError("Missing service name")
        if bad := [k for k in meta if not META_KEY.match(k) or k.startswith("consul-")]:
            raise ValueError(f"Invalid Service Meta: Key contains invalid characters: {bad[0]!r}")
        node = node or self.node
        svc = {"ID": sid, "Service": name, "Tags": list(p.get("tags") or []),
               "Address": p.get("address") or "",
               "Meta": {str(k): str(v) for k, v in meta.items()}, "Port": int(p.get("port") or 0),
               "Weights": p.get("weights") or {"Passing": 1, "Warning": 1}, "Namespace": "default"}
        raw = ([p["check"]] if p.get("check") else []) + list(p.get("checks") or [])
        now = time.monotonic()
        with self.cond:
            old = self.services.get((node, sid))
            self.services[(node, sid)] = svc
            if replace_checks or old is None:
                for key in [k for k, c in self.checks.items() if k[0] == node and c["ServiceID"] == sid]:
                    del self.checks[key]
            for n, c in enumerate(raw, start=1):
                c = _lower(c)
                default_id = f"service:{sid}" if len(raw) == 1 else f"service:{sid}:{n}"
                cid = c.get("checkid") or c.get("id") or default_id
                ttl = parse_duration(c["ttl"]) if c.get("ttl") else None
                dereg = c.get("deregistercriticalserviceafter")
                dereg_s = max(parse_duration(dereg), self.min_deregister_after) if dereg else None
                self.checks[(node, cid)] = {
                    "CheckID": cid, "Name": c.get("name") or f"Service '{name}' check",
                    "Status": c.get("status") or "critical", "ServiceID": sid, "ServiceName": name,
                    "TTL": ttl, "deadline": now + ttl if ttl else None, "critical_since": now,
                    "DeregisterAfter": dereg_s}
            changed_catalog = old is None or old["Tags"] != svc["Tags"] or old["Service"] != name
            self._bump(name, catalog=changed_catalog)

    def deregister(self, sid: str, node: str | None = None) -> bool:
        node = node or self.node
        with self.cond:
            svc = self.services.pop((node, sid), None)
            if svc is None:
                return False
            for key in [k for k, c in self.checks.items() if k[0] == node and c["ServiceID"] == sid]:
                del self.checks[key]
            self._bump(svc["Service"], catalog=True)
            return True

    def set_check(self, check_id: str, status: str, node: str | None = None) -> bool:
        """TTL update (pass/warn/fail) or a test's direct status change; False if unknown."""
        with self.cond:
            c = self.checks.get((node or self.node, check_id))
            if c is None:
                return False
            now = time.monotonic()
            if c["TTL"]:
                c["deadline"] = now + c["TTL"]
            if c["Status"] != status:
                c["Status"] = status
                c["critical_since"] = now
                self._bump(c["ServiceName"])
            return True

    def reap(self, now: float) -> None:
        with self.cond:
            for c in list(self.checks.values()):
                if c["deadline"] is not None and now > c["deadline"] and c["Status"] != "critical":
                    c["Status"], c["critical_since"] = "critical", now
                    self._bump(c["ServiceName"])
            for (node, _cid), c in list(self.checks.items()):
                dereg = c["DeregisterAfter"]
                if c["Status"] == "critical" and dereg is not None and now - c["critical_since"] >= dereg:
                    self.deregister(c["ServiceID"], node)

    def reset_index(self, to: int = 2) -> None:
        """Snapshot restore: all indexes drop to ``to``; blocked queries return at once."""
        with self.cond:
            self.index = to
            self.catalog_index = to
            self.svc_index = dict.fromkeys(self.svc_index, to)
            self.generation += 1
            self.cond.notify_all()

    # -- HTTP ------------------------------------------------------------------------------
    def set_fail(self, all_requests: bool | None = None, service: str | None = None, on: bool = True) -> None:
        """500 for every request (a lost leader) or for one service; blocked queries fail at once."""
        with self.cond:
            if all_requests is not None:
                self.fail_all = all_requests
            if service is not None:
                (self.fail_services.add if on else self.fail_services.discard)(service)
            self.cond.notify_all()

    def _failing(self, service: str | None) -> bool:
        return self.fail_all or (service is not None and service in self.fail_services)

    def _block(self, query: dict[str, str], current: Any, service: str | None = None) -> None:
        """Hold until ``current()`` exceeds ``?index`` or ``?wait`` passes (caller holds cond)."""
        min_index = int(query.get("index") or 0)
        if min_index <= 0:
            return
        wait = min(parse_duration(query["wait"]) if query.get("wait") else DEFAULT_WAIT, MAX_WAIT)
        deadline, gen = time.monotonic() + wait, self.generation
        while (current() <= min_index and gen == self.generation and not self.closing
               and not self._failing(service)):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cond.wait(left)

    def _health(self, name: str, query: dict[str, str]) -> Reply:
        with self.cond:
            self._block(query, lambda: self.svc_index.get(name, self.catalog_index), name)
            if self._failing(name):
                return text_reply(500, "rpc error making call: rpc: can't find service")
            out = []
            for (node, sid), svc in sorted(self.services.items()):
                if svc["Service"] != name:
                    continue
                checks = [{"Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                           "Status": "passing", "ServiceID": "", "ServiceName": "", "ServiceTags": []}]
                checks += [{"Node": node, "CheckID": c["CheckID"], "Name": c["Name"], "Status": c["Status"],
                            "ServiceID": sid, "ServiceName": name, "ServiceTags": svc["Tags"]}
                           for (n, _), c in sorted(self.checks.items())
                           if n == node and c["ServiceID"] == sid]
                if "passing" in query and any(c["Status"] != "passing" for c in checks):
                    continue
                out.append({"Node": copy.deepcopy(self.nodes[node]), "Service": copy.deepcopy(svc),
                            "Checks": checks})
            return json_reply(200, out, {"X-Consul-Index": str(self.svc_index.get(name, self.catalog_index))})

    def _catalog(self, query: dict[str, str]) -> Reply:
        with self.cond:
            self._block(query, lambda: self.catalog_index)
            if self._failing(None):
                return text_reply(500, "rpc error making call: No cluster leader")
            names: dict[str, set[str]] = {"consul": set()}
            for svc in self.services.values():
                names.setdefault(svc["Service"], set()).update(svc["Tags"])
            return json_reply(200, {k: sorted(v) for k, v in names.items()},
                              {"X-Consul-Index": str(self.catalog_index)})

    def handle(self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes) -> Reply:
        self.requests.append((method, path, query))
        if self.fail_all:
            return text_reply(500, "rpc error making call: No cluster leader")
        if self.acl_token and headers.get("X-Consul-Token") != self.acl_token:
            return text_reply(403, "Permission denied")
        if query.get("dc") not in (None, self.datacenter):
            return text_reply(500, f"No path to datacenter {query['dc']!r}")
        if method == "GET" and path == "/v1/catalog/services":
            return self._catalog(query)
        if method == "GET" and path.startswith("/v1/health/service/"):
            return self._health(path.rsplit("/", 1)[1], query)
        if method == "GET" and path == "/v1/agent/services":
            with self.cond:
                mine = {sid: svc for (n, sid), svc in self.services.items() if n == self.node}
                return json_reply(200, mine)
        if method == "PUT" and path == "/v1/agent/service/register":
            try:
                self.register(json.loads(body or b"{}"), replace_checks="replace-existing-checks" in query)
            except (ValueError, TypeError, AttributeError) as err:
                return text_reply(400, f"Invalid service: {err}")
            return text_reply(200, "")
        if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
            sid = path.rsplit("/", 1)[1]
            if self.deregister(sid):
                return text_reply(200, "")
            return text_reply(404, f'Unknown service ID "{sid}"')
        if m := re.fullmatch(r"/v1/agent/check/(pass|warn|fail)/(.+)", path):
            status = {"pass": "passing", "warn": "warning", "fail": "critical"}[m[1]]
            return text_reply(200, "") if self.set_check(m[2], status) else text_reply(
                404, f'Unknown check ID "{m[2]}"')
        return text_reply(404, f"no handler for {method} {path}")
