"""Rate limiting, as pure code driven by ``now`` arguments (no trio, no clock reads).

Local limits (``scope = "local"``, Envoy local_ratelimit): the calling sidecar keeps one
``TokenBucket`` per limit and key value — ``burst`` tokens, refilled continuously at
``rate_per_sec`` — and ``LocalLimiter.check`` takes one token from every limit that applies to
the request (``host``, and ``route`` when the limit names one) or from none: a request refused
by one limit costs nothing in the others. Key values (``source_principal``, ``header:<name>``)
get a bucket each, at most ``max_keys`` per limit (least recently used evicted; a missing
header shares the ``""`` bucket).

Global limits (``scope = "global"``): ``requests_per_unit`` per fixed window of ``window``
seconds (aligned to multiples of it) for all callers together. meshd keeps a ``QuotaLedger``
and hands out slices (``slice_fraction`` of the limit, at least 1 token) that expire at the end
of their window; the ledger never grants more than the limit per window, so the callers
together never exceed it. Each caller holds a ``SliceBucket``: ``take`` spends granted tokens,
``needs_more`` says when to ask meshd for the next slice (before running dry), ``release``
returns what is left when the caller stops. When meshd cannot be reached the bucket falls back
to a local ``TokenBucket`` (or fails open without one: Envoy's ``failure_mode_deny = false``).

Refused requests get 429 with ``retry-after: retry_after_header(decision.retry_after)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from meshd.snapshot.model import RateLimit

EPSILON = 1e-9  # token arithmetic in floats: treat 0.9999999999 tokens as 1
MAX_KEYS = 10_000
HEADER_KEY = "header:"
OVERFLOW_KEY = "\0overflow"  # the ledger account shared by keys beyond max_keys
KeySource = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class RateDecision:
    """``limit_name``: the limit that refused (None when allowed); ``retry_after``: seconds
    until that limit would let one request through (0.0 when allowed)."""

    allowed: bool
    limit_name: str | None = None
    retry_after: float = 0.0


ALLOWED = RateDecision(True)


def retry_after_header(seconds: float) -> str:
    """The ``retry-after`` value for ``seconds``: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "3600"


def request_key(principal: str | None, headers: Mapping[str, str]) -> KeySource:
    """A ``KeySource`` for ``LocalLimiter.check``: ``"source_principal"`` -> ``principal``,
    ``"header:<name>"`` -> that (lower-case) header; anything missing -> None (shared bucket)."""

    def lookup(spec: str) -> str | None:
        if spec == "source_principal":
            return principal
        if spec.startswith(HEADER_KEY):
            return headers.get(spec[len(HEADER_KEY) :])
        return None

    return lookup


# --------------------------------------------------------------------------- token bucket


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_sec``; full at the first ``now`` it sees.

    Time going backwards refills nothing (and is not remembered). Raises ValueError unless
    ``rate_per_sec > 0`` and ``burst >= 1``.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate_per_sec: float, burst: float) -> None:
        if not (rate_per_sec > 0 and math.isfinite(rate_per_sec)) or not burst >= 1:
            raise ValueError(f"need rate_per_sec > 0 and burst >= 1, got {rate_per_sec}, {burst}")
        self.rate = float(rate_per_sec)
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self.stamp is None:
            self.stamp = now
        elif now > self.stamp:
            tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            nearest = round(tokens)
            self.tokens = float(nearest) if abs(tokens - nearest) < EPSILON else tokens
            self.stamp = now

    def available(self, now: float) -> float:
        """Tokens at ``now`` (fractional)."""
        self._refill(now)
        return self.tokens

    def can_take(self, now: float, n: int = 1) -> bool:
        self._refill(now)
        return self.tokens + EPSILON >= n

    def take(self, now: float, n: int = 1) -> bool:
        """Spend ``n`` tokens if there are; False (nothing spent) otherwise."""
        if not self.can_take(now, n):
            return False
        self.tokens = max(0.0, self.tokens - n)
        return True

    def retry_after(self, now: float, n: int = 1) -> float:
        """Seconds from ``now`` until ``n`` tokens are there: 0.0 if they are now,
        ``math.inf`` if ``n`` exceeds the burst (never)."""
        self._refill(now)
        missing = n - self.tokens
        if missing <= EPSILON:
            return 0.0
        if n > self.burst:
            return math.inf
        return missing / self.rate


