"""The snapshot: everything one sidecar needs, immutable and versioned (go-control-plane style).

Shape (Envoy xDS vocabulary)::

    Snapshot(version, node, listeners, virtual_hosts, clusters, endpoints, egress)
      Listener        name, direction, port, route_config  (outbound listener -> "outbound")
      VirtualHost     host -> ordered Route list          (RDS)
        Route         name, RouteMatch, [WeightedCluster]  weights sum to 100
      Cluster         name "outbound|<subset>|<host>", host, subset, lb_policy   (CDS)
      ClusterEndpoints cluster -> [Endpoint(address, port, labels)]              (EDS)
      EgressEntry     host, ports, static endpoints (ServiceEntry)

``Version`` is ``(epoch, counter)``: the epoch is persisted and incremented at every meshd start,
so a version number is never issued twice (the amalgam8 lesson, style-and-reliability §A.8).
Sidecars treat any version different from theirs as authoritative; ordering is used only to
report staleness. ``consistency_errors`` (in ``consistency.py``) must be empty before publish.
"""

from __future__ import annotations

import msgspec


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Version(_Frozen, array_like=True, order=True):
    """``(epoch, counter)``; rendered ``"<epoch>.<counter>"``."""

    epoch: int
    counter: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.counter}"

    @classmethod
    def parse(cls, text: str) -> Version:
        """``"3.17"`` -> ``Version(3, 17)``; raises ValueError on anything else."""
        epoch, _, counter = text.partition(".")
        return cls(int(epoch), int(counter))


class StringMatch(_Frozen):
    """Exactly one of exact/prefix/regex is set (checked at compile time)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class HeaderMatch(_Frozen):
    name: str  # lower-case
    match: StringMatch


class RouteMatch(_Frozen):
    path: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()


class WeightedCluster(_Frozen):
    cluster: str
    weight: int


class Route(_Frozen):
    """A route matches if any of ``matches`` matches (empty tuple = match all)."""

    name: str
    matches: tuple[RouteMatch, ...]
    clusters: tuple[WeightedCluster, ...]


class VirtualHost(_Frozen):
    host: str
    routes: tuple[Route, ...]


class Cluster(_Frozen):
    name: str
    host: str
    subset: str
    lb_policy: str = "round_robin"


class Endpoint(_Frozen):
    address: str
    port: int
    instance_id: str = ""
    labels: dict[str, str] = {}


class ClusterEndpoints(_Frozen):
    cluster: str
    endpoints: tuple[Endpoint, ...]


class EgressEntry(_Frozen):
    host: str
    ports: tuple[int, ...]
    endpoints: tuple[str, ...] = ()  # "ip:port"; empty = resolve host by DNS


class Listener(_Frozen):
    name: str
    direction: str  # "inbound" | "outbound" | "admin"
    port: int
    route_config: str = ""  # outbound: "outbound"; inbound: the local app cluster


class Snapshot(_Frozen):
    version: Version
    node: str
    listeners: tuple[Listener, ...] = ()
    virtual_hosts: tuple[VirtualHost, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    endpoints: tuple[ClusterEndpoints, ...] = ()
    egress: tuple[EgressEntry, ...] = ()

    def content_key(self) -> bytes:
        """Encoded content without version/node: equal keys mean nothing to push."""
        body = msgspec.structs.replace(self, version=Version(0, 0), node="")
        return msgspec.json.encode(body)


def cluster_name(host: str, subset: str = "") -> str:
    """Istio-style cluster name ``outbound|<subset>|<host>`` (empty subset = all endpoints)."""
    return f"outbound|{subset}|{host}"


def encode(snapshot: Snapshot) -> bytes:
    return msgspec.json.encode(snapshot)


def decode(data: bytes) -> Snapshot:
    """Raises ``msgspec.ValidationError``/``DecodeError`` on a malformed snapshot."""
    return msgspec.json.decode(data, type=Snapshot)
