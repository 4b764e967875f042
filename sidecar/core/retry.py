"""Retry decisions as pure code: Envoy router retry semantics (``x-envoy-retry-on``, Istio HTTPRetry).

Shapes and units::

    retriable(policy, status=503)                    -> bool   the upstream answered ``status``
    retriable(policy, status=200, grpc_status=14)    -> bool   gRPC trailers-only answer
    retriable(policy, failure="connect-failure")     -> bool   no answer at all (local origin)
    may_retry_request(policy, "POST", body_replayable=True)  -> bool
    backoff(attempt, base_seconds, draw)             -> seconds to wait before retry ``attempt``

``RetryPolicy.attempts`` is Istio's ``attempts`` = Envoy ``num_retries``: the number of *retries*, so
a request is tried at most ``attempts + 1`` times. The per-try timeout, the attempt count and the
cluster-wide retry limit (``circuit.CircuitBreaker.try_start_retry``) are the caller's business.

Conditions of ``RetryPolicy.retry_on``, as Envoy's ``RetryStateImpl::wouldRetryFromHeaders`` and
``wouldRetryFromReset`` read them:

=======================  ==============================================================
``5xx``                  any status 500-599, and every local-origin failure (Envoy counts a
                         reset "as a 5xx since it will result in one")
``gateway-error``        status 502/503/504, and every local-origin failure (a per-try timeout
                         becomes Envoy's 504, a reset or connect failure its 503)
``reset``                every local-origin failure (disconnect/reset/read timeout); no status
``connect-failure``      ``failure == "connect-failure"`` only
``refused-stream``       ``failure == "refused-stream"`` only (HTTP/2 REFUSED_STREAM)
``retriable-4xx``        status 409 only
``retriable-status-codes``  status in ``policy.retriable_status_codes``
``cancelled`` ...        gRPC conditions (``x-envoy-retry-grpc-on``): the ``grpc_status``
                         argument equals the named code
=======================  ==============================================================

Unknown conditions never match (the rules validator rejects them; see ``RETRY_ON_CONDITIONS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from meshd.snapshot.model import RetryPolicy

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2

Failure = Literal["connect-failure", "reset", "timeout", "refused-stream"]
LOCAL_FAILURES: frozenset[str] = frozenset({"connect-failure", "reset", "timeout", "refused-stream"})

GATEWAY_ERRORS = frozenset({502, 503, 504})  # Envoy Http::CodeUtility::isGatewayError
RETRIABLE_4XX = frozenset({409})  # Envoy retriable-4xx: "currently only 409"

# x-envoy-retry-grpc-on vocabulary -> grpc-status code (gRPC status codes spec)
GRPC_RETRY_ON: dict[str, int] = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}

RETRY_ON_CONDITIONS = frozenset(
    {"5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
     "retriable-status-codes", *GRPC_RETRY_ON}
)

# Istio HTTPRetry default retryOn (networking/v1alpha3 VirtualService docs)
ISTIO_DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled",
                          "retriable-status-codes")

MAX_INTERVAL_FACTOR = 10  # Envoy retry back-off max_interval default: 10 x base_interval
_MAX_EXPONENT = 4  # 2**4 = 16 > MAX_INTERVAL_FACTOR: larger exponents cannot change the cap


def retriable(
    policy: RetryPolicy,
    *,
    status: int | None = None,
    failure: Failure | None = None,
    grpc_status: int | None = None,
) -> bool:
    """Whether ``policy.retry_on`` asks for a retry of this outcome.

    Pass exactly one of ``status`` (the upstream's HTTP status) or ``failure`` (no response: a
    local-origin failure). ``grpc_status`` (from a trailers-only gRPC answer) may accompany
    ``status`` and is matched against the gRPC conditions. Raises ValueError otherwise.
    """
    if (status is None) == (failure is None):
        raise ValueError("pass exactly one of status= or failure=")
    if failure is not None:
        if failure not in LOCAL_FAILURES:
            raise ValueError(f"unknown local failure {failure!r}")
        if grpc_status is not None:
            raise ValueError("grpc_status comes with a response status, not with a failure")
        return _retriable_failure(policy.retry_on, failure)
    assert status is not None
    return _retriable_status(policy, status, grpc_status)


def _retriable_failure(retry_on: tuple[str, ...], failure: str) -> bool:
    for cond in retry_on:
        if cond in ("5xx", "gateway-error", "reset"):
            return True
        if cond == failure and cond in ("connect-failure", "refused-stream"):
            return True
    return False


def _retriable_status(policy: RetryPolicy, status: int, grpc_status: int | None) -> bool:
    for cond in policy.retry_on:
        if cond == "5xx" and 500 <= status <= 599:
            return True
        if cond == "gateway-error" and status in GATEWAY_ERRORS:
            return True
        if cond == "retriable-4xx" and status in RETRIABLE_4XX:
            return True
        if cond == "retriable-status-codes" and status in policy.retriable_status_codes:
            return True
        if grpc_status is not None and GRPC_RETRY_ON.get(cond) == grpc_status:
            return True
    return False


def may_retry_request(
    policy: RetryPolicy, method: str, body_replayable: bool, *, request_sent: bool = True
) -> bool:
    """Whether this request may be sent again at all, whatever went wrong.

    False when the request body was streamed upstream without being buffered (nothing to
    replay). Otherwise True for idempotent methods (RFC 9110), for any method when
    ``policy.retry_non_idempotent``, and for any method when ``request_sent`` is False (the
    request never reached the upstream, e.g. a connect failure: linkerd "requeues" these).
    Envoy itself retries every method; the idempotency rule is the mesh's safer default.
    """
    if not body_replayable:
        return False
    if not request_sent or policy.retry_non_idempotent:
        return True
    return method.upper() in IDEMPOTENT_METHODS


def backoff(attempt: int, base: float, draw: Callable[[float], float]) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based), Envoy fully-jittered back-off.

    ``upper = min(base * 2**(attempt-1), MAX_INTERVAL_FACTOR * base)`` and the result is
    ``draw(upper)``, which must return a float in ``[0, upper)`` (e.g.
    ``lambda u: random.random() * u``); a draw outside that range is clamped into it. Envoy's
    ``JitteredExponentialBackOffStrategy`` with the default ``max_interval`` (10 x base).
    Raises ValueError when ``attempt < 1``.
    """
    if attempt < 1:
        raise ValueError(f"retry attempt numbers start at 1, got {attempt}")
    if base <= 0.0:
        return 0.0
    upper = base * min(2 ** min(attempt - 1, _MAX_EXPONENT), MAX_INTERVAL_FACTOR)
    return min(max(draw(upper), 0.0), math.nextafter(upper, 0.0))