# --------------------------------------------------------------------------- local limits


class _Local:
    __slots__ = ("buckets", "limit", "max_keys")

    def __init__(self, limit: RateLimit, max_keys: int) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, key: str) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is not None:
            self.buckets.move_to_end(key)
            return bucket
        if len(self.buckets) >= self.max_keys:
            self.buckets.popitem(last=False)
        bucket = self.buckets[key] = TokenBucket(self.limit.rate_per_sec, self.limit.burst)
        return bucket


class LocalLimiter:
    """The local limits of a snapshot (global ones are ignored: see ``SliceBucket``).

    ``previous``: the limiter of the last snapshot; the buckets of limits whose definition did
    not change are kept, so a rule push does not hand every caller a fresh burst.
    """

    def __init__(
        self,
        limits: Iterable[RateLimit],
        max_keys: int = MAX_KEYS,
        previous: LocalLimiter | None = None,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        old = {lim.limit: lim for lims in previous._by_host.values() for lim in lims} if previous else {}
        self._by_host: dict[str, list[_Local]] = {}
        for limit in limits:
            if limit.scope != "local":
                continue
            TokenBucket(limit.rate_per_sec, limit.burst)  # validate now, not on the first request
            kept = old.get(limit)
            local = _Local(limit, max_keys)
            if kept is not None:
                local.buckets = kept.buckets
                while len(local.buckets) > max_keys:
                    local.buckets.popitem(last=False)
            self._by_host.setdefault(limit.host, []).append(local)

    def check(self, host: str, route: str, key_value: str | KeySource, now: float) -> RateDecision:
        """Take one token from every local limit on (``host``, ``route``) or refuse.

        ``key_value``: the key value for every keyed limit, or a ``KeySource`` asked with each
        limit's ``key`` (see ``request_key``); None or missing values share the ``""`` bucket.
        Refused: the limit whose bucket refills last, and its ``retry_after``.
        """
        locals_ = self._by_host.get(host)
        if not locals_:
            return ALLOWED
        chosen: list[tuple[str, TokenBucket]] = []
        for local in locals_:
            limit = local.limit
            if limit.route and limit.route != route:
                continue
            if not limit.key:
                key = ""
            elif isinstance(key_value, str):
                key = key_value
            else:
                key = key_value(limit.key) or ""
            chosen.append((limit.name, local.bucket(key)))
        worst: tuple[str, float] | None = None
        for name, bucket in chosen:
            if not bucket.can_take(now):
                wait = bucket.retry_after(now)
                if worst is None or wait > worst[1]:
                    worst = (name, wait)
        if worst is not None:
            return RateDecision(False, worst[0], worst[1])
        for _, bucket in chosen:
            bucket.take(now)
        return ALLOWED

    def bucket_count(self, name: str) -> int:
        """Buckets held for the limit ``name`` (one per key value seen, at most ``max_keys``)."""
        return sum(len(lo.buckets) for lims in self._by_host.values() for lo in lims
                   if lo.limit.name == name)


# --------------------------------------------------------------------------- global limits


@dataclass(frozen=True, slots=True)
class QuotaGrant:
    """``tokens`` of window number ``window`` (``floor(now / window_seconds)``), valid for
    ``expires_in`` seconds from when the grant was asked for. 0 tokens: the window's quota is
    spent; ask again after ``expires_in``."""

    tokens: int
    window: int
    expires_in: float


class _Account:
    __slots__ = ("by_client", "granted", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.granted = 0
        self.by_client: dict[str, int] = {}


class QuotaLedger:
    """meshd's side of the global limits: ``grant`` slices, take back ``release``d tokens.

    Invariant: for every limit, key value and window, the tokens granted minus those released
    never exceed ``requests_per_unit``. Accounts are kept per (limit, key value), at most
    ``max_keys``; when full, an account of an ended window is dropped, else new key values share
    one overflow account (together held to the limit, never beyond it).
    """

    def __init__(
        self,
        limits: Iterable[RateLimit],
        slice_fraction: float = 0.1,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if not 0 < slice_fraction <= 1:
            raise ValueError("slice_fraction must be within (0, 1]")
        self.slice_fraction = slice_fraction
        self.max_keys = max_keys
        self._limits: dict[str, RateLimit] = {}
        self._accounts: OrderedDict[tuple[str, str], _Account] = OrderedDict()
        self.set_limits(limits)

    def set_limits(self, limits: Iterable[RateLimit]) -> None:
        """Follow a new snapshot: accounts of limits that still exist keep what they granted."""
        self._limits = {lim.name: lim for lim in limits if lim.scope == "global"}
        for key in [k for k in self._accounts if k[0] not in self._limits]:
            del self._accounts[key]

    def slice_size(self, name: str) -> int:
        """Tokens per grant for ``name``: ``slice_fraction`` of the limit, at least 1."""
        return max(1, math.ceil(self._limits[name].requests_per_unit * self.slice_fraction))

    def grant(self, name: str, client: str, now: float, key: str = "",
              want: int | None = None) -> QuotaGrant:
        """A slice of limit ``name`` for ``client`` (a sidecar's node id): ``min(slice, want,
        what is left of the window)`` tokens. Raises KeyError for an unknown limit."""
        limit = self._limits[name]
        window = math.floor(now / limit.window)
        acct = self._account(name, key, window, now)
        size = self.slice_size(name) if want is None else max(0, min(want, self.slice_size(name)))
        tokens = max(0, min(size, limit.requests_per_unit - acct.granted))
        acct.granted += tokens
        acct.by_client[client] = acct.by_client.get(client, 0) + tokens
        return QuotaGrant(tokens, window, max(0.0, (window + 1) * limit.window - now))

    def release(self, name: str, client: str, window: int, tokens: int, now: float,
                key: str = "") -> int:
        """Take back up to ``tokens`` unspent tokens ``client`` holds from ``window``; returns
        how many were taken back (0 once that window has ended, or for an unknown limit)."""
        limit = self._limits.get(name)
        if limit is None or window != math.floor(now / limit.window) or tokens <= 0:
            return 0
        acct = self._accounts.get((name, key)) or self._accounts.get((name, OVERFLOW_KEY))
        if acct is None or acct.window != window:
            return 0
        back = min(tokens, acct.by_client.get(client, 0))
        acct.granted -= back
        acct.by_client[client] -= back
        return back

    def granted(self, name: str, now: float, key: str = "") -> int:
        """Tokens of ``name`` granted (net of releases) in the window of ``now``."""
        limit = self._limits[name]
        acct = self._accounts.get((name, key))
        return acct.granted if acct is not None and acct.window == math.floor(now / limit.window) else 0

    def _account(self, name: str, key: str, window: int, now: float) -> _Account:
        ident = (name, key)
        acct = self._accounts.get(ident)
        if acct is None:
            if len(self._accounts) >= self.max_keys and not self._evict_ended(now):
                ident = (name, OVERFLOW_KEY)
                acct = self._accounts.get(ident)
            if acct is None:
                acct = self._accounts[ident] = _Account(window)
        self._accounts.move_to_end(ident)
        if acct.window != window:
            acct.window, acct.granted, acct.by_client = window, 0, {}
        return acct

    def _evict_ended(self, now: float, scan: int = 8) -> bool:
        """Drop one of the ``scan`` least recently used accounts whose window has ended."""
        for ident in list(self._accounts)[:scan]:
            limit = self._limits.get(ident[0])
            if limit is None or self._accounts[ident].window < math.floor(now / limit.window):
                del self._accounts[ident]
                return True
        return False


class SliceBucket:
    """A caller's share of one global limit (and key value): the slices meshd granted.

    Protocol, all driven by ``now``::

        if bucket.needs_more(now):                  # before running dry, never twice at once
            bucket.begin_request(now)
            ...ask meshd (QuotaLedger.grant)...
            bucket.add(grant, requested_at=now)     # or bucket.failed(now, retry_in)
        allowed = bucket.take(now)                  # per request

    A slice expires ``expires_in`` after it was *asked for* (never later than meshd's window
    end, whatever the network delay), less ``margin`` for clock drift. ``needs_more`` is true
    when what is left is at most ``low_water`` of the last slice. After ``failed`` (meshd
    unreachable) and until the next grant, a request with no token left is decided by
    ``fallback`` (a local bucket, e.g. the limit divided by the expected callers), or allowed
    when there is none.
    """

    __slots__ = ("_degraded", "_exhausted_until", "_in_flight", "_last_size", "_next_ask",
                 "_slices", "fallback", "low_water", "margin")

    def __init__(self, low_water: float = 0.2, fallback: TokenBucket | None = None,
                 margin: float = 0.001) -> None:
        self.low_water = low_water
        self.fallback = fallback
        self.margin = margin
        self._slices: list[list[float]] = []  # [window, expires_at, tokens], by expiry
        self._last_size = 0
        self._in_flight = False
        self._degraded = False
        self._next_ask = -math.inf
        self._exhausted_until = -math.inf

    def _expire(self, now: float) -> None:
        while self._slices and self._slices[0][1] <= now:
            self._slices.pop(0)

    def available(self, now: float) -> int:
        self._expire(now)
        return int(sum(s[2] for s in self._slices))

    def needs_more(self, now: float) -> bool:
        """True when a new slice should be asked for now."""
        if self._in_flight or now < self._exhausted_until or now < self._next_ask:
            return False
        left = self.available(now)
        return left == 0 or left <= self.low_water * self._last_size

    def begin_request(self, now: float) -> None:
        self._in_flight = True

    def add(self, grant: QuotaGrant, requested_at: float) -> None:
        """A grant arrived for the request begun at ``requested_at``."""
        self._in_flight = False
        self._degraded = False
        self._next_ask = -math.inf
        if grant.tokens <= 0:
            self._exhausted_until = requested_at + grant.expires_in
            return
        expires_at = requested_at + grant.expires_in - self.margin
        for s in self._slices:
            if s[0] == grant.window:
                s[2] += grant.tokens
                s[1] = min(s[1], expires_at)
                break
        else:
            self._slices.append([grant.window, expires_at, grant.tokens])
            self._slices.sort(key=lambda s: s[1])
        self._last_size = grant.tokens

    def failed(self, now: float, retry_in: float) -> None:
        """Asking meshd failed: degrade to ``fallback`` and ask again after ``retry_in``."""
        self._in_flight = False
        self._degraded = True
        self._next_ask = now + retry_in

    def take(self, now: float, n: int = 1) -> bool:
        self._expire(now)
        if sum(s[2] for s in self._slices) >= n:
            for s in self._slices:  # earliest expiry first
                used = min(n, int(s[2]))
                s[2] -= used
                n -= used
                if n == 0:
                    break
            self._slices = [s for s in self._slices if s[2] > 0]
            return True
        if self._degraded and now >= self._exhausted_until:
            return self.fallback.take(now, n) if self.fallback is not None else True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until a refused request may pass: the rest of a spent window, else 0.0
        (a slice is on its way or can be asked for)."""
        if self.available(now) > 0:
            return 0.0
        return max(0.0, self._exhausted_until - now)

    def release(self, now: float) -> list[tuple[int, int]]:
        """Give up every unexpired token: ``[(window, tokens)]`` for ``QuotaLedger.release``."""
        self._expire(now)
        out = [(int(s[0]), int(s[2])) for s in self._slices if s[2] > 0]
        self._slices = []
        return out
