"""Rules v1: the TOML schema as frozen msgspec structs (shape only; semantics in ``validate``).

A rules file holds any number of five kinds, each an array of tables::

    [[route]]          Istio VirtualService (RouteRule):   host -> ordered HTTP routes
    [[destination]]    Istio DestinationRule (Policy):     subsets by label + load balancer
    [[egress]]         Istio ServiceEntry (EgressRule):    allowed host:ports outside the mesh
    [[authorization]]  Istio AuthorizationPolicy:          ALLOW/DENY/AUDIT by principal, IP, L7
    [[ratelimit]]      Envoy local / global rate limit:    token buckets per host, route, key

Field names follow Istio's (``match``, ``uri``-like ``path``, ``headers``, ``subset``,
``weight``, ``subsets``, ``labels``, ``load_balancer``) in TOML's snake_case. Full reference
with examples: ``docs/rules.md``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

LoadBalancer = Literal["round_robin", "least_request", "random", "ring_hash", "maglev"]
KINDS = ("route", "destination", "egress", "authorization", "ratelimit")
AuthzAction = Literal["ALLOW", "DENY", "AUDIT"]
RateUnit = Literal["second", "minute", "hour"]
RateScope = Literal["local", "global"]
Protocol = Literal["http", "http2", "grpc", "tcp"]  # Istio port protocols meshd speaks
Duration = str  # "250ms", "2s", "1.5m", "1h" — parsed by ``meshd.rules.units.duration``


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


class StringMatch(_Strict):
    """Istio StringMatch: exactly one of ``exact``, ``prefix``, ``suffix``, ``regex`` (full match),
    ``present = true`` (header/query param exists, any value) or ``absent = true``; ``invert``
    negates the result (Envoy ``invert_match``)."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    present: bool | None = None
    absent: bool | None = None
    invert: bool = False


class HTTPMatch(_Strict):
    """One match block; its conditions are ANDed, blocks of a route are ORed (Istio).

    ``source`` / ``source_labels`` match the *calling* service (the sidecar doing the routing)
    and its instance labels, as Istio's ``sourceLabels``; ``port`` is the destination port.
    """

    path: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = {}
    query_params: dict[str, StringMatch] = {}
    port: int | None = None
    source: str | None = None
    source_labels: dict[str, str] = {}


class RouteDestination(_Strict):
    """A weighted destination: ``subset`` of ``host`` (default: the rule's host)."""

    subset: str | None = None
    host: str | None = None
    weight: int | None = None


class Retries(_Strict):
    """Istio HTTPRetry. ``retry_on``: comma list of 5xx, gateway-error, reset, connect-failure,
    refused-stream, retriable-4xx, retriable-status-codes (with ``retriable_status_codes``)."""

    attempts: int = 2
    per_try_timeout: Duration | None = None
    retry_on: str = "connect-failure,refused-stream,reset,gateway-error"
    retriable_status_codes: list[int] = []
    backoff: Duration = "25ms"          # Envoy base interval; max is 10x
    retry_non_idempotent: bool = False


class FaultDelay(_Strict):
    fixed: Duration
    percentage: float = 100.0


class FaultAbort(_Strict):
    """Istio HTTPFaultInjection.Abort: exactly one of ``status`` (httpStatus) and
    ``grpc_status`` (grpcStatus, a gRPC code name such as ``"UNAVAILABLE"``)."""

    status: int | None = None
    grpc_status: str | None = None
    percentage: float = 100.0


class Fault(_Strict):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class Mirror(_Strict):
    host: str | None = None
    subset: str | None = None
    percentage: float = 100.0


class Rewrite(_Strict):
    path_prefix: str | None = None     # replaces the matched path prefix (Istio rewrite.uri)
    authority: str | None = None


class Redirect(_Strict):
    path: str | None = None
    authority: str | None = None
    status: int = 301


class DirectResponse(_Strict):
    status: int
    body: str = ""


class HeaderOps(_Strict):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: list[str] = []


class Headers(_Strict):
    request: HeaderOps | None = None
    response: HeaderOps | None = None


class HTTPRoute(_Strict):
    name: str = ""
    match: list[HTTPMatch] = []
    destinations: list[RouteDestination] = []
    timeout: Duration | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    headers: Headers | None = None


class TCPMatch(_Strict):
    """Istio L4MatchAttributes: ``port`` is the service port the client addressed."""

    port: int | None = None


class TCPRoute(_Strict):
    """Istio TCPRoute: the first route whose match (any block; none = all) fits the connection
    sends it to one weighted destination."""

    name: str = ""
    match: list[TCPMatch] = []
    destinations: list[RouteDestination] = []


class RouteRule(_Strict):
    name: str
    host: str
    http: list[HTTPRoute] = []
    tcp: list[TCPRoute] = []


class Subset(_Strict):
    name: str
    labels: dict[str, str] = {}


class ConsistentHash(_Strict):
    """Hash key for ring_hash/maglev: exactly one of header, cookie, query_param, source_ip."""

    header: str | None = None
    cookie: str | None = None
    query_param: str | None = None
    source_ip: bool | None = None
    ring_size: int = 1024            # Envoy minimum_ring_size default


class ConnectionPool(_Strict):
    """Istio connectionPool, flattened. Limits per destination (all subsets share them)."""

    max_connections: int = 1024              # Envoy circuit breaker defaults
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    connect_timeout: Duration = "1s"         # linkerd outbound connect timeout
    idle_timeout: Duration = "1h"            # Envoy idle_timeout default
    max_connection_duration: Duration | None = None


