"""The sidecar's applied configuration: one immutable ``Applied`` swapped atomically.

``prepare(snapshot)`` validates a snapshot the way Envoy validates an xDS update before
accepting it (consistency + every regex compiles) and builds the router; it raises
``ConfigError`` so the caller can NACK and keep the previous ``Applied``. Load-balancer,
breaker and outlier state lives outside the snapshot (``sidecar.proxy.clusters``), keyed by
cluster name, so it survives snapshot swaps.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from meshd.errors import ConfigError
from meshd.snapshot.consistency import consistency_errors
from meshd.snapshot.model import Cluster, Endpoint, Snapshot
from sidecar.core.router import Router


@dataclass(frozen=True, slots=True)
class Applied:
    snapshot: Snapshot
    router: Router
    clusters: dict[str, Cluster]
    endpoints: dict[str, tuple[Endpoint, ...]]
    source: str                  # "meshd" or "disk-cache"
    applied_at: float = field(default_factory=time.time)  # unix seconds


def prepare(snapshot: Snapshot, source: str) -> Applied:
    """Validate and compile ``snapshot``; raises ConfigError with the first problems found."""
    problems = consistency_errors(snapshot)
    if problems:
        raise ConfigError("; ".join(problems[:5]), field=f"snapshot {snapshot.version}")
    try:
        router = Router(snapshot)
    except re.error as exc:  # pragma: no cover - consistency_errors compiles regexes first
        raise ConfigError(f"bad regex: {exc}", field=f"snapshot {snapshot.version}") from exc
    return Applied(
        snapshot=snapshot,
        router=router,
        clusters={c.name: c for c in snapshot.clusters},
        endpoints={e.cluster: e.endpoints for e in snapshot.endpoints},
        source=source,
    )


class State:
    """Holder of the current ``Applied`` (None until the first snapshot or disk cache)."""

    def __init__(self) -> None:
        self.applied: Applied | None = None

    def swap(self, applied: Applied) -> None:
        self.applied = applied
