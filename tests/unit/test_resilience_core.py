"""Retry decisions, circuit breakers, outlier detection and health state as pure code (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.snapshot.model import (
    CircuitBreakers,
    Endpoint,
    HealthCheck,
    OutlierDetection,
    RetryBudget,
    RetryPolicy,
)
from sidecar.core.circuit import CircuitBreaker
from sidecar.core.health import HealthTracker, healthy_set, next_check_delay
from sidecar.core.outlier import MAX_EJECTION_TIME, OutlierDetector
from sidecar.core.retry import backoff, may_retry_request, retriable

# ---------------------------------------------------------------- retry


def _policy(*retry_on: str, codes: tuple[int, ...] = (), non_idempotent: bool = False) -> RetryPolicy:
    return RetryPolicy(attempts=3, retry_on=retry_on, retriable_status_codes=codes,
                       retry_non_idempotent=non_idempotent)


STATUS_TABLE = [
    # (retry_on, status, expected)
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 599, True), ("5xx", 499, False),
    ("5xx", 200, False), ("5xx", 600, False),
    ("gateway-error", 502, True), ("gateway-error", 503, True), ("gateway-error", 504, True),
    ("gateway-error", 500, False), ("gateway-error", 501, False), ("gateway-error", 505, False),
    ("reset", 503, False), ("connect-failure", 503, False), ("refused-stream", 503, False),
    ("retriable-4xx", 409, True), ("retriable-4xx", 408, False), ("retriable-4xx", 429, False),
    ("retriable-status-codes", 429, True), ("retriable-status-codes", 418, True),
    ("retriable-status-codes", 503, False),
    ("unavailable", 503, False), ("no-such-condition", 503, False),
]


@pytest.mark.parametrize(("cond", "status", "expected"), STATUS_TABLE)
def test_retriable_status_table(cond: str, status: int, expected: bool) -> None:
    assert retriable(_policy(cond, codes=(429, 418)), status=status) is expected


FAILURE_TABLE = [
    # (retry_on, failure, expected); 5xx/gateway-error/reset take every local failure (Envoy)
    *[(c, f, True) for c in ("5xx", "gateway-error", "reset")
      for f in ("connect-failure", "reset", "timeout", "refused-stream")],
    ("connect-failure", "connect-failure", True), ("connect-failure", "reset", False),
    ("connect-failure", "timeout", False), ("connect-failure", "refused-stream", False),
    ("refused-stream", "refused-stream", True), ("refused-stream", "connect-failure", False),
    ("refused-stream", "reset", False),
    ("retriable-4xx", "reset", False), ("retriable-status-codes", "timeout", False),
    ("unavailable", "connect-failure", False),
]


@pytest.mark.parametrize(("cond", "failure", "expected"), FAILURE_TABLE)
def test_retriable_failure_table(cond: str, failure: str, expected: bool) -> None:
    assert retriable(_policy(cond, codes=(503,)), failure=failure) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("cond", "grpc", "expected"), [
    ("cancelled", 1, True), ("deadline-exceeded", 4, True), ("resource-exhausted", 8, True),
    ("internal", 13, True), ("unavailable", 14, True), ("unavailable", 1, False),
    ("cancelled", 0, False),
])
def test_retriable_grpc_status(cond: str, grpc: int, expected: bool) -> None:
    assert retriable(_policy(cond), status=200, grpc_status=grpc) is expected


def test_retriable_empty_policy_and_argument_errors() -> None:
    assert retriable(_policy(), status=503) is False
    assert retriable(_policy(), failure="connect-failure") is False
    with pytest.raises(ValueError):
        retriable(_policy("5xx"))
    with pytest.raises(ValueError):
        retriable(_policy("5xx"), status=503, failure="reset")
    with pytest.raises(ValueError):
        retriable(_policy("5xx"), failure="boom")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        retriable(_policy("5xx"), failure="reset", grpc_status=14)


@pytest.mark.parametrize(("method", "replayable", "non_idem", "sent", "expected"), [
    ("GET", True, False, True, True), ("get", True, False, True, True),
    ("HEAD", True, False, True, True), ("OPTIONS", True, False, True, True),
    ("TRACE", True, False, True, True), ("PUT", True, False, True, True),
    ("DELETE", True, False, True, True),
    ("POST", True, False, True, False), ("PATCH", True, False, True, False),
    ("POST", True, True, True, True),
    ("GET", False, False, True, False), ("POST", False, True, True, False),
    ("POST", True, False, False, True), ("POST", False, False, False, False),
])
def test_may_retry_request(method: str, replayable: bool, non_idem: bool, sent: bool, expected: bool) -> None:
    policy = _policy("5xx", non_idempotent=non_idem)
    assert may_retry_request(policy, method, replayable, request_sent=sent) is expected


def test_backoff_upper_bounds_exact() -> None:
    seen: list[float] = []

    def draw(upper: float) -> float:
        seen.append(upper)
        return upper / 2

    got = [backoff(n, 0.025, draw) for n in range(1, 8)]
    assert seen == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    assert got == [0.0125, 0.025, 0.05, 0.1, 0.125, 0.125, 0.125]
    assert backoff(3, 1.0, lambda u: 0.0) == 0.0
    assert backoff(3, 1.0, lambda u: u) < 4.0  # a draw at the bound is clamped below it
    assert backoff(3, 1.0, lambda u: -5.0) == 0.0
    assert backoff(5, 0.0, lambda u: 1.0) == 0.0
    with pytest.raises(ValueError):
        backoff(0, 0.025, lambda u: 0.0)


@given(attempt=st.integers(1, 64), base=st.floats(1e-4, 10.0), frac=st.floats(0.0, 1.0))
def test_backoff_bounds_property(attempt: int, base: float, frac: float) -> None:
    upper = min(base * 2 ** (attempt - 1), 10 * base)
    got = backoff(attempt, base, lambda u: u * frac)
    assert 0.0 <= got < upper


# ---------------------------------------------------------------- circuit breaker


def test_admit_go_queue_overflow_sequence() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_connections=2, max_pending_requests=1, max_requests=10))
    assert cb.admit() == "go"
    cb.start_request()
    assert cb.admit() == "go"
    cb.start_request()
    assert cb.admit() == "queue"
    cb.start_pending()
    assert cb.admit() == "overflow"  # pending queue full
    assert cb.admit(queued=True) == "queue"  # the waiter itself keeps waiting
    cb.finish_request()
    assert cb.admit() == "overflow"  # a newcomer may not jump the waiter, and the queue is full
    s = cb.statistics()
    assert (s.active_requests, s.pending_requests, s.pending_overflow) == (1, 1, 2)
    assert cb.admit(queued=True) == "go"
    cb.finish_pending()
    cb.start_request()
    s = cb.statistics()
    assert (s.active_requests, s.pending_requests) == (2, 0)
    assert s.overflows == {"requests": 0, "pending": 2, "retries": 0}


def test_newcomer_queues_behind_waiters() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_connections=1, max_pending_requests=5))
    cb.start_request()
    assert cb.admit() == "queue"
    cb.start_pending()
    cb.finish_request()
    assert cb.admit() == "queue"  # slot free but someone is waiting
    assert cb.admit(queued=True) == "go"


def test_max_requests_below_connections_overflows_at_once() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_connections=5, max_requests=1, max_pending_requests=5))
    assert cb.admit() == "go"
    cb.start_request()
    assert cb.admit() == "overflow"
    assert cb.statistics().overflows == {"requests": 1, "pending": 0, "retries": 0}


def test_zero_pending_overflows_immediately() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_connections=1, max_pending_requests=0))
    cb.start_request()
    assert cb.admit() == "overflow"
    assert cb.statistics().pending_overflow == 1


def _fill(cb: CircuitBreaker, active: int, pending: int = 0) -> None:
    for _ in range(active):
        cb.start_request()
    for _ in range(pending):
        cb.start_pending()


def _take_retries(cb: CircuitBreaker) -> int:
    n = 0
    while cb.try_start_retry():
        n += 1
    return n


def test_retry_budget_percent_of_active() -> None:
    cb = CircuitBreaker(CircuitBreakers(), RetryBudget(percent=20.0, min_concurrency=3))
    _fill(cb, 100)
    assert _take_retries(cb) == 20  # budget replaces max_retries=3 (Envoy)
    s = cb.statistics()
    assert (s.active_retries, s.retries_overflow, s.retry_limit) == (20, 1, 20)


def test_retry_budget_min_concurrency_and_pending() -> None:
    cb = CircuitBreaker(CircuitBreakers(), RetryBudget(percent=20.0, min_concurrency=3))
    _fill(cb, 2)
    assert _take_retries(cb) == 3
    cb2 = CircuitBreaker(CircuitBreakers(), RetryBudget(percent=20.0, min_concurrency=3))
    _fill(cb2, 50, 50)
    assert _take_retries(cb2) == 20
    cb3 = CircuitBreaker(CircuitBreakers(), RetryBudget(percent=25.0, min_concurrency=1))
    _fill(cb3, 10)
    assert _take_retries(cb3) == 2  # 2.5 truncated, as Envoy's uint64 cast


def test_max_retries_without_budget_and_release() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_retries=3))
    _fill(cb, 100)
    assert _take_retries(cb) == 3
    cb.finish_retry()
    assert cb.try_start_retry() is True
    assert cb.statistics().retries_overflow == 1


def test_update_keeps_counts_and_misuse_raises() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_connections=2))
    _fill(cb, 2)
    assert cb.admit() == "queue"
    cb.update(CircuitBreakers(max_connections=4), None)
    assert cb.statistics().active_requests == 2
    assert cb.admit() == "go"
    for finish in (CircuitBreaker(CircuitBreakers()).finish_request,
                   CircuitBreaker(CircuitBreakers()).finish_pending,
                   CircuitBreaker(CircuitBreakers()).finish_retry):
        with pytest.raises(RuntimeError):
            finish()


@settings(max_examples=200)
@given(
    limits=st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 4), st.integers(0, 3)),
    budget=st.one_of(st.none(), st.builds(RetryBudget, percent=st.sampled_from([0.0, 20.0, 50.0]),
                                          min_concurrency=st.integers(0, 3))),
    ops=st.lists(st.sampled_from(["new", "done", "wake", "giveup", "retry", "retry_done"]), max_size=80),
)
def test_breaker_counters_never_negative_and_never_over_limit(limits, budget, ops) -> None:
    t = CircuitBreakers(max_connections=limits[0], max_pending_requests=limits[1],
                        max_requests=limits[2], max_retries=limits[3])
    cb = CircuitBreaker(t, budget)
    capacity = min(t.max_connections, t.max_requests)
    active = pending = retries = 0
    for op in ops:
        if op == "new":
            verdict = cb.admit()
            if verdict == "go":
                assert active < capacity
                cb.start_request()
                active += 1
            elif verdict == "queue":
                assert pending < t.max_pending_requests
                cb.start_pending()
                pending += 1
        elif op == "done" and active:
            cb.finish_request()
            active -= 1
        elif op in ("wake", "giveup") and pending:
            verdict = cb.admit(queued=True)
            if verdict == "go":
                assert active < capacity
                cb.finish_pending()
                cb.start_request()
                pending, active = pending - 1, active + 1
            elif op == "giveup" or verdict == "overflow":
                cb.finish_pending()
                pending -= 1
        elif op == "retry":
            limit = cb.retry_limit()
            if cb.try_start_retry():
                assert retries < limit
                retries += 1
        elif op == "retry_done" and retries:
            cb.finish_retry()
            retries -= 1
        s = cb.statistics()
        assert (s.active_requests, s.pending_requests, s.active_retries) == (active, pending, retries)
        assert min(active, pending, retries) >= 0
        assert active <= capacity
        assert pending <= t.max_pending_requests


# ---------------------------------------------------------------- outlier detection

A: tuple[str, int] = ("10.0.0.1", 80)
B: tuple[str, int] = ("10.0.0.2", 80)


def _od(**kw: float) -> OutlierDetector:
    return OutlierDetector(OutlierDetection(**kw))  # type: ignore[arg-type]


def test_ejection_after_exactly_n_consecutive_5xx() -> None:
    od = _od(consecutive_5xx=5, max_ejection_percent=100)
    for _ in range(4):
        assert od.record(A, now=1.0, total_hosts=2, status=500) is False
    assert od.is_ejected(A, 1.0) is False
    assert od.record(A, now=1.0, total_hosts=2, status=500) is True
    assert od.is_ejected(A, 1.0) is True
    assert od.ejected(1.0) == frozenset({A})
    s = od.statistics()
    assert (s.ejections_total, s.currently_ejected, s.by_kind["consecutive_5xx"]) == (1, 1, 1)


def test_success_resets_5xx_counter() -> None:
    od = _od(consecutive_5xx=3, max_ejection_percent=100)
    for status in (500, 503, 200, 500, 500):
        assert od.record(A, now=0.0, total_hosts=1, status=status) is False
    assert od.record(A, now=0.0, total_hosts=1, status=404) is False  # any non-5xx resets
    assert od.record(A, now=0.0, total_hosts=1, status=500) is False
    assert od.record(A, now=0.0, total_hosts=1, status=500) is False
    assert od.record(A, now=0.0, total_hosts=1, status=502) is True


def test_gateway_errors_detector() -> None:
    od = _od(consecutive_5xx=0, consecutive_gateway_errors=3, max_ejection_percent=100)
    assert od.record(A, now=0.0, total_hosts=1, status=502) is False
    assert od.record(A, now=0.0, total_hosts=1, status=503) is False
    assert od.record(A, now=0.0, total_hosts=1, status=500) is False  # non-gateway 5xx resets it
    assert od.record(A, now=0.0, total_hosts=1, status=504) is False
    assert od.record(A, now=0.0, total_hosts=1, status=502) is False
    assert od.record(A, now=0.0, total_hosts=1, status=503) is True
    assert od.statistics().by_kind["consecutive_gateway_failure"] == 1
    od2 = _od(consecutive_5xx=0, consecutive_gateway_errors=0, max_ejection_percent=100)
    assert not any(od2.record(A, now=0.0, total_hosts=1, status=503) for _ in range(50))


def test_local_origin_failures_detector() -> None:
    od = _od(consecutive_5xx=2, consecutive_local_origin_failures=3, max_ejection_percent=100)
    assert od.record(A, now=0.0, total_hosts=1, local_failure=True) is False
    assert od.record(A, now=0.0, total_hosts=1, local_failure=True) is False  # not a 5xx
    assert od.record(A, now=0.0, total_hosts=1, status=503) is False  # a response resets local
    assert od.record(A, now=0.0, total_hosts=1, local_failure=True) is False
    assert od.record(A, now=0.0, total_hosts=1, local_failure=True) is False
    assert od.record(A, now=0.0, total_hosts=1, local_failure=True) is True
    assert od.statistics().by_kind == {"consecutive_5xx": 0, "consecutive_gateway_failure": 0,
                                       "consecutive_local_origin_failure": 1}
    with pytest.raises(ValueError):
        od.record(B, now=0.0, total_hosts=1)
    with pytest.raises(ValueError):
        od.record(B, now=0.0, total_hosts=1, status=500, local_failure=True)


def _eject(od: OutlierDetector, key: tuple[str, int], now: float, total: int = 1, n: int = 5) -> bool:
    return any([od.record(key, now=now, total_hosts=total, status=503) for _ in range(n)])


def test_ejection_time_doubles_and_uneject_after_time() -> None:
    od = _od(consecutive_5xx=5, base_ejection_time=30.0, interval=10.0, max_ejection_percent=100)
    assert _eject(od, A, 0.0)
    assert od.is_ejected(A, 29.999) is True
    assert od.record(A, now=10.0, total_hosts=1, status=503) is False  # ignored while ejected
    assert od.sweep(20.0) == []
    assert od.is_ejected(A, 30.0) is False
    assert od.sweep(30.0) == [A]
    assert od.statistics().currently_ejected == 0
    # counters were reset at un-ejection: four more 5xx do not eject
    assert not _eject(od, A, 31.0, n=4)
    assert od.record(A, now=31.0, total_hosts=1, status=503) is True
    assert od.times_ejected(A) == 2
    assert od.is_ejected(A, 90.999) is True  # 31 + 2 x 30
    assert od.is_ejected(A, 91.0) is False
    assert od.sweep(91.0) == [A]


def test_ejection_multiplier_decays_while_healthy_and_caps() -> None:
    od = _od(consecutive_5xx=1, base_ejection_time=30.0, interval=10.0, max_ejection_percent=100)
    assert od.record(A, now=0.0, total_hosts=1, status=500)
    assert od.sweep(30.0) == [A]
    assert od.times_ejected(A) == 1
    od.sweep(35.0)  # within the interval of the last decay pass: nothing happens
    assert od.times_ejected(A) == 1
    od.sweep(40.0)  # healthy for >= interval since un-ejection
    assert od.times_ejected(A) == 0
    assert od.record(A, now=41.0, total_hosts=1, status=500)
    assert od.is_ejected(A, 70.9) and not od.is_ejected(A, 71.0)  # base x 1 again
    now = 71.0
    for _ in range(15):  # eject again right after each un-ejection
        od.sweep(now)
        assert od.record(A, now=now, total_hosts=1, status=500)
        now += MAX_EJECTION_TIME
    assert od.is_ejected(A, now - 0.001)
    assert not od.is_ejected(A, now)  # capped at 300 s


def test_outcomes_while_ejected_are_ignored() -> None:
    od = _od(consecutive_5xx=2, base_ejection_time=30.0, max_ejection_percent=100)
    assert _eject(od, A, 0.0, total=10, n=2)
    assert not any([od.record(A, now=1.0, total_hosts=10, status=503) for _ in range(6)])
    assert od.times_ejected(A) == 1
    assert od.statistics().ejections_total == 1
    assert od.sweep(30.0) == [A]
    assert od.record(A, now=31.0, total_hosts=10, status=503) is False  # a fresh run of two


def test_lazy_release_is_reported_by_next_sweep() -> None:
    od = _od(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_percent=100)
    assert od.record(A, now=0.0, total_hosts=2, status=500)
    assert od.record(B, now=40.0, total_hosts=2, status=500)  # A released here
    assert od.ejected(40.0) == frozenset({B})
    assert od.sweep(41.0) == [A]
    assert od.sweep(42.0) == []


@pytest.mark.parametrize(("hosts", "percent", "expected"), [(10, 10.0, 1), (10, 30.0, 3), (3, 10.0, 1),
                                                             (4, 50.0, 2), (5, 100.0, 5), (10, 0.0, 1)])
def test_max_ejection_percent(hosts: int, percent: float, expected: int) -> None:
    od = _od(consecutive_5xx=1, max_ejection_percent=percent)
    keys = [(f"10.0.0.{i}", 80) for i in range(hosts)]
    ejected = sum(od.record(k, now=0.0, total_hosts=hosts, status=500) for k in keys)
    assert ejected == expected
    assert len(od.ejected(0.0)) == expected
    assert od.statistics().ejections_overflow == hosts - expected


def test_forget_and_update() -> None:
    od = _od(consecutive_5xx=1, max_ejection_percent=100)
    assert od.record(A, now=0.0, total_hosts=2, status=500)
    od.forget([B])
    assert od.ejected(0.0) == frozenset()
    assert od.times_ejected(A) == 0
    od.update(OutlierDetection(consecutive_5xx=0, consecutive_local_origin_failures=0))
    assert not _eject(od, B, 1.0, total=2, n=20)


@settings(max_examples=200)
@given(
    hosts=st.integers(1, 12),
    percent=st.sampled_from([0.0, 10.0, 25.0, 30.0, 50.0, 100.0]),
    events=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([200, 500, 503, None]),
                              st.floats(0.0, 20.0)), max_size=150),
)
def test_ejected_fraction_never_exceeds_limit(hosts: int, percent: float, events) -> None:
    od = _od(consecutive_5xx=2, consecutive_local_origin_failures=2, base_ejection_time=15.0,
             interval=5.0, max_ejection_percent=percent)
    now = 0.0
    for idx, status, dt in events:
        now += dt
        k = (f"10.0.0.{idx % hosts}", 80)
        if status is None:
            od.record(k, now=now, total_hosts=hosts, local_failure=True)
        else:
            od.record(k, now=now, total_hosts=hosts, status=status)
        od.sweep(now)
        n = len(od.ejected(now))
        assert n <= 1 or 100.0 * n / hosts <= percent


# ---------------------------------------------------------------- active health checks


def test_health_flips_exactly_at_thresholds() -> None:
    ht = HealthTracker(HealthCheck(healthy_threshold=2, unhealthy_threshold=3))
    assert ht.healthy(A) is True
    assert [ht.observe(A, False) for _ in range(2)] == [False, False]
    assert ht.observe(A, True) is False  # a pass resets the failure run
    assert [ht.observe(A, False) for _ in range(3)] == [False, False, True]
    assert ht.healthy(A) is False
    assert ht.unhealthy() == frozenset({A})
    assert ht.observe(A, True) is False
    assert ht.observe(A, False) is False  # a failure resets the success run
    assert [ht.observe(A, True) for _ in range(2)] == [False, True]
    assert ht.healthy(A) is True
    assert ht.statistics().unhealthy == 0


def test_health_threshold_one_and_forget() -> None:
    ht = HealthTracker(HealthCheck(healthy_threshold=0, unhealthy_threshold=1))
    assert ht.observe(A, False) is True
    assert ht.observe(B, True) is False
    ht.forget([B])
    assert ht.healthy(A) is True
    assert ht.observe(B, False) is True
    assert ht.observe(B, True) is True  # threshold 0 read as 1
    assert ht.statistics().tracked == 1


def test_next_check_delay() -> None:
    assert next_check_delay(HealthCheck(interval=5.0), lambda u: 99.0) == 5.0
    assert next_check_delay(HealthCheck(interval=5.0, jitter=1.0), lambda u: u / 4) == 5.25
    assert next_check_delay(HealthCheck(interval=0.0, jitter=1.0), lambda u: u) < 1.0  # clamped


def _eps(n: int) -> list[Endpoint]:
    return [Endpoint(address=f"10.0.0.{i}", port=80) for i in range(n)]


def test_healthy_set_filters_and_panics_below_threshold() -> None:
    eps = _eps(4)
    keys = [(e.address, e.port) for e in eps]
    usable, panic = healthy_set(eps, hc_unhealthy={keys[0]}, ejected=frozenset({keys[1]}),
                                min_health_percent=50.0)
    assert (usable, panic) == ([eps[2], eps[3]], False)  # 50% is not below 50%
    usable, panic = healthy_set(eps, hc_unhealthy={keys[0], keys[2]}, ejected={keys[1]},
                                min_health_percent=50.0)
    assert (usable, panic) == (eps, True)
    usable, panic = healthy_set(eps, hc_unhealthy=set(keys), ejected=(), min_health_percent=0.0)
    assert (usable, panic) == (eps, True)  # nothing usable: spread over all
    assert healthy_set(eps, hc_unhealthy=(), ejected=(), min_health_percent=100.0) == (eps, False)
    assert healthy_set([], hc_unhealthy=(), ejected=(), min_health_percent=50.0) == ([], False)
