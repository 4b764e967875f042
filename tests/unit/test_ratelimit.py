"""Rate limiting (sidecar.core.ratelimit): token bucket math, local limits per host/route/key,
the LRU bound, and the global quota ledger with its client-side slice buckets."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshd.snapshot.model import RateLimit
from sidecar.core.ratelimit import (
    MAX_KEYS,
    LocalLimiter,
    QuotaGrant,
    QuotaLedger,
    RateDecision,
    SliceBucket,
    TokenBucket,
    request_key,
    retry_after_header,
)


def limit(name: str = "l", host: str = "svcb", per_unit: int = 10, window: float = 1.0,
          burst: int | None = None, route: str = "", key: str = "",
          scope: str = "local") -> RateLimit:
    return RateLimit(name=name, host=host, rate_per_sec=per_unit / window,
                     burst=burst if burst is not None else per_unit, requests_per_unit=per_unit,
                     window=window, route=route, key=key, scope=scope)


# --------------------------------------------------------------------------- token bucket


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    b = TokenBucket(10, 2)
    assert [b.take(0.0), b.take(0.0), b.take(0.0)] == [True, True, False]
    assert b.retry_after(0.0) == 0.1
    assert not b.take(0.05)
    assert b.retry_after(0.05) == 0.05
    assert b.available(0.05) == 0.5
    assert b.take(0.1)
    assert b.retry_after(0.1) == 0.1
    assert b.available(100.0) == 2.0  # capped at the burst
    assert b.retry_after(100.0) == 0.0


def test_bucket_exact_rate_in_binary_fractions() -> None:
    b = TokenBucket(4, 1)
    times = [i * 0.25 for i in range(20)]
    assert all(b.take(t) for t in times)
    assert not b.take(4.875) and b.retry_after(4.875) == 0.125
    assert b.take(5.0)


def test_bucket_takes_n_and_refuses_more_than_the_burst() -> None:
    b = TokenBucket(2, 5)
    assert b.take(0.0, 3) and not b.take(0.0, 3)
    assert b.retry_after(0.0, 3) == 0.5
    assert b.take(0.5, 3)
    assert not b.take(1000.0, 6) and b.retry_after(1000.0, 6) == math.inf
    assert b.available(1000.0) == 5.0  # the refused take spent nothing


def test_bucket_float_drift_does_not_refuse_an_earned_token() -> None:
    b = TokenBucket(10, 1)
    t = 0.0
    assert b.take(t)
    for _ in range(1000):
        t += 0.1  # accumulates rounding error: 0.30000000000000004, ...
        assert b.take(t)


def test_bucket_ignores_time_going_backwards() -> None:
    b = TokenBucket(1, 1)
    assert b.take(10.0)
    assert not b.take(5.0)  # no refill from the past, no credit either
    assert b.retry_after(5.0) == 1.0
    assert b.take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (math.inf, 1), (math.nan, 1)])
def test_bucket_refuses_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@settings(max_examples=300, deadline=None)
@given(rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0]), burst=st.integers(1, 20),
       gaps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=80))
def test_bucket_never_allows_more_than_burst_plus_rate_times_elapsed(
        rate: float, burst: int, gaps: list[float]) -> None:
    b = TokenBucket(rate, burst)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        if not b.can_take(now):
            wait = b.retry_after(now)
            later = copy.copy(b)
            assert later.can_take(now + wait)  # retry_after is enough ...
            if wait > 1e-6:
                sooner = copy.copy(b)
                assert not sooner.can_take(now + wait * 0.99)  # ... and not more than needed
        if b.take(now):
            allowed += 1
        assert allowed <= burst + rate * now + 1e-6


# --------------------------------------------------------------------------- local limits


def test_limiter_per_host_and_unlimited_hosts() -> None:
    lim = LocalLimiter([limit(per_unit=2)])
    assert [lim.check("svcb", "r", "", 0.0).allowed for _ in range(3)] == [True, True, False]
    assert lim.check("svcb", "r", "", 0.0) == RateDecision(False, "l", 0.5)
    assert lim.check("svcc", "r", "", 0.0) == RateDecision(True)
    assert lim.check("svcb", "r", "", 0.5).allowed


def test_limiter_keys_are_isolated() -> None:
    lim = LocalLimiter([limit(per_unit=1, key="header:x-user")])
    keys = request_key(None, {"x-user": "alice"})
    assert lim.check("svcb", "", keys, 0.0).allowed
    assert not lim.check("svcb", "", keys, 0.0).allowed
    assert lim.check("svcb", "", request_key(None, {"x-user": "bob"}), 0.0).allowed
    assert lim.check("svcb", "", "carol", 0.0).allowed  # a plain string is the key value
    # requests without the header share one bucket
    anon = request_key(None, {})
    assert lim.check("svcb", "", anon, 0.0).allowed
    assert not lim.check("svcb", "", anon, 0.0).allowed
    assert lim.bucket_count("l") == 4


def test_limiter_by_source_principal() -> None:
    lim = LocalLimiter([limit(per_unit=1, key="source_principal")])
    a, b = (request_key(f"spiffe://td/ns/p/sa/{s}", {}) for s in "ab")
    assert lim.check("svcb", "", a, 0.0).allowed and lim.check("svcb", "", b, 0.0).allowed
    assert not lim.check("svcb", "", a, 0.0).allowed


def test_limiter_routes_and_all_or_nothing() -> None:
    host_wide = limit("host", per_unit=3)
    api = limit("api", per_unit=1, route="api")
    lim = LocalLimiter([host_wide, api])
    assert lim.check("svcb", "api", "", 0.0).allowed  # host 2 left, api 0 left
    # refused by "api": nothing taken from "host"
    assert lim.check("svcb", "api", "", 0.0) == RateDecision(False, "api", 1.0)
    assert lim.check("svcb", "api", "", 0.0) == RateDecision(False, "api", 1.0)
    assert lim.check("svcb", "web", "", 0.0).allowed
    assert lim.check("svcb", "web", "", 0.0).allowed
    # both empty now: the one that refills last is named
    assert lim.check("svcb", "api", "", 0.0) == RateDecision(False, "api", 1.0)
    assert lim.check("svcb", "web", "", 0.0) == RateDecision(False, "host", 1 / 3)


def test_limiter_ignores_global_limits() -> None:
    lim = LocalLimiter([limit(per_unit=1, scope="global")])
    assert all(lim.check("svcb", "", "", 0.0).allowed for _ in range(5))


def test_limiter_buckets_are_bounded_by_lru() -> None:
    lim = LocalLimiter([limit(per_unit=1, key="header:x-user")], max_keys=3)
    for user in ("a", "b", "c"):
        assert lim.check("svcb", "", user, 0.0).allowed
    assert not lim.check("svcb", "", "a", 0.0).allowed  # "a" is now the most recent
    assert lim.check("svcb", "", "d", 0.0).allowed  # evicts "b", the least recently used
    assert lim.bucket_count("l") == 3
    assert not lim.check("svcb", "", "a", 0.0).allowed  # kept
    assert lim.check("svcb", "", "b", 0.0).allowed  # evicted: a fresh bucket


def test_limiter_default_bound_is_ten_thousand() -> None:
    lim = LocalLimiter([limit(per_unit=1, key="header:x-user")])
    for i in range(MAX_KEYS + 50):
        lim.check("svcb", "", f"user-{i}", 0.0)
    assert MAX_KEYS == 10_000 and lim.bucket_count("l") == MAX_KEYS


def test_limiter_keeps_buckets_of_unchanged_limits_across_snapshots() -> None:
    kept, changed = limit("kept", per_unit=1), limit("changed", host="svcc", per_unit=1)
    old = LocalLimiter([kept, changed])
    assert old.check("svcb", "", "", 0.0).allowed and old.check("svcc", "", "", 0.0).allowed
    new = LocalLimiter([kept, limit("changed", host="svcc", per_unit=2)], previous=old)
    assert not new.check("svcb", "", "", 0.0).allowed  # no fresh burst from a rule push
    assert new.check("svcc", "", "", 0.0).allowed  # a changed limit starts over


def test_retry_after_header() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.1, 1.0, 1.01, 59.5, math.inf)] == [
        "1", "1", "1", "2", "60", "3600"]


# --------------------------------------------------------------------------- global limits


def test_ledger_hands_out_slices_up_to_the_limit_per_window() -> None:
    ledger = QuotaLedger([limit("g", per_unit=100, window=60.0, scope="global")])
    assert ledger.slice_size("g") == 10
    grants = [ledger.grant("g", f"c{i % 3}", 61.0) for i in range(12)]
    assert [g.tokens for g in grants] == [10] * 10 + [0, 0]
    assert grants[0] == QuotaGrant(10, 1, 59.0)
    assert ledger.granted("g", 119.0) == 100
    assert ledger.grant("g", "c0", 120.0) == QuotaGrant(10, 2, 60.0)  # a new window
    assert ledger.granted("g", 120.0) == 10
    assert ledger.grant("g", "c1", 120.0, want=3).tokens == 3
    with pytest.raises(KeyError):
        ledger.grant("nope", "c0", 0.0)


def test_ledger_release_only_within_the_window_and_what_the_client_holds() -> None:
    ledger = QuotaLedger([limit("g", per_unit=20, scope="global")], slice_fraction=0.5)
    g = ledger.grant("g", "a", 5.2)
    assert g.tokens == 10 and ledger.grant("g", "b", 5.3).tokens == 10
    assert ledger.grant("g", "c", 5.4).tokens == 0
    assert ledger.release("g", "a", g.window, 50, 5.5) == 10  # capped at what "a" holds
    assert ledger.release("g", "a", g.window, 1, 5.5) == 0
    assert ledger.grant("g", "c", 5.6).tokens == 10
    assert ledger.release("g", "b", g.window, 10, 6.0) == 0  # that window has ended
    assert ledger.release("g", "b", g.window + 1, 10, 6.0) == 0  # holds nothing there


def test_ledger_bounds_accounts_and_overflow_keys_share_the_limit() -> None:
    ledger = QuotaLedger([limit("g", per_unit=10, scope="global")], slice_fraction=1.0,
                         max_keys=2)
    assert ledger.grant("g", "c", 0.0, key="a").tokens == 10
    assert ledger.grant("g", "c", 0.0, key="b").tokens == 10
    # full of live accounts: new key values share one overflow account
    assert ledger.grant("g", "c", 0.5, key="x").tokens == 10
    assert ledger.grant("g", "c", 0.5, key="y").tokens == 0
    # accounts of ended windows make room again
    assert ledger.grant("g", "c", 1.0, key="z").tokens == 10
    assert ledger.grant("g", "c", 1.0, key="a").tokens == 10


def test_ledger_follows_snapshot_changes() -> None:
    ledger = QuotaLedger([limit("g", per_unit=10, scope="global"), limit("local")])
    with pytest.raises(KeyError):
        ledger.grant("local", "c", 0.0)
    assert ledger.grant("g", "c", 0.0).tokens == 1
    ledger.set_limits([limit("g", per_unit=10, scope="global")])
    assert ledger.granted("g", 0.0) == 1
    ledger.set_limits([])
    with pytest.raises(KeyError):
        ledger.granted("g", 0.0)


def test_slice_bucket_protocol() -> None:
    ledger = QuotaLedger([limit("g", per_unit=50, window=10.0, scope="global")])
    b = SliceBucket(low_water=0.2, margin=0.0)
    assert b.needs_more(0.0) and not b.take(0.0)
    b.begin_request(0.0)
    assert not b.needs_more(0.0)  # one request at a time
    b.add(ledger.grant("g", "me", 0.0), requested_at=0.0)
    assert b.available(0.0) == 5 and not b.needs_more(0.0)
    assert all(b.take(1.0) for _ in range(4))
    assert b.needs_more(1.0)  # 1 left <= 20 % of 5: ask before running dry
    b.begin_request(1.0)
    b.add(ledger.grant("g", "me", 1.0), requested_at=1.0)
    assert b.available(1.0) == 6
    assert b.available(10.0) == 0 and not b.take(10.0)  # the window's slices expired
    assert b.release(10.0) == []


def test_slice_bucket_exhausted_window_and_retry_after() -> None:
    ledger = QuotaLedger([limit("g", per_unit=1, window=60.0, scope="global")])
    b = SliceBucket(margin=0.0)
    b.begin_request(30.0)
    b.add(ledger.grant("g", "me", 30.0), requested_at=30.0)
    assert b.take(30.0) and not b.take(30.0)
    b.begin_request(31.0)
    b.add(ledger.grant("g", "me", 31.0), requested_at=31.0)  # 0 tokens: window spent
    assert not b.needs_more(45.0) and not b.take(45.0)
    assert b.retry_after(45.0) == 15.0
    assert b.needs_more(60.0)


def test_slice_bucket_degrades_to_fallback_or_fails_open() -> None:
    b = SliceBucket(fallback=TokenBucket(1, 1))
    b.begin_request(0.0)
    b.failed(0.0, retry_in=5.0)
    assert b.take(0.0) and not b.take(0.0)  # the fallback bucket decides
    assert not b.needs_more(1.0) and b.needs_more(5.0)
    b.add(QuotaGrant(3, 0, 10.0), requested_at=5.0)
    assert [b.take(5.0) for _ in range(4)] == [True, True, True, False]  # back to slices
    open_ = SliceBucket()
    open_.failed(0.0, retry_in=1.0)
    assert all(open_.take(0.0) for _ in range(100))  # no fallback: fail open


def test_slice_bucket_release_returns_unspent_tokens_per_window() -> None:
    ledger = QuotaLedger([limit("g", per_unit=10, scope="global")], slice_fraction=0.5)
    b = SliceBucket(margin=0.0)
    b.add(ledger.grant("g", "me", 0.2), requested_at=0.2)
    assert b.take(0.3)
    assert b.release(0.4) == [(0, 4)]
    assert ledger.release("g", "me", 0, 4, 0.4) == 4
    assert ledger.granted("g", 0.4) == 1 and b.available(0.4) == 0


def test_slices_of_an_ended_window_cannot_be_spent() -> None:
    ledger = QuotaLedger([limit("g", per_unit=1, scope="global")], slice_fraction=1.0)
    b = SliceBucket()
    b.add(ledger.grant("g", "c", 0.0), requested_at=0.0)  # unused in window 0
    b.add(ledger.grant("g", "c", 1.5), requested_at=1.5)
    assert [b.take(1.5), b.take(1.5)] == [True, False]


OPS = st.one_of(
    st.tuples(st.just("ask"), st.integers(0, 5)),
    st.tuples(st.just("use"), st.integers(0, 5), st.integers(1, 30)),
    st.tuples(st.just("ask"), st.integers(0, 5)),
    st.tuples(st.just("use"), st.integers(0, 5), st.integers(1, 30)),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("wait"), st.sampled_from([0.1, 0.45, 1.0, 2.5])),
)


@settings(max_examples=300, deadline=None)
@given(per_unit=st.integers(1, 12), window=st.sampled_from([1.0, 60.0]),
       fraction=st.sampled_from([0.1, 0.25, 0.5, 1.0]), clients=st.integers(1, 4),
       ops=st.lists(OPS, max_size=120))
@example(per_unit=1, window=1.0, fraction=1.0, clients=1,
         ops=[("ask", 0), ("wait", 1.0), ("ask", 0), ("use", 0, 2)])
@example(per_unit=4, window=60.0, fraction=0.5, clients=2,
         ops=[("ask", 0), ("ask", 1), ("release", 0), ("ask", 1), ("use", 1, 4), ("use", 0, 4),
              ("wait", 0.45), ("ask", 0), ("use", 0, 4)])
def test_ledger_never_grants_more_than_the_limit_per_window(
        per_unit: int, window: float, fraction: float, clients: int,
        ops: list[tuple[object, ...]]) -> None:
    lim = limit("g", per_unit=per_unit, window=window, scope="global")
    ledger = QuotaLedger([lim], slice_fraction=fraction)
    buckets = [SliceBucket() for _ in range(clients)]
    used: dict[int, int] = {}
    now = 0.0
    for op in ops:
        kind, *args = op
        if kind == "wait":
            now += float(args[0]) * window  # type: ignore[arg-type]
            continue
        c = int(args[0]) % clients  # type: ignore[call-overload]
        if kind == "ask":
            buckets[c].add(ledger.grant("g", f"c{c}", now), requested_at=now)
        elif kind == "release":
            for win, tokens in buckets[c].release(now):
                ledger.release("g", f"c{c}", win, tokens, now)
        else:
            for _ in range(int(args[1])):  # type: ignore[call-overload]
                if buckets[c].take(now):
                    win = math.floor(now / window)
                    used[win] = used.get(win, 0) + 1
        assert ledger.granted("g", now) <= per_unit
    assert all(n <= per_unit for n in used.values()), used


def test_three_replicas_hold_the_global_limit_within_ten_percent() -> None:
    """Each replica gets 1.2x the limit (3.6x in total); per window they let through at most
    the limit and at least 90 % of it."""
    per_unit, window, tick = 300, 1.0, 0.001
    ledger = QuotaLedger([limit("g", per_unit=per_unit, window=window, scope="global")])
    replicas = [SliceBucket() for _ in range(3)]
    per_tick = 1.2 * per_unit * tick  # requests per replica per tick
    owed = [0.0, 0.0, 0.0]
    allowed: dict[int, int] = {}
    for step in range(int(5 * window / tick)):
        now = step * tick
        for i, b in enumerate(replicas):
            if b.needs_more(now):
                b.begin_request(now)
                b.add(ledger.grant("g", f"r{i}", now), requested_at=now)
            owed[i] += per_tick
            while owed[i] >= 1:
                owed[i] -= 1
                if b.take(now):
                    win = math.floor(now / window)
                    allowed[win] = allowed.get(win, 0) + 1
    assert len(allowed) == 5
    assert all(0.9 * per_unit <= n <= per_unit for n in allowed.values()), allowed
