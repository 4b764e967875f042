"""What ``GET /v1/registry/services`` and meshd's ``/metrics`` say about the merged registry.

``services_doc(cp)`` returns::

    {"services": [{"name", "instances": [{<Instance fields>, "healthy", "expires_in"}],
                   "stale_sources": [source...], "withheld": {source: {removed, of, since}}}],
     "sources": [{"name", "synced", "stale", "stale_for", "message", "instances",
                  "stale_services": {service: {"stale_for", "message"}}, "withheld": [service...]}],
     "conflicts": [{"kind", "service", "key", "sources", "detail"}]}

Only healthy instances enter the model (each adapter filters: Consul ``passing``, Eureka
``UP``, Docker ``healthy``), so ``healthy`` is always true; ``expires_in`` is the built-in
lease left (seconds), 0 for other sources. ``stale_for`` = seconds since the first error of the
current episode.

``RegistryCollector`` exposes, computed at scrape time (prometheus_client custom collector):
``meshd_registry_source_stale{source}`` (1 = last read failed, the last good view is served),
``meshd_registry_instances{source}`` (instances applied from the source),
``meshd_registry_withheld_services{source}`` (services whose removal the guard withholds) and
``meshd_registry_conflicts`` (see ``registry.merge.Merger.conflicts``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.builtin import BuiltinRegistry

if TYPE_CHECKING:
    from meshd.server.control import ControlPlane


def _sources(cp: ControlPlane, now: float) -> list[dict[str, object]]:
    out = []
    for st in cp.merger.sources.values():
        out.append({
            "name": st.name, "synced": st.synced, "stale": st.stale is not None,
            "stale_for": round(now - st.stale.since, 2) if st.stale else 0.0,
            "message": st.stale.message if st.stale else "",
            "instances": sum(len(v) for v in st.applied.values()),
            "stale_services": {s: {"stale_for": round(now - e.since, 2), "message": e.message}
                               for s, e in sorted(st.stale_services.items())},
            "withheld": sorted(st.guard.withheld),
        })
    return out


def services_doc(cp: ControlPlane) -> dict[str, object]:
    now = cp.clock()
    by_name: dict[str, list[dict[str, object]]] = {}
    for inst in cp.instances():
        row = msgspec.to_builtins(inst)
        row["healthy"] = True
        left = cp.registry.expires_in(inst.instance_id, now) if inst.source == BuiltinRegistry.name else None
        row["expires_in"] = round(left or 0.0, 2)
        by_name.setdefault(inst.service, []).append(row)
    services = []
    for name, rows in sorted(by_name.items()):
        stale = [st.name for st in cp.merger.sources.values()
                 if name in st.applied and (st.stale is not None or name in st.stale_services)]
        withheld = {st.name: {"removed": w.removed, "of": w.of, "since": round(now - w.since, 2)}
                    for st in cp.merger.sources.values()
                    if (w := st.guard.withheld.get(name)) is not None}
        services.append({"name": name, "instances": rows, "stale_sources": stale, "withheld": withheld})
    conflicts = [{"kind": c.kind, "service": c.service, "key": c.key, "sources": list(c.sources),
                  "detail": c.detail} for c in cp.merger.conflicts()]
    return {"services": services, "sources": _sources(cp, now), "conflicts": conflicts}


class RegistryCollector(Collector):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stale = GaugeMetricFamily("meshd_registry_source_stale",
                                  "1 if the source's last read failed (its last good view is served)",
                                  labels=["source"])
        count = GaugeMetricFamily("meshd_registry_instances", "instances applied from the source",
                                  labels=["source"])
        held = GaugeMetricFamily("meshd_registry_withheld_services",
                                 "services whose mass removal the guard withholds", labels=["source"])
        for st in self.cp.merger.sources.values():
            stale.add_metric([st.name], 1.0 if st.stale is not None or st.stale_services else 0.0)
            count.add_metric([st.name], float(sum(len(v) for v in st.applied.values())))
            held.add_metric([st.name], float(len(st.guard.withheld)))
        yield stale
        yield count
        yield held
        yield GaugeMetricFamily("meshd_registry_conflicts", "address or instance_id conflicts between "
                                "sources", value=float(len(self.cp.merger.conflicts())))