class OutlierDetection(_Strict):
    consecutive_5xx: int = 5                 # Envoy defaults
    consecutive_gateway_errors: int = 0      # 0 = off
    consecutive_local_origin_failures: int = 5
    interval: Duration = "10s"
    base_ejection_time: Duration = "30s"
    max_ejection_percent: float = 10.0
    min_health_percent: float = 50.0         # panic threshold (Envoy healthy_panic_threshold)


class HealthCheck(_Strict):
    """Active health checks by each sidecar: HTTP GET ``path`` (2xx = healthy) or TCP connect."""

    path: str | None = None
    tcp: bool = False
    interval: Duration = "5s"
    timeout: Duration = "1s"
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    jitter: Duration = "0s"


class RetryBudget(_Strict):
    """Envoy retry_budget: active retries <= max(min_concurrency, percent of active requests)."""

    percent: float = 20.0
    min_concurrency: int = 3


class Locality(_Strict):
    """Prefer endpoints in the caller's region/zone labels; fail over by priority (Envoy)."""

    enabled: bool = True
    region_label: str = "region"
    zone_label: str = "zone"


class DestinationRule(_Strict):
    name: str
    host: str
    load_balancer: LoadBalancer = "round_robin"
    protocol: Protocol | None = None   # the host's port protocol; overrides the registry's
    subsets: list[Subset] = []
    consistent_hash: ConsistentHash | None = None
    locality: Locality | None = None
    slow_start: Duration | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    retry_budget: RetryBudget | None = None


class EgressRule(_Strict):
    """Allow outbound traffic to ``host`` on ``ports``; ``endpoints`` pins addresses
    (``"ip:port"``, ServiceEntry STATIC resolution), otherwise the host is resolved by DNS."""

    name: str
    host: str
    ports: list[int] = msgspec.field(default_factory=lambda: [80])
    endpoints: list[str] = []


class AuthzSource(_Strict):
    """Istio ``Source`` (the ``from`` table of a rule): the fields set are ANDed, each list ORed.

    Principals are SPIFFE IDs, exact or with one ``*`` at the start or end
    (``spiffe://td/ns/prod/*``, ``*/sa/svca``); ``"*"`` alone is any authenticated peer.
    ``ip_blocks``: CIDRs or single addresses of the connection's source."""

    principals: list[str] = []
    not_principals: list[str] = []
    ip_blocks: list[str] = []
    not_ip_blocks: list[str] = []


class AuthzOperation(_Strict):
    """Istio ``Operation`` (the ``to`` table of a rule): the fields set are ANDed, each list ORed;
    ``headers`` maps a lower-case header name to accepted values (exact, ``pre*``, ``*suf``, ``*``)."""

    methods: list[str] = []
    not_methods: list[str] = []
    paths: list[str] = []
    not_paths: list[str] = []
    ports: list[int] = []
    not_ports: list[int] = []
    headers: dict[str, list[str]] = {}


class AuthzRule(_Strict):
    """One rule: ``from`` AND ``to`` (either may be left out: matches anything)."""

    from_: AuthzSource | None = msgspec.field(default=None, name="from")
    to: AuthzOperation | None = None


class AuthorizationRule(_Strict):
    """Istio AuthorizationPolicy for the inbound side of ``host`` (``"*"``: every service).

    An ALLOW policy without rules matches nothing (deny all); ``dry_run`` policies are evaluated
    and reported, never enforced."""

    name: str
    host: str
    action: AuthzAction
    dry_run: bool = False
    rules: list[AuthzRule] = []


class RateLimitRule(_Strict):
    """``requests_per_unit`` per ``unit`` to ``host`` (one of its named http ``route``s when set).

    ``scope = "local"``: a token bucket in each calling sidecar (``burst`` tokens, refilled at
    the rate); ``"global"``: one fixed-window quota shared by all callers, handed out by meshd
    in slices. ``key``: ``""`` (one bucket), ``"source_principal"`` or ``"header:<name>"``
    (one bucket per value)."""

    name: str
    host: str
    requests_per_unit: int
    unit: RateUnit
    route: str = ""
    burst: int | None = None
    key: str = ""
    scope: RateScope = "local"


class RulesFile(_Strict):
    route: list[RouteRule] = []
    destination: list[DestinationRule] = []
    egress: list[EgressRule] = []
    authorization: list[AuthorizationRule] = []
    ratelimit: list[RateLimitRule] = []


Rule = RouteRule | DestinationRule | EgressRule | AuthorizationRule | RateLimitRule


def kind_of(rule: Rule) -> str:
    """``"route"``, ``"destination"``, ``"egress"``, ``"authorization"`` or ``"ratelimit"``."""
    if isinstance(rule, RouteRule):
        return "route"
    if isinstance(rule, DestinationRule):
        return "destination"
    if isinstance(rule, AuthorizationRule):
        return "authorization"
    if isinstance(rule, RateLimitRule):
        return "ratelimit"
    return "egress"


RULE_TYPES: dict[str, type[Rule]] = {
    "route": RouteRule,
    "destination": DestinationRule,
    "egress": EgressRule,
    "authorization": AuthorizationRule,
    "ratelimit": RateLimitRule,
}
