"""Default limits of the sidecar's HTTP/2 layer, each with the precedent it copies.

Sizes are bytes, durations seconds, rates per second. ``H2Limits`` bundles one downstream
connection's limits (``serve_h2``) and ``H2ClientLimits`` the upstream pool's (``H2Pool``); both
are frozen and validated (``ConfigError`` naming the field).

Why the sidecar counts itself: the ``h2`` library caps CONTINUATION frames (64) and the decoded
header list (HPACK bomb), but has no rapid-reset or control-frame-flood protection
(style-and-reliability §B.4: 50 000 HEADERS+RST_STREAM cost 6 s of CPU, connection still open).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.http.limits import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from sidecar.http.limits import (
    HEADER_READ_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_RECV,
    MAX_REQUEST_HEADERS_BYTES,
    MAX_REQUEST_HEADERS_COUNT,
    POOL_IDLE_TIMEOUT,
    RESPONSE_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    check_positive,
)

# -- streams and flow control ------------------------------------------------------------------
MAX_CONCURRENT_STREAMS = 100  # Envoy edge guide; h2 and hypercorn default 100
INITIAL_STREAM_WINDOW = 64 * 1024  # Envoy edge guide initial_stream_window_size 64 KiB
CONNECTION_WINDOW = 1024 * 1024  # Envoy edge guide initial_connection_window_size 1 MiB
MAX_FRAME_SIZE = 16 * 1024  # RFC 9113 SETTINGS_MAX_FRAME_SIZE initial value
# DATA queued for a connection's writer before a stream waits for the socket; asyncio's
# transport write-buffer high-water mark (FlowControlMixin) is 64 KiB
WRITE_HIGH_WATER = 64 * 1024
# idle HTTP/1.1 connections kept per app endpoint by the inbound: the streams of one HTTP/2
# connection fan out to as many HTTP/1.1 connections, so keep more than MAX_CONCURRENT_STREAMS
# (with the HTTP/1.1 pool's 32, 100 streams reopened a connection for ~40 % of requests)
H2_FANOUT_IDLE = 128

# -- headers (per stream: 431 and stream end; HPACK bomb: connection error) -------------------
MAX_HEADERS_BYTES = MAX_REQUEST_HEADERS_BYTES  # 60 KiB, Envoy max_request_headers_kb (HTTP/2 too)
MAX_HEADERS_COUNT = MAX_REQUEST_HEADERS_COUNT  # 100, Envoy max_headers_count
HPACK_MAX_DECODED_BYTES = 64 * 1024  # h2 DEFAULT_MAX_HEADER_LIST_SIZE; hypercorn h2_max_header_list_size
HPACK_TABLE_SIZE = 4096  # RFC 7541 SETTINGS_HEADER_TABLE_SIZE default; Envoy keeps 4096

# -- abuse (CVE-2023-44487 rapid reset, CVE-2019-9512/9515 PING/SETTINGS floods) ---------------
RAPID_RESET_MIN_STREAMS = 500  # Envoy premature_reset_total_stream_count
RAPID_RESET_RATIO = 0.5  # Envoy: >= 50 % of closed streams reset prematurely
PREMATURE_RESET_SECONDS = 1.0  # Envoy premature_reset_min_stream_lifetime_seconds
MAX_CONTROL_FRAMES_PER_SECOND = 1000  # Envoy max_outbound_control_frames (PING/SETTINGS ACKs)
MAX_STREAMS_PER_CONNECTION = 0  # 0 = unlimited (Envoy max_requests_per_connection default)

# -- timers ------------------------------------------------------------------------------------
PREFACE_TIMEOUT = HEADER_READ_TIMEOUT  # client preface + first SETTINGS; linkerd detect 10 s
DRAIN_TIMEOUT = 5.0  # after GOAWAY, streams may finish for this long; Envoy drain_timeout 5 s
PING_TIMEOUT = 10.0  # upstream connection health; gRPC keepalive timeout default 20 s, halved


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Limits of one downstream HTTP/2 connection (``serve_h2``)."""

    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    initial_stream_window: int = INITIAL_STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_headers_bytes: int = MAX_HEADERS_BYTES
    max_headers_count: int = MAX_HEADERS_COUNT
    hpack_max_decoded_bytes: int = HPACK_MAX_DECODED_BYTES
    rapid_reset_min_streams: int = RAPID_RESET_MIN_STREAMS
    rapid_reset_ratio: float = RAPID_RESET_RATIO
    premature_reset_seconds: float = PREMATURE_RESET_SECONDS
    max_control_frames_per_second: int = MAX_CONTROL_FRAMES_PER_SECOND
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    preface_timeout: float = PREFACE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    max_recv: int = MAX_RECV

    def __post_init__(self) -> None:
        check_positive(self, allow_zero=("max_streams_per_connection",))


@dataclass(frozen=True, slots=True)
class H2ClientLimits:
    """Limits of the upstream HTTP/2 pool (``H2Pool``)."""

    connect_timeout: float = CONNECT_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    idle_timeout: float = POOL_IDLE_TIMEOUT
    initial_stream_window: int = INITIAL_STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_headers_count: int = MAX_HEADERS_COUNT
    hpack_max_decoded_bytes: int = HPACK_MAX_DECODED_BYTES
    max_recv: int = MAX_RECV

    def __post_init__(self) -> None:
        check_positive(self)


DEFAULT_H2_LIMITS = H2Limits()
DEFAULT_H2_CLIENT_LIMITS = H2ClientLimits()
