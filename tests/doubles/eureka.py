"""A Eureka server double: the REST semantics meshd's Eureka adapter depends on.

From the Eureka REST operations (Netflix wiki) and the server's registry behaviour:

* everything under ``prefix`` (``/eureka`` like Spring Cloud, or ``/eureka/v2`` like Netflix);
  JSON only when ``Accept`` asks for it (else XML, as Eureka defaults to);
* ``POST /apps/{APP}`` ``{"instance": {...}}`` -> 204 (a JSON ``Content-Type`` is required);
  ``PUT /apps/{APP}/{ID}`` renews the lease (404 when unknown: the client must re-register);
  ``DELETE /apps/{APP}/{ID}`` cancels (200/404); ``PUT .../status?value=`` and
  ``PUT .../metadata?k=v`` change an instance;
* ``GET /apps`` (full registry) and ``GET /apps/delta`` (the *recently changed queue*: each
  change within ``retention`` seconds, Eureka's 3 min, with ``actionType`` ADDED / MODIFIED /
  DELETED); both carry ``apps__hashcode`` of the full registry computed as Netflix's
  ``Applications.getReconcileHashCode`` (``DOWN_1_UP_3_``) and ``versions__delta``;
* lease expiry: an instance not renewed for its ``leaseInfo.durationInSecs`` is evicted by a
  task running every ``eviction_interval`` (Eureka: 60 s) and queued as DELETED;
* ``unwrap_single`` (default on): one-element arrays are sent as objects, Eureka 1.x's quirk.

Knobs: ``fail_all`` (500), ``record_deltas`` (False: changes are missed by the delta queue),
``stop()``/``start()``; counters ``full_fetches``, ``delta_fetches``,
``renewals``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections import Counter
from typing import Any

from tests.doubles.server import DoubleServer, Reply, json_reply, text_reply


class EurekaDouble(DoubleServer):
    def __init__(self, prefix: str = "/eureka", retention: float = 180.0, eviction_interval: float = 0.1,
                 unwrap_single: bool = True) -> None:
        super().__init__()
        self.prefix = prefix.rstrip("/")
        self.retention, self.eviction_interval = retention, eviction_interval
        self.unwrap_single = unwrap_single
        self.lock = threading.RLock()
        self.apps: dict[str, dict[str, dict[str, Any]]] = {}  # APP -> id -> {"inst", "renewed", "duration"}
        self.recent: list[tuple[float, str, dict[str, Any]]] = []
        self.version = 1
        self.fail_all = False
        self.record_deltas = True  # False: changes skip the delta queue (clients must notice via hash)
        self.full_fetches = self.delta_fetches = self.renewals = 0
        self._evictor: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self._evictor is None or not self._evictor.is_alive():
            self._evictor = threading.Thread(target=self._evict_loop, daemon=True)
            self._evictor.start()

    def _evict_loop(self) -> None:
        while self._srv is not None or not self.closing:
            time.sleep(self.eviction_interval)
            self.evict(time.monotonic())

    # -- registry ----------------------------------------------------------------------------
    def _changed(self, action: str, inst: dict[str, Any]) -> None:
        now_ms = int(time.time() * 1000)
        inst["actionType"] = action
        inst["lastUpdatedTimestamp"] = str(now_ms)
        self.version += 1
        if self.record_deltas:
            self.recent.append((time.monotonic(), action, copy.deepcopy(inst)))

    def register(self, app: str, inst: dict[str, Any]) -> None:
        app = app.upper()
        inst = copy.deepcopy(inst)
        inst["app"] = app
        inst.setdefault("instanceId", inst.get("hostName"))
        inst.setdefault("status", "UP")
        inst.setdefault("overriddenStatus", "UNKNOWN")
        lease = inst.setdefault("leaseInfo", {})
        now_ms = int(time.time() * 1000)
        lease.update(registrationTimestamp=now_ms, lastRenewalTimestamp=now_ms, evictionTimestamp=0,
                     serviceUpTimestamp=now_ms)
        duration = float(lease.get("durationInSecs") or 90)
        with self.lock:
            self.apps.setdefault(app, {})[str(inst["instanceId"])] = {
                "inst": inst, "renewed": time.monotonic(), "duration": duration}
            self._changed("ADDED", inst)

    def renew(self, app: str, iid: str) -> bool:
        with self.lock:
            rec = self.apps.get(app.upper(), {}).get(iid)
            if rec is None:
                return False
            rec["renewed"] = time.monotonic()
            rec["inst"]["leaseInfo"]["lastRenewalTimestamp"] = int(time.time() * 1000)
            self.renewals += 1
            return True

    def cancel(self, app: str, iid: str) -> bool:
        with self.lock:
            rec = self.apps.get(app.upper(), {}).pop(iid, None)
            if rec is None:
                return False
            if not self.apps[app.upper()]:
                del self.apps[app.upper()]
            self._changed("DELETED", rec["inst"])
            return True

    def modify(self, app: str, iid: str, status: str | None = None,
               metadata: dict[str, str] | None = None) -> bool:
        with self.lock:
            rec = self.apps.get(app.upper(), {}).get(iid)
            if rec is None:
                return False
            if status:
                rec["inst"]["status"] = status
            if metadata:
                rec["inst"].setdefault("metadata", {}).update(metadata)
            self._changed("MODIFIED", rec["inst"])
            return True

    def evict(self, now: float) -> None:
        with self.lock:
            for app, insts in list(self.apps.items()):
                for iid, rec in list(insts.items()):
                    if now > rec["renewed"] + rec["duration"]:
                        rec["inst"]["leaseInfo"]["evictionTimestamp"] = int(time.time() * 1000)
                        self.cancel(app, iid)
            self.recent = [r for r in self.recent if now - r[0] <= self.retention]

    def hashcode(self) -> str:
        with self.lock:
            counts = Counter(rec["inst"]["status"] for insts in self.apps.values() for rec in insts.values())
        return "".join(f"{s}_{counts[s]}_" for s in sorted(counts))

    # -- HTTP ------------------------------------------------------------------------------
    def _one(self, items: list[Any]) -> Any:
        return items[0] if self.unwrap_single and len(items) == 1 else items

    def _applications(self, insts: list[dict[str, Any]]) -> dict[str, Any]:
        by_app: dict[str, list[dict[str, Any]]] = {}
        for inst in insts:
            by_app.setdefault(inst["app"], []).append(inst)
        apps = [{"name": name, "instance": self._one(v)} for name, v in sorted(by_app.items())]
        return {"applications": {"versions__delta": str(self.version), "apps__hashcode": self.hashcode(),
                                 "application": self._one(apps)}}

    def handle(self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes) -> Reply:
        if self.fail_all:
            return text_reply(500, "Internal Server Error")
        if not path.startswith(self.prefix + "/"):
            return text_reply(404, "Not Found")
        path = path[len(self.prefix):]
        wants_json = "json" in (headers.get("Accept") or "")
        with self.lock:
            if method == "GET" and path in ("/apps", "/apps/delta"):
                if not wants_json:
                    return 200, {"Content-Type": "application/xml"}, b"<applications></applications>"
                if path == "/apps":
                    self.full_fetches += 1
                    insts = [rec["inst"] for a in self.apps.values() for rec in a.values()]
                else:
                    self.delta_fetches += 1
                    insts = [inst for _t, _a, inst in self.recent]
                return json_reply(200, self._applications(copy.deepcopy(insts)))
            if m := re.fullmatch(r"/apps/([^/]+)", path):
                if method != "POST":
                    return text_reply(405, "Method Not Allowed")
                if "json" not in (headers.get("Content-Type") or ""):
                    return text_reply(415, "Unsupported Media Type")
                try:
                    inst = json.loads(body)["instance"]
                except (ValueError, KeyError, TypeError):
                    return text_reply(400, "Bad Request")
                self.register(m[1], inst)
                return 204, {}, b""
            if m := re.fullmatch(r"/apps/([^/]+)/([^/]+)(/status|/metadata)?", path):
                app, iid, sub = m[1], m[2], m[3]
                if method == "DELETE" and not sub:
                    ok = self.cancel(app, iid)
                elif method == "PUT" and not sub:
                    ok = self.renew(app, iid)
                elif method == "PUT" and sub == "/status":
                    ok = self.modify(app, iid, status=query.get("value"))
                elif method == "PUT" and sub == "/metadata":
                    ok = self.modify(app, iid, metadata=query)
                else:
                    return text_reply(405, "Method Not Allowed")
                return text_reply(200, "") if ok else text_reply(404, "Not Found")
        return text_reply(404, "Not Found")
