"""The sidecar's identity agent: obtain a workload certificate from meshd, renew it, cache it.

Contract (meshd ``/v1/identity``)::

    POST /v1/identity/csr  {"csr", "token"}               first certificate (join token)
                           {"csr", "cert", "proof"}       renewal (proof = certs.proof(old key, csr))
        200 {"cert", "chain", "trust_bundle", "not_after", "session_token", "spiffe_id"}
        401 bad/expired/revoked token or proof; 403 identity mismatch
    GET  /v1/identity/bundle -> {"trust_bundle": [...], "trust_domain": str}

Lifecycle: ``load_cached()`` first (a sidecar restarted while meshd is down keeps serving a
cached, still-valid certificate), then ``run()``: renew at ``certs.renew_at`` (≈50 % of the
lifetime ± 5 %) with a new key every time; proof-based while the current certificate is valid,
the join token otherwise (or when meshd refuses the proof). Failures back off like gRPC's
connection backoff (1 s * 1.6 up to 120 s, full jitter, never sleeping past a quarter of the
remaining lifetime), keep the current certificate, and are logged and counted; ``run`` never
raises. Every issued certificate passes ``certs.check_issued`` before it replaces the current
one; a bad one is counted in ``rejected`` and the old one keeps serving.

Cache: ``<data_dir>/identity/credentials.json`` (dir 0700, file 0600, written atomically with
``os.replace`` so key and certificate never disagree on disk).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from meshd.errors import IdentityError
from sidecar.bootstrap import Bootstrap
from sidecar.control import auth_headers
from sidecar.identity import certs
from sidecar.identity.certs import Credentials

log = logging.getLogger("sidecar.identity")
CACHE_DIR, CACHE_FILE = "identity", "credentials.json"
BACKOFF_MIN, BACKOFF_MULT, BACKOFF_MAX = 1.0, 1.6, 120.0  # gRPC connection-backoff numbers
REQUEST_TIMEOUT = 10.0  # seconds for one CSR round trip
DEFAULT_TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class IdentityStatistics:
    """``serial`` hex ("" before the first certificate); ``not_after`` unix s; counters since start."""

    spiffe_id: str
    serial: str
    not_after: float
    renewals: int
    failures: int
    rejected: int


class IdentityAgent:
    """Holds ``current`` credentials; ``changed`` is a fresh ``trio.Event`` after every swap."""

    def __init__(self, boot: Bootstrap, client: httpx.AsyncClient, data_dir: str | Path | None = None,
                 *, wall: Callable[[], float] = time.time, rand: random.Random | None = None) -> None:
        self.boot, self.client, self.wall = boot, client, wall
        self.rand = rand or random.Random()
        self.cache_path = Path(data_dir or boot.data_dir) / CACHE_DIR / CACHE_FILE
        self.current: Credentials | None = None
        self.ready = trio.Event()        # set once a certificate is held
        self.changed = trio.Event()      # set, then replaced, on each swap
        self._callbacks: list[Callable[[Credentials], None]] = []
        self._renew_at = 0.0
        self._kick = trio.Event()
        self._trust_domain = ""
        self._renewals = self._failures = self._rejected = 0

    def on_change(self, callback: Callable[[Credentials], None]) -> None:
        """Call ``callback(creds)`` with every new credential set *before* it becomes current
        (and now, if one is held). An IdentityError from a callback vetoes the swap: register
        ``TlsContexts.update`` first so OpenSSL's refusal keeps the old certificate serving."""
        self._callbacks.append(callback)
        if self.current is not None:
            callback(self.current)

    def renew_now(self) -> None:
        """Wake ``run`` to renew immediately (e.g. the trust bundle no longer covers our leaf)."""
        self._renew_at = 0.0
        self._kick.set()

    def statistics(self) -> IdentityStatistics:
        c = self.current
        return IdentityStatistics(c.spiffe_id if c else "", f"{c.serial:x}" if c else "",
                                  c.not_after if c else 0.0, self._renewals, self._failures,
                                  self._rejected)

    # -- disk cache ---------------------------------------------------------------------------

    def load_cached(self) -> bool:
        """Install the cached credentials if they still pass ``check_issued``; True if installed."""
        try:
            doc = json.loads(self.cache_path.read_text(encoding="utf-8"))
            key = certs.load_key(doc["key"])
            creds = self._credentials(key, doc)
            if not creds.spiffe_id.endswith(self._suffix()):
                raise certs.fail("wrong-san", f"cached {creds.spiffe_id} is not this service")
            self._check(creds, creds.spiffe_id)
            self._install(creds, "disk cache")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, IdentityError) as exc:
            log.warning("ignoring cached certificate %s: %s", self.cache_path, exc)
            return False
        return True

    def _save(self, creds: Credentials) -> None:
        doc = {"key": certs.key_pem(creds.key).decode(), "cert": creds.cert, "chain": creds.chain,
               "trust_bundle": creds.bundle, "spiffe_id": creds.spiffe_id,
               "not_after": creds.not_after, "session_token": creds.session_token}
        self.cache_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale .tmp may predate us
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cache_path)

    # -- issuing ------------------------------------------------------------------------------

    async def obtain(self) -> Credentials:
        """Get, check and install a new certificate for a new key; returns it.

        Raises IdentityError (refused by meshd, or a bad certificate — counted in ``rejected``),
        httpx.HTTPError / trio.TooSlowError (meshd unreachable)."""
        expected = await self._expected_id()
        key = certs.new_key()
        csr = certs.make_csr(key, expected)
        doc = await self._post_csr(csr)
        try:
            creds = self._credentials(key, doc)
            self._check(creds, expected)
            self._install(creds, "meshd")
        except (IdentityError, ValueError, KeyError, TypeError) as exc:
            self._rejected += 1
            log.error("rejected certificate from meshd, keeping the current one: %s", exc)
            if isinstance(exc, IdentityError):
                raise
            raise certs.fail("malformed", f"meshd answer: {exc!r}") from exc
        self._renewals += 1
        self._persist(creds)
        return creds

    def set_bundle(self, bundle: Sequence[str]) -> bool:
        """Trust exactly ``bundle`` (PEM roots, e.g. pushed with the snapshot); True if changed.

        Root rotation: meshd publishes new+old roots, switches issuance, then drops the old
        root. If our leaf no longer chains to the bundle, a renewal starts at once. Raises
        IdentityError (counted in ``rejected``; the old bundle stays) if a root is malformed."""
        cur = self.current
        if cur is None or tuple(bundle) == cur.bundle:
            return False
        try:
            roots = [certs.load_cert(p) for p in bundle]
            if not roots:
                raise certs.fail("wrong-ca", "empty trust bundle")
            creds = dataclasses.replace(cur, bundle=tuple(bundle))
            self._install(creds, "trust bundle update", reschedule=False)
        except IdentityError:
            self._rejected += 1
            raise
        try:
            certs.check_chain(certs.load_cert(cur.cert), [certs.load_cert(p) for p in cur.chain],
                              roots, self.wall())
        except IdentityError as exc:
            log.warning("our certificate no longer chains to the trust bundle (%s): renewing", exc)
            self.renew_now()
        self._persist(creds)
        return True

    def _persist(self, creds: Credentials) -> None:
        try:
            self._save(creds)
        except OSError as exc:
            log.warning("cannot write certificate cache %s: %s", self.cache_path, exc)

    async def _expected_id(self) -> str:
        if self.current is not None:
            return self.current.spiffe_id
        if not self._trust_domain:
            resp = await self.client.get(f"{self.boot.meshd_addr}/v1/identity/bundle",
                                         headers=auth_headers(self.boot), timeout=REQUEST_TIMEOUT)
            resp.raise_for_status()
            self._trust_domain = str(resp.json().get("trust_domain") or DEFAULT_TRUST_DOMAIN)
        return f"spiffe://{self._trust_domain}{self._suffix()}"

    def _suffix(self) -> str:
        return f"/ns/{self.boot.namespace}/sa/{self.boot.service}"

    async def _post_csr(self, csr: str) -> dict[str, Any]:
        """Renew by proof while our certificate is valid, else (or if refused) use the join token."""
        bodies: list[dict[str, str]] = []
        cur = self.current
        if cur is not None and self.wall() < cur.not_after:
            bodies.append({"csr": csr, "cert": cur.cert, "proof": certs.proof(cur.key, csr)})
        if self.boot.token:
            bodies.append({"csr": csr, "token": self.boot.token})
        if not bodies:
            raise IdentityError("no valid certificate to renew with and no join token "
                                "(set `token` in the bootstrap or MESHD_TOKEN)")
        url = f"{self.boot.meshd_addr}/v1/identity/csr"
        for i, body in enumerate(bodies):
            with trio.fail_after(REQUEST_TIMEOUT):
                resp = await self.client.post(url, json=body)
            if resp.status_code == 200:
                return resp.json()
            what = "proof" if "proof" in body else "join token"
            if resp.status_code not in (401, 403):
                resp.raise_for_status()
            if i == len(bodies) - 1 or resp.status_code == 403:
                raise IdentityError(f"meshd refused the CSR ({resp.status_code}, by {what}): "
                                    f"{resp.text[:200]}")
            log.warning("meshd refused renewal by proof (%d); trying the join token", resp.status_code)
        raise AssertionError("unreachable")

    @staticmethod
    def _credentials(key: certs.PrivateKey, doc: dict[str, Any]) -> Credentials:
        """Credentials from a meshd answer or the cache (times and serial read from the leaf)."""
        leaf = certs.load_cert(doc["cert"])
        return Credentials(
            key=key, cert=str(doc["cert"]), chain=tuple(str(p) for p in doc.get("chain") or ()),
            bundle=tuple(str(p) for p in doc["trust_bundle"]), spiffe_id=certs.spiffe_id_of(leaf),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(), serial=leaf.serial_number,
            session_token=str(doc.get("session_token") or ""))

    def _check(self, creds: Credentials, expected: str) -> None:
        certs.check_issued(creds.cert, creds.chain, creds.bundle, creds.key, expected, self.wall())

    def _install(self, creds: Credentials, source: str, *, reschedule: bool = True) -> None:
        """Run the callbacks (an IdentityError vetoes), then make ``creds`` current."""
        for callback in self._callbacks:
            callback(creds)
        self.current = creds
        self._trust_domain = creds.spiffe_id.split("/")[2]
        if reschedule:
            self._renew_at = certs.renew_at(creds.not_before, creds.not_after, self.rand.uniform)
        log.info("certificate %x for %s from %s, valid until %.0f, renewing at %.0f", creds.serial,
                 creds.spiffe_id, source, creds.not_after, self._renew_at)
        self.ready.set()
        self.changed.set()
        self.changed = trio.Event()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Obtain and renew forever; never raises (failures are logged and counted)."""
        delay = BACKOFF_MIN
        while True:
            wait = self._renew_at - self.wall() if self.current is not None else 0.0
            if wait > 0:
                self._kick = trio.Event()
                with trio.move_on_after(wait):
                    await self._kick.wait()
                continue
            try:
                await self.obtain()
                delay = BACKOFF_MIN
            except Exception as exc:
                self._failures += 1
                if not isinstance(exc, IdentityError | httpx.HTTPError | trio.TooSlowError
                                  | OSError | ValueError):
                    log.exception("bug in certificate renewal")
                await trio.sleep(self._backoff(delay, exc))
                delay = min(delay * BACKOFF_MULT, BACKOFF_MAX)

    def _backoff(self, delay: float, exc: Exception) -> float:
        cur, now = self.current, self.wall()
        if cur is not None and now < cur.not_after:
            delay = min(delay, max(0.05, (cur.not_after - now) / 4))
            log.warning("certificate renewal failed (%s); keeping %x, valid %.0f s more", exc,
                        cur.serial, cur.not_after - now)
        else:
            log.error("no valid certificate: renewal failed (%s); mTLS is down until it succeeds", exc)
        return self.rand.uniform(0, delay)
