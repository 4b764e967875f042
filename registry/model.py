"""The abstract service model every registry adapter fills (Istio pilot ``model/service.go``).

An ``Instance`` is one reachable copy of a service: the address and port of its *inbound
sidecar* (mesh traffic goes sidecar to sidecar), its labels (``version``, ``zone``, …) and
where it came from. Adapters (``registry.builtin``, ``registry.consul``, ``eureka``,
``docker``, ``etcd``, ``registry.static``) only produce ``Instance`` values; meshd merges them
(``registry.merge``) and never learns the platform.
"""

from __future__ import annotations

import msgspec

DEFAULT_TTL = 10.0  # seconds; Consul TTL checks are commonly 10-15 s, Eureka leases 90 s


class Instance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One service instance.

    service: service name (the mesh host, e.g. ``"svcb"``); instance_id: unique per registry;
    address/port: the instance's inbound sidecar listener; labels: string map; source: adapter
    name (``"builtin"``); ttl: seconds between required heartbeats before expiry; namespace: with
    the service it forms the SPIFFE ID ``spiffe://<td>/ns/<namespace>/sa/<service>``; protocol:
    the application protocol of the port as declared by the registry (Consul ``Meta.protocol``,
    label ``mesh.protocol``); locality comes from the ``region``/``zone`` labels (Consul
    datacenter → ``region``).
    """

    service: str
    instance_id: str
    address: str
    port: int
    labels: dict[str, str] = {}
    source: str = "builtin"
    ttl: float = DEFAULT_TTL
    namespace: str = "default"
    protocol: str = ""  # "http" | "http2" | "grpc" | "tcp"; "" = undeclared (destination rule or detection)
