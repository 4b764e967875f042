"""Cluster circuit breakers and retry budget as counters (Envoy ``circuit_breakers``), pure code.

One ``CircuitBreaker`` per cluster per sidecar. The caller (the trio executor) owns the waiting;
this class only counts and decides::

    verdict = cb.admit()                    # "go" | "queue" | "overflow"
    "go"       -> cb.start_request() ... cb.finish_request()
    "queue"    -> cb.start_pending(); wait for a release (finish_request / update);
                  verdict = cb.admit(queued=True) until "go" (then cb.finish_pending();
                  cb.start_request()) or "overflow"/give-up (then cb.finish_pending())
    "overflow" -> answer 503 with response flag UO (the overflow is already counted)

    if cb.try_start_retry(): <back-off, admit/start_request the retry> ... cb.finish_retry()

HTTP/1.1 carries one request per connection, so active requests are bounded by
``min(max_connections, max_requests)``. Which limit binds decides the verdict, as in Envoy's
``ConnPoolImplBase``: when no connection can be opened (``max_connections``) the request waits in
the pending queue (``max_pending_requests``, overflow = ``upstream_rq_pending_overflow``); when a
connection could be opened but ``max_requests`` refuses the stream, the request fails at once.
A request arriving while others are queued queues behind them (Envoy serves its pending queue
first when a connection frees up), so queued callers must pass ``queued=True``.

Retry limit (Envoy ``ResourceManagerImpl::RetryBudgetImpl``): without a budget, ``max_retries``
concurrent retries; with a budget, ``max(min_concurrency, int(percent% of (active + pending)))``
and the budget *replaces* ``max_retries`` ("If this field is set, the retry budget will override
any configured retry circuit breaker"). A retry attempt is also a request: it goes through
``admit``/``start_request`` like the first try and counts in ``active_requests``.

Misuse (finishing what was not started) raises RuntimeError: it is a bug in the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshd.snapshot.model import CircuitBreakers, RetryBudget

Admission = Literal["go", "queue", "overflow"]


@dataclass(frozen=True, slots=True)
class BreakerStats:
    """Gauges and overflow counters (Envoy ``upstream_rq_active``, ``upstream_rq_pending_active``,
    ``upstream_rq_retry`` gauges; ``upstream_rq_pending_overflow``, ``upstream_rq_retry_overflow``)."""

    active_requests: int
    pending_requests: int
    active_retries: int
    requests_overflow: int  # refused by max_requests
    pending_overflow: int  # refused by max_pending_requests
    retries_overflow: int  # refused by max_retries / retry budget
    retry_limit: int  # concurrent retries allowed right now

    @property
    def overflows(self) -> dict[str, int]:
        """``{"requests": n, "pending": n, "retries": n}``."""
        return {"requests": self.requests_overflow, "pending": self.pending_overflow,
                "retries": self.retries_overflow}


class CircuitBreaker:
    """Counters of one cluster. Not thread-safe; call from one trio task tree only."""

    def __init__(self, thresholds: CircuitBreakers, budget: RetryBudget | None = None) -> None:
        self._t = thresholds
        self._budget = budget
        self._active = 0
        self._pending = 0
        self._retries = 0
        self._over_requests = 0
        self._over_pending = 0
        self._over_retries = 0

    def update(self, thresholds: CircuitBreakers, budget: RetryBudget | None) -> None:
        """Apply a new snapshot's limits; in-flight counts are kept (lowered limits only refuse
        new work, nothing in flight is cut). Wake queued callers afterwards: limits may have grown."""
        self._t = thresholds
        self._budget = budget

    @property
    def capacity(self) -> int:
        """Concurrent requests allowed: ``min(max_connections, max_requests)`` (HTTP/1.1)."""
        return min(self._t.max_connections, self._t.max_requests)

    def admit(self, *, queued: bool = False) -> Admission:
        """Decide for one request. ``queued=True``: the caller already holds a pending slot
        (it got "queue" and called ``start_pending``), so it is never refused for a full queue.
        Each "overflow" is counted once, under the limit that refused it."""
        t = self._t
        if self._active < self.capacity and (queued or self._pending == 0):
            return "go"
        if self._active >= t.max_requests and t.max_requests < t.max_connections:
            self._over_requests += 1
            return "overflow"
        if queued or self._pending < t.max_pending_requests:
            return "queue"
        self._over_pending += 1
        return "overflow"

    def start_request(self) -> None:
        self._active += 1

    def finish_request(self) -> None:
        self._active = _dec(self._active, "finish_request")

    def start_pending(self) -> None:
        self._pending += 1

    def finish_pending(self) -> None:
        self._pending = _dec(self._pending, "finish_pending")

    def retry_limit(self) -> int:
        """Concurrent retries allowed now (see module docstring for the Envoy formula)."""
        if self._budget is None:
            return self._t.max_retries
        in_flight = self._active + self._pending
        return max(int(self._budget.percent * in_flight / 100.0), self._budget.min_concurrency)

    def try_start_retry(self) -> bool:
        """Take a retry slot; False (and one ``retries`` overflow counted) when none is left."""
        if self._retries < self.retry_limit():
            self._retries += 1
            return True
        self._over_retries += 1
        return False

    def finish_retry(self) -> None:
        """Release the slot once the retried attempt has finished (Envoy holds it until then)."""
        self._retries = _dec(self._retries, "finish_retry")

    def statistics(self) -> BreakerStats:
        return BreakerStats(
            active_requests=self._active,
            pending_requests=self._pending,
            active_retries=self._retries,
            requests_overflow=self._over_requests,
            pending_overflow=self._over_pending,
            retries_overflow=self._over_retries,
            retry_limit=self.retry_limit(),
        )


def _dec(value: int, what: str) -> int:
    if value <= 0:
        raise RuntimeError(f"{what}() without a matching start")
    return value - 1
