"""Istio standard metrics for one sidecar, Prometheus text exposition via prometheus_client.

Names and labels are Istio's (istio.io "Istio Standard Metrics") so Grafana/Kiali dashboards work:
``istio_requests_total`` (counter) and ``istio_request_duration_milliseconds`` (histogram with
Envoy's default buckets); for TCP connections ``istio_tcp_connections_opened_total``,
``istio_tcp_connections_closed_total``, ``istio_tcp_sent_bytes_total`` (bytes sent to the
downstream: the response direction) and ``istio_tcp_received_bytes_total`` (bytes received from
the downstream), with the HTTP labels minus ``response_code``/``grpc_response_status``
(``request_protocol`` ``tcp``). ``reporter`` is ``source`` on the outbound side and
``destination`` on the inbound side; unknown values are the literal ``"unknown"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# Envoy/Istio default histogram buckets, milliseconds (ecosystem-conventions.md §7)
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                       60000, 300000, 600000, 1800000, 3600000)
LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_service",
    "destination_service_name", "destination_service_namespace", "request_protocol",
    "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
TCP_LABELS = tuple(n for n in LABELS if n not in ("response_code", "grpc_response_status"))
UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a request as metrics see it."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    principal: str = UNKNOWN


@dataclass(frozen=True, slots=True)
class TcpChildren:
    """The four TCP counters of one label set: ``opened``, ``closed``, ``sent``, ``received``
    (prometheus_client children; ``inc(n)``)."""

    opened: Any
    closed: Any
    sent: Any
    received: Any


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("istio_requests", "Requests handled by the sidecar", LABELS,
                                registry=self.registry)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "Request duration in milliseconds", LABELS,
                                  buckets=DURATION_BUCKETS_MS, registry=self.registry)
        # label values -> (requests child, duration child); as many entries as the metrics have
        # children (never removed), so no bound of its own
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self.snapshot_applied = Gauge("meshd_sidecar_snapshot_applied_timestamp_seconds",
                                      "Unix time the current snapshot was applied",
                                      registry=self.registry)
        self.meshd_connected = Gauge("meshd_sidecar_control_plane_connected",
                                     "1 while the last meshd call succeeded",
                                     registry=self.registry)
        self.nacks = Counter("meshd_sidecar_snapshot_rejected", "Snapshots NACKed",
                             registry=self.registry)
        self.authz_denied = Counter("meshd_sidecar_authz_denied", "Requests denied (403)",
                                    ["policy"], registry=self.registry)
        self.authz_dry_run = Counter("meshd_sidecar_authz_dry_run_denied",
                                     "Requests a dry-run policy would deny", ["policy"],
                                     registry=self.registry)
        self.tcp_opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                                  TCP_LABELS, registry=self.registry)
        self.tcp_closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                                  TCP_LABELS, registry=self.registry)
        self.tcp_sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the downstream (response)",
                                TCP_LABELS, registry=self.registry)
        self.tcp_received = Counter("istio_tcp_received_bytes",
                                    "Bytes received from the downstream (request)", TCP_LABELS,
                                    registry=self.registry)
        self._tcp_children: dict[tuple[str, ...], TcpChildren] = {}  # as _children
        self.rate_limited = Counter("meshd_sidecar_rate_limited", "Requests refused with 429",
                                    ["limit"], registry=self.registry)

    def observe(self, *, reporter: str, source: Peer, destination: Peer, service: str,
                code: int, flags: str, millis: float, grpc_status: str = "-") -> None:
        """``grpc_status``: the gRPC status code of a gRPC exchange (``request_protocol``
        ``grpc``), else ``"-"`` (``request_protocol`` ``http``)."""
        values = (
            reporter, source.workload, source.namespace, source.principal, source.app,
            source.version, destination.workload, destination.namespace, destination.principal,
            destination.app, destination.version, service, service.split(".")[0],
            destination.namespace, "http" if grpc_status == "-" else "grpc", str(code), grpc_status,
            flags or "-",
            _security(reporter, source),
        )
        children = self._children.get(values)
        if children is None:  # labels() validates and locks: once per label set, not per request
            children = (self.requests.labels(*values), self.duration.labels(*values))
            self._children[values] = children
        children[0].inc()
        children[1].observe(millis)

    def tcp(self, *, reporter: str, source: Peer, destination: Peer, service: str,
            flags: str) -> TcpChildren:
        """The TCP counters of one connection's labels (cached per label set, as ``observe``);
        the caller increments them: ``opened`` once, ``sent``/``received`` by bytes, ``closed``
        once at the end."""
        values = (
            reporter, source.workload, source.namespace, source.principal, source.app,
            source.version, destination.workload, destination.namespace, destination.principal,
            destination.app, destination.version, service, service.split(".")[0],
            destination.namespace, "tcp", flags or "-", _security(reporter, source),
        )
        children = self._tcp_children.get(values)
        if children is None:
            children = TcpChildren(self.tcp_opened.labels(*values), self.tcp_closed.labels(*values),
                                   self.tcp_sent.labels(*values), self.tcp_received.labels(*values))
            self._tcp_children[values] = children
        return children

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) negotiated from the scrape's Accept header."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _security(reporter: str, source: Peer) -> str:
    """Istio ``connection_security_policy``: "unknown" on the source side; on the destination
    side "mutual_tls" when the caller proved a SPIFFE ID, else "none"."""
    if reporter != "destination":
        return UNKNOWN
    return "mutual_tls" if source.principal != UNKNOWN else "none"
