"""Eureka JSON -> ``Instance``, the delta merge and the reconcile hash code — pure code.

Shapes follow the Eureka REST API (Netflix wiki "Eureka REST operations", JSON with
``Accept: application/json``; ecosystem-conventions §3):

* ``{"applications": {"versions__delta", "apps__hashcode", "application": [...]}}``; Eureka
  1.x unwraps single-element arrays, so ``application`` and ``instance`` may be one object
  (``as_list`` normalises both);
* a registry is kept as ``{(APP, instanceId): instance JSON}`` (``Registry``) with *every*
  status, because the hash code counts them all; only ``UP`` instances become ``Instance``;
* delta: each instance carries ``actionType`` ``ADDED | MODIFIED | DELETED``; after applying
  a delta the client's ``reconcile_hashcode`` must equal the delta's ``apps__hashcode``
  (Netflix ``Applications.getReconcileHashCode``: ``STATUS_count_`` per status, statuses in
  sorted order as in its ``TreeMap``, e.g. ``DOWN_1_UP_3_``), else a full fetch is due.

Instance mapping: service = app name lower-cased (Eureka upper-cases it); instance_id =
``instanceId`` (old servers: ``hostName``); address = ``ipAddr`` else ``hostName``; port =
``port.$`` when ``port.@enabled`` (default true), else ``securePort.$`` when its ``@enabled``
is true (default false); labels = ``metadata`` (keys starting with ``@`` such as Jackson's
``@class`` skipped); ``zone`` defaults to Amazon's ``availability-zone``; protocol =
``metadata["mesh.protocol"]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

from meshd.errors import RegistryInconsistent
from registry.model import Instance

PROTOCOLS = frozenset({"http", "http2", "grpc", "tcp"})
PROTOCOL_KEY = "mesh.protocol"
Registry = dict[tuple[str, str], dict[str, object]]


def as_list(value: object) -> list[dict[str, object]]:
    """Eureka's ``x``: absent/null -> [], one object -> [object], array -> the dict items."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, list):
        return [dict(v) for v in value if isinstance(v, Mapping)]
    raise RegistryInconsistent(f"eureka: expected an object or array, got {type(value).__name__}")


def _envelope(doc: object) -> Mapping[str, object]:
    apps = doc.get("applications") if isinstance(doc, Mapping) else None
    if not isinstance(apps, Mapping):
        raise RegistryInconsistent("eureka: response has no 'applications' object")
    return apps


def _key(app: object, inst: Mapping[str, object]) -> tuple[str, str]:
    name = str(inst.get("app") or app or "").upper()
    iid = inst.get("instanceId") or inst.get("hostName")
    if not name or not iid:
        raise RegistryInconsistent("eureka: instance without app or instanceId")
    return name, str(iid)


def _entries(apps: Mapping[str, object]) -> Iterator[tuple[tuple[str, str], dict[str, object]]]:
    for app in as_list(apps.get("application")):
        for inst in as_list(app.get("instance")):
            yield _key(app.get("name"), inst), inst


def parse_full(doc: object) -> tuple[Registry, str]:
    """``GET /apps`` body -> (registry, apps__hashcode)."""
    apps = _envelope(doc)
    return dict(_entries(apps)), str(apps.get("apps__hashcode") or "")


def apply_delta(registry: Registry, doc: object) -> tuple[Registry, str]:
    """Apply a ``GET /apps/delta`` body to a copy of ``registry`` -> (new registry, server hash)."""
    apps = _envelope(doc)
    out = dict(registry)
    for key, inst in _entries(apps):
        action = str(inst.get("actionType") or "").upper()
        if action == "DELETED":
            out.pop(key, None)
        elif action in ("ADDED", "MODIFIED"):
            out[key] = inst
        else:
            raise RegistryInconsistent(f"eureka delta: unknown actionType {action!r} for {key[1]}")
    return out, str(apps.get("apps__hashcode") or "")


def reconcile_hashcode(registry: Registry) -> str:
    """Netflix ``Applications.getReconcileHashCode`` over every instance of the registry."""
    counts = Counter(str(inst.get("status") or "UNKNOWN").upper() for inst in registry.values())
    return "".join(f"{status}_{counts[status]}_" for status in sorted(counts))


def _enabled(port: object, default: bool) -> tuple[int, bool]:
    """``{"$": 8080, "@enabled": "true"}`` or a plain number -> (port, enabled)."""
    if isinstance(port, Mapping):
        enabled = port.get("@enabled", default)
        on = enabled if isinstance(enabled, bool) else str(enabled).lower() == "true"
        port = port.get("$")
    else:
        on = default
    try:
        return int(port), on  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0, False


def to_instance(key: tuple[str, str], inst: Mapping[str, object], source: str) -> Instance | None:
    """One registry entry -> ``Instance``; None unless ``UP`` with an enabled port and address."""
    if str(inst.get("status") or "").upper() != "UP":
        return None
    port, on = _enabled(inst.get("port"), True)
    if not (on and 0 < port < 65536):
        port, on = _enabled(inst.get("securePort"), False)
    address = inst.get("ipAddr") or inst.get("hostName")
    if not (on and 0 < port < 65536) or not isinstance(address, str) or not address:
        return None
    meta = inst.get("metadata")
    labels = {str(k): str(v) for k, v in meta.items()
              if not str(k).startswith("@") and v is not None} if isinstance(meta, Mapping) else {}
    protocol = labels.pop(PROTOCOL_KEY, "").lower()
    dc = inst.get("dataCenterInfo")
    dc_meta = dc.get("metadata") if isinstance(dc, Mapping) else None
    if isinstance(dc_meta, Mapping) and dc_meta.get("availability-zone"):
        labels.setdefault("zone", str(dc_meta["availability-zone"]))
    return Instance(service=key[0].lower(), instance_id=key[1], address=address, port=port,
                    labels=labels, source=source, protocol=protocol if protocol in PROTOCOLS else "")


def instances(registry: Registry, source: str) -> list[Instance]:
    """Every routable (``UP``) instance of the registry, sorted by (service, instance_id)."""
    out = [i for key, inst in registry.items() if (i := to_instance(key, inst, source)) is not None]
    return sorted(out, key=lambda i: (i.service, i.instance_id))


def registration(inst: Instance, app: str, renewal: float, duration: float, now_ms: int,
                 data_center: str = "MyOwn") -> dict[str, object]:
    """The ``POST /apps/{APP}`` body for a sidecar's instance (py-eureka-client's field set)."""
    meta = dict(inst.labels)
    if inst.protocol:
        meta[PROTOCOL_KEY] = inst.protocol
    base = f"http://{inst.address}:{inst.port}"
    return {"instance": {
        "instanceId": inst.instance_id, "hostName": inst.address, "app": app, "ipAddr": inst.address,
        "status": "UP", "overriddenstatus": "UNKNOWN",
        "port": {"$": inst.port, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                           "name": data_center},
        "leaseInfo": {"renewalIntervalInSecs": int(renewal), "durationInSecs": int(duration)},
        "metadata": meta, "homePageUrl": f"{base}/", "statusPageUrl": f"{base}/info",
        "healthCheckUrl": f"{base}/health", "vipAddress": inst.service, "secureVipAddress": inst.service,
        "lastUpdatedTimestamp": str(now_ms), "lastDirtyTimestamp": str(now_ms),
        "isCoordinatingDiscoveryServer": "false"}}
