"""Default limits of the sidecar's HTTP/1.1 layer, each with the precedent it copies.

Sizes are bytes, durations are seconds. ``ServerLimits`` bundles the downstream (listener)
side, ``ClientLimits`` the upstream connection pool; both are frozen and validated, so a
bad value fails at load time with a ``ConfigError`` naming the field, never mid-request.

Why our own head limits: a parser's limit (h11's ``max_incomplete_event_size``) is typically
checked only while a head is incomplete, so a large head arriving in one read slips through
(style-and-reliability §B.4), and llhttp has none. The HTTP layer therefore buffers the head
itself and enforces the caps below at every read size, the way Envoy does, before the parser
(``sidecar.http.parser``) sees the head. ``server_limits`` builds ``ServerLimits`` from a
mapping (a bootstrap table); ``docs/security.md`` lists every limit with the attack it answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from meshd.errors import ConfigError

MAX_RECV = 64 * 1024  # bytes per receive_some(); hypercorn MAX_RECV = 2**16

# -- request/response heads ------------------------------------------------------------------
MAX_REQUEST_HEADERS_BYTES = 60 * 1024  # whole head incl. request line; Envoy max_request_headers_kb
# (the *_HEADERS_BYTES limits also cap chunk extensions and trailers read without payload)
MAX_REQUEST_HEADERS_COUNT = 100  # Envoy max_headers_count -> 431
MAX_RESPONSE_HEADERS_BYTES = 60 * 1024  # Envoy applies the same codec limits upstream
MAX_RESPONSE_HEADERS_COUNT = 100  # Envoy max_headers_count

# -- downstream timers -----------------------------------------------------------------------
HEADER_READ_TIMEOUT = 10.0  # whole head from its first byte (slowloris); linkerd detect 10 s
IDLE_TIMEOUT = 75.0  # keep-alive wait for the next request; nginx keepalive_timeout 75 s
STREAM_IDLE_TIMEOUT = 300.0  # no body byte read or written for this long; Envoy 5 min
DRAIN_TIMEOUT = 1.0  # discarding an unread request body after the response
LINGER_TIMEOUT = 1.0  # half-close, then read and discard before close; Envoy delayed_close 1 s
MAX_DRAIN_BYTES = 256 * 1024  # unread body we discard to keep-alive; Go maxPostHandlerReadBytes
MAX_LINGER_BYTES = 1024 * 1024  # bytes discarded while lingering before a close
MAX_REQUESTS_PER_CONNECTION = 1000  # hypercorn keep_alive_max_requests; nginx keepalive_requests
MAX_CONNECTIONS = 10_000  # open connections per listener; Envoy edge guide listener max_connections

# -- upstream pool ---------------------------------------------------------------------------
CONNECT_TIMEOUT = 1.0  # linkerd outbound connect timeout
RESPONSE_TIMEOUT = 15.0  # request sent -> response head; Envoy route timeout default 15 s
POOL_IDLE_TIMEOUT = 5.0  # pooled idle connection lifetime; httpx/httpcore keepalive_expiry 5 s
MAX_IDLE_PER_ENDPOINT = 32  # per (host, port); Go's 2 is too few for a proxy, httpcore 20 total
REPLAY_BUFFER_BYTES = 64 * 1024  # streamed body kept to replay after a stale keep-alive
POOL_REAP_INTERVAL = 1.0  # at most one sweep of expired idle connections per second


def check_positive(obj: object, allow_zero: tuple[str, ...] = ()) -> None:
    """Raise ``ConfigError`` naming the first field of a limits dataclass that is not > 0
    (fields named in ``allow_zero`` may be 0: "unlimited")."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if not (value > 0 or (value == 0 and f.name in allow_zero)):
            raise ConfigError(f"must be > 0, got {value!r}", field=f"{type(obj).__name__}.{f.name}")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Limits of one downstream HTTP/1.1 connection (``serve_http1``)."""

    max_headers_bytes: int = MAX_REQUEST_HEADERS_BYTES
    max_headers_count: int = MAX_REQUEST_HEADERS_COUNT
    header_timeout: float = HEADER_READ_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    linger_timeout: float = LINGER_TIMEOUT
    max_drain_bytes: int = MAX_DRAIN_BYTES
    max_linger_bytes: int = MAX_LINGER_BYTES
    max_requests_per_connection: int = MAX_REQUESTS_PER_CONNECTION
    max_recv: int = MAX_RECV
    max_connections: int = MAX_CONNECTIONS  # per listener, enforced by ``server.gated``

    def __post_init__(self) -> None:
        check_positive(self)


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Limits of the upstream pool (``UpstreamPool``)."""

    connect_timeout: float = CONNECT_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    idle_timeout: float = POOL_IDLE_TIMEOUT
    max_idle_per_endpoint: int = MAX_IDLE_PER_ENDPOINT
    max_headers_bytes: int = MAX_RESPONSE_HEADERS_BYTES
    max_headers_count: int = MAX_RESPONSE_HEADERS_COUNT
    replay_buffer_bytes: int = REPLAY_BUFFER_BYTES
    max_recv: int = MAX_RECV

    def __post_init__(self) -> None:
        check_positive(self)


DEFAULT_SERVER_LIMITS = ServerLimits()
DEFAULT_CLIENT_LIMITS = ClientLimits()


def server_limits(overrides: Mapping[str, object], where: str = "limits") -> ServerLimits:
    """``ServerLimits`` with the fields named in ``overrides`` (e.g. a bootstrap ``[limits]``
    table: ``{"header_timeout": 2.0, "max_connections": 500}``); ``ConfigError`` naming
    ``<where>.<field>`` for an unknown field, a wrong type or a value that is not > 0."""
    known = {f.name: f for f in fields(ServerLimits)}
    values: dict[str, object] = {}
    for name, value in overrides.items():
        f = known.get(name)
        if f is None:
            raise ConfigError(f"unknown limit (known: {', '.join(sorted(known))})", field=f"{where}.{name}")
        ok = isinstance(value, int | float) if f.type == "float" else isinstance(value, int)
        if not ok or isinstance(value, bool):
            raise ConfigError(f"must be a number of type {f.type}, got {value!r}", field=f"{where}.{name}")
        values[name] = value
    try:
        return ServerLimits(**values)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(exc.reason, field=f"{where}.{exc.field.rpartition('.')[2]}") from None
