"""Consistent hashing for the ``ring_hash`` and ``maglev`` policies, as pure code.

* ``request_hash(policy, headers=…, query=…, source_ip=…)`` -> 64-bit key or ``None``: Envoy
  ``hash_policy`` — header value, cookie value (parsed from the ``cookie`` header), query
  parameter, source IP, in that order; every configured source that is present is folded in the
  way Envoy combines several hash policies (``rotl(hash, 1) ^ next``). ``None`` when none is
  present: the caller then picks at random, like Envoy does without a hash.
* ``HashRing(hosts, min_ring_size)`` — Envoy ``ring_hash`` (Ketama): every host gets
  ``ceil(min_ring_size / len(hosts))`` virtual nodes, hashed from ``"<address>:<port>_<i>"``,
  total capped at ``MAX_RING_SIZE``; a key maps to the first node clockwise (binary search).
* ``MaglevTable(hosts)`` — Envoy ``maglev``: a ``MAGLEV_TABLE_SIZE``-entry lookup table filled by
  the population algorithm of the Maglev paper (Eisenbud et al., NSDI 2016, §3.4) with
  ``offset = h0 % M`` and ``skip = h1 % (M - 1) + 1`` per host, so each host owns ~M/N entries.

Unusable hosts: Envoy rebuilds both structures from the healthy hosts only. Here the structures
are built from the full endpoint set (a 65 537-entry Maglev rebuild per health flap is too much
CPU in Python) and ``pick(key, usable)`` skips unusable hosts instead: the ring walks clockwise
to the next node of a usable host (what Envoy's ring does for retry attempts, ``midp + attempt``);
Maglev walks forward to the next table entry owned by a usable host (entries are spread
pseudo-randomly, so a dead host's keys spread over the others). Either way a key whose host is
usable never moves, and only the keys of an unusable host are remapped.

Hosts are sorted by ``(address, port)`` before building, so every sidecar builds the same ring
and table for the same endpoint set. The hash is 64-bit BLAKE2b (stable across processes and
Python versions — never ``hash()``), standing in for Envoy's xxHash64.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

from meshd.snapshot.model import Endpoint, HashPolicy

MAX_RING_SIZE = 8 * 1024 * 1024     # Envoy ring_hash maximum_ring_size default (8M)
MAGLEV_TABLE_SIZE = 65537           # Envoy maglev table_size default (a prime)
_MASK64 = (1 << 64) - 1


def stable_hash(data: str | bytes, seed: int = 0) -> int:
    """64-bit unsigned hash of ``data``; ``seed`` selects an independent hash function."""
    raw = data.encode() if isinstance(data, str) else data
    salt = seed.to_bytes(8, "big")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, salt=salt).digest(), "big")


def host_key(ep: Endpoint) -> str:
    """``"10.0.0.1:80"`` / ``"[::1]:80"``, the address string Envoy hashes for a host."""
    address = f"[{ep.address}]" if ":" in ep.address else ep.address
    return f"{address}:{ep.port}"


def _cookie(header: str, name: str) -> str | None:
    """Value of cookie ``name`` in a ``cookie`` header (``"a=1; b=2"``), or None."""
    for part in header.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k == name:
            return v.strip().strip('"')
    return None


def request_hash(policy: HashPolicy, *, headers: Mapping[str, str], query: Mapping[str, str],
                 source_ip: str | None) -> int | None:
    """64-bit hash of the request attributes named by ``policy``; None if none is present.

    ``headers`` keys are lower-case (the sidecar's header convention); ``query`` maps a query
    parameter name to its first value.
    """
    values: list[str] = []
    if policy.header is not None and (v := headers.get(policy.header.lower())) is not None:
        values.append(v)
    if policy.cookie is not None and (jar := headers.get("cookie")) is not None:
        if (v := _cookie(jar, policy.cookie)) is not None:
            values.append(v)
    if policy.query_param is not None and (v := query.get(policy.query_param)) is not None:
        values.append(v)
    if policy.source_ip and source_ip:
        values.append(source_ip)
    if not values:
        return None
    h = 0
    for v in values:  # Envoy: hash = ((hash << 1) | (hash >> 63)) ^ new_hash
        h = (((h << 1) | (h >> 63)) & _MASK64) ^ stable_hash(v)
    return h


def _walk(owners: Sequence[int], start: int, hosts: Sequence[Endpoint],
          usable: Callable[[Endpoint], bool]) -> Endpoint | None:
    """Host of the first slot from ``start`` (wrapping) whose host is usable; ``usable`` is
    asked at most once per host and the walk stops once every host has said no."""
    size = len(owners)
    verdict: dict[int, bool] = {}
    for step in range(size):
        idx = owners[(start + step) % size]
        ok = verdict.get(idx)
        if ok is None:
            ok = verdict[idx] = usable(hosts[idx])
            if not ok and len(verdict) == len(hosts):
                return None
        if ok:
            return hosts[idx]
    return None


def _sorted(hosts: Sequence[Endpoint]) -> list[Endpoint]:
    unique = {(e.address, e.port): e for e in hosts}
    return [unique[k] for k in sorted(unique)]


class HashRing:
    """Ketama ring over ``hosts``: ``len(self)`` virtual nodes sorted by 64-bit hash."""

    def __init__(self, hosts: Sequence[Endpoint], min_ring_size: int = 1024) -> None:
        self.hosts = _sorted(hosts)
        n = len(self.hosts)
        per_host = 0
        if n:
            per_host = min(math.ceil(max(1, min_ring_size) / n), max(1, MAX_RING_SIZE // n))
        nodes = sorted(
            (stable_hash(f"{host_key(ep)}_{i}"), idx)
            for idx, ep in enumerate(self.hosts)
            for i in range(per_host)
        )
        self._hashes = [h for h, _ in nodes]
        self._owners = [idx for _, idx in nodes]

    def __len__(self) -> int:
        return len(self._hashes)

    def pick(self, hash_key: int, usable: Callable[[Endpoint], bool]) -> Endpoint | None:
        """First node clockwise from ``hash_key`` whose host is usable; None if no host is."""
        start = bisect.bisect_left(self._hashes, hash_key & _MASK64)
        return _walk(self._owners, start, self.hosts, usable)


class MaglevTable:
    """Maglev lookup table over ``hosts``; ``table_size`` must be a prime >= len(hosts)."""

    def __init__(self, hosts: Sequence[Endpoint], table_size: int = MAGLEV_TABLE_SIZE) -> None:
        self.hosts = _sorted(hosts)
        if len(self.hosts) > table_size:
            raise ValueError(f"maglev table size {table_size} < {len(self.hosts)} hosts")
        self.table_size = table_size
        self.table: list[int] = self._populate() if self.hosts else []

    def _populate(self) -> list[int]:
        """Maglev paper pseudocode 1: hosts take turns claiming their next preferred free slot."""
        m = self.table_size
        # permutation[i][j] = (offset_i + j * skip_i) % M, walked incrementally from ``pos``
        pos = [stable_hash(host_key(ep), 0) % m for ep in self.hosts]
        skips = [stable_hash(host_key(ep), 1) % (m - 1) + 1 for ep in self.hosts]
        entry = [-1] * m
        filled = 0
        while True:
            for i, skip in enumerate(skips):
                c = pos[i]
                while entry[c] >= 0:
                    c += skip
                    if c >= m:
                        c -= m
                entry[c] = i
                pos[i] = c + skip if c + skip < m else c + skip - m
                filled += 1
                if filled == m:
                    return entry

    def pick(self, hash_key: int, usable: Callable[[Endpoint], bool]) -> Endpoint | None:
        """Entry ``hash_key % M``, else the next entry (forward, wrapping) of a usable host."""
        if not self.table:
            return None
        return _walk(self.table, hash_key % self.table_size, self.hosts, usable)
