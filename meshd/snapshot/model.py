"""The snapshot: everything one sidecar needs, immutable and versioned (go-control-plane style).

Shape (Envoy xDS vocabulary)::

    Snapshot(version, node, listeners, virtual_hosts, clusters, endpoints, egress,
             authorization, ratelimits)
      Listener        name, direction, port, route_config  (outbound listener -> "outbound")
      VirtualHost     host -> ordered Route list          (RDS)
        Route         name, RouteMatch, [WeightedCluster]  weights sum to 100
        TcpRoute      name, ports, [WeightedCluster]       (Istio tcp routes)
      Cluster         name "outbound|<subset>|<host>", host, subset, lb_policy   (CDS)
      ClusterEndpoints cluster -> [Endpoint(address, port, labels)]              (EDS)
      EgressEntry     host, ports, static endpoints (ServiceEntry)
      AuthzPolicy     host ("*" = all), action, dry_run, [AuthzRule(source, operation)]  (RBAC)
      RateLimit       host, route, rate_per_sec, burst, window, key, scope  (local/global)

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
    """Exactly one of exact/prefix/suffix/regex/present/absent is set (checked at compile)."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    present: bool | None = None
    absent: bool | None = None
    invert: bool = False


class HeaderMatch(_Frozen):
    name: str  # lower-case
    match: StringMatch


class RouteMatch(_Frozen):
    path: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    port: int | None = None
    source: str | None = None
    source_labels: dict[str, str] = {}


class WeightedCluster(_Frozen):
    cluster: str
    weight: int


class RetryPolicy(_Frozen):
    """Seconds for times. ``retry_on`` is a tuple of Envoy retry conditions."""

    attempts: int
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()
    retriable_status_codes: tuple[int, ...] = ()
    backoff_base: float = 0.025       # Envoy base_interval 25 ms; max interval = 10 x base
    retry_non_idempotent: bool = False


class FaultPolicy(_Frozen):
    delay: float | None = None        # seconds
    delay_percentage: float = 0.0     # 0..100
    abort_status: int | None = None
    abort_percentage: float = 0.0
    abort_grpc_status: int | None = None  # gRPC code of a gRPC abort (then abort_status is None)


class MirrorPolicy(_Frozen):
    cluster: str
    percentage: float = 100.0


class HeaderOps(_Frozen):
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class Redirect(_Frozen):
    path: str | None = None
    authority: str | None = None
    status: int = 301


class DirectResponse(_Frozen):
    status: int
    body: str = ""


class Route(_Frozen):
    """A route matches if any of ``matches`` matches (empty tuple = match all). Exactly one of
    ``clusters``, ``redirect``, ``direct_response`` carries the action."""

    name: str
    matches: tuple[RouteMatch, ...]
    clusters: tuple[WeightedCluster, ...]
    timeout: float | None = None      # seconds until response headers; None = no limit
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirror: MirrorPolicy | None = None
    prefix_rewrite: str | None = None
    matched_prefix: str | None = None  # the path prefix the rewrite replaces
    authority_rewrite: str | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None


class TcpRoute(_Frozen):
    """Istio TCPRoute: matches when any of ``ports`` is the addressed port (empty: any port),
    then one of ``clusters`` is drawn by weight (sum 100)."""

    name: str
    ports: tuple[int, ...]
    clusters: tuple[WeightedCluster, ...]


class VirtualHost(_Frozen):
    host: str
    routes: tuple[Route, ...]
    tcp_routes: tuple[TcpRoute, ...] = ()  # first match wins; none matching: the default cluster


class HashPolicy(_Frozen):
    header: str | None = None
    cookie: str | None = None
    query_param: str | None = None
    source_ip: bool = False
    ring_size: int = 1024


class CircuitBreakers(_Frozen):
    """Envoy cluster circuit_breakers thresholds (defaults 1024/1024/1024/3)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


class OutlierDetection(_Frozen):
    """Seconds for times, percentages 0..100 (Envoy outlier_detection)."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0
    consecutive_local_origin_failures: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 50.0


class HealthCheck(_Frozen):
    path: str | None = None
    tcp: bool = False
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter: float = 0.0


class RetryBudget(_Frozen):
    percent: float = 20.0
    min_concurrency: int = 3


class Locality(_Frozen):
    region_label: str = "region"
    zone_label: str = "zone"


class Cluster(_Frozen):
    name: str
    host: str
    subset: str
    lb_policy: str = "round_robin"
    hash_policy: HashPolicy | None = None
    locality: Locality | None = None
    slow_start: float | None = None        # seconds of warm-up for new endpoints
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    outlier: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    retry_budget: RetryBudget | None = None
    protocol: str = ""                     # destination rule's: http|http2|grpc|tcp, "" = undeclared
    connect_timeout: float = 1.0           # seconds (linkerd outbound default)
    idle_timeout: float = 3600.0           # seconds (Envoy default 1 h)
    max_connection_duration: float | None = None


class Endpoint(_Frozen):
    """One instance's inbound sidecar; its identity is ``spiffe://<td>/ns/<namespace>/sa/<service>``
    with the service being the cluster's host."""

    address: str
    port: int
    instance_id: str = ""
    labels: dict[str, str] = {}
    namespace: str = "default"
    protocol: str = ""  # the registry's declaration (Instance.protocol); "" = undeclared


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


class AuthzSource(_Frozen):
    """Istio ``Source``; patterns as written in the rule (see ``sidecar.core.authz``);
    IP blocks in CIDR form (``"10.0.0.1"`` -> ``"10.0.0.1/32"``)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


class AuthzHeader(_Frozen):
    name: str  # lower-case
    values: tuple[str, ...]


class AuthzOperation(_Frozen):
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    headers: tuple[AuthzHeader, ...] = ()


class AuthzRule(_Frozen):
    """``source`` AND ``operation``; None matches anything."""

    source: AuthzSource | None = None
    operation: AuthzOperation | None = None


class AuthzPolicy(_Frozen):
    """One AuthorizationPolicy, enforced by the inbound sidecar of ``host`` (``"*"``: all)."""

    name: str
    host: str
    action: str  # "ALLOW" | "DENY" | "AUDIT"
    dry_run: bool = False
    rules: tuple[AuthzRule, ...] = ()


class RateLimit(_Frozen):
    """A rate limit on calls to ``host`` (``route``: one named route, ``""``: all).

    Local: a token bucket of ``burst`` tokens refilled at ``rate_per_sec`` per calling sidecar
    and key value. Global: ``requests_per_unit`` per fixed ``window`` (seconds) for all callers
    together, handed out by meshd in slices. ``key``: ``""``, ``"source_principal"`` or
    ``"header:<lower-case name>"``."""

    name: str
    host: str
    rate_per_sec: float
    burst: int
    requests_per_unit: int
    window: float  # seconds: 1, 60 or 3600
    route: str = ""
    key: str = ""
    scope: str = "local"  # "local" | "global"


class Snapshot(_Frozen):
    version: Version
    node: str
    listeners: tuple[Listener, ...] = ()
    virtual_hosts: tuple[VirtualHost, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    endpoints: tuple[ClusterEndpoints, ...] = ()
    egress: tuple[EgressEntry, ...] = ()
    authorization: tuple[AuthzPolicy, ...] = ()
    ratelimits: tuple[RateLimit, ...] = ()

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
