"""meshd's certificate authority: X509-SVID workload certificates from sidecar CSRs.

Two modes:

* **managed** (default): a self-signed root (EC P-256, 10 years) created on first start in
  ``<ca-dir>/root.pem`` + ``root.key`` (key 0600, dir 0700). ``state.json`` records which root
  signs and which roots are in the trust bundle; ``bundle.pem`` mirrors the bundle for operators.
  Root rotation: ``rotate_root`` publishes a new root next to the old one (bundle = [new, old])
  while the old one still signs; ``activate_new_root`` switches issuance to the new root;
  ``retire_old_root`` drops the old root from the bundle (refused until every leaf the old root
  signed has expired, unless forced) and deletes its key.
* **plugged-in**: ``ca_cert`` + ``ca_key`` files given by the operator (a root or an
  intermediate). For an intermediate the chain is ``[intermediate]`` and the bundle is the roots
  of ``ca_bundle`` if given, else the intermediate itself. Rotation is the operator's job.

Leaves (SPIFFE X509-SVID): empty subject, exactly one critical URI SAN, CA:false (critical),
keyUsage digitalSignature+keyEncipherment (critical), EKU serverAuth+clientAuth, SKI + AKI,
notBefore = now - 60 s, random 128-bit serial. Errors: ``ConfigError`` for unusable CA files,
``Refusal`` (reason ``bad_csr``) for a bad CSR, ``RotationError`` for a rotation step out of order.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshd.errors import ConfigError, IdentityError
from meshd.identity import (
    DEFAULT_CERT_TTL,
    MAX_CERT_TTL,
    check_ca_cert,
    check_trust_domain,
    describe,
    iso,
    leaf_builder,
    load_csr,
    make_root,
    private_dir,
    read_certs,
    read_key,
    self_signed,
    to_pem,
    verify_leaf,
    write_file,
)

log = logging.getLogger("meshd.ca")
CLOCK_SKEW = 60.0                   # seconds leaves are backdated
ROOT_LIFETIME = 3650 * 86400.0      # seconds; Istio/Consul self-signed root: 10 years
STATE_FILE = "state.json"


class RotationError(IdentityError):
    """A root-rotation step was asked for out of order (rotate -> activate -> retire)."""


@dataclass(frozen=True)
class Issued:
    """A signed leaf: PEM cert, the intermediates up to (not including) a root, notAfter (unix s)."""

    cert_pem: str
    chain_pems: list[str]
    not_after: float
    serial: str = ""        # hex
    spiffe_id: str = ""


@dataclass
class _State:
    signing: str = "root"                                  # name of the signing root
    bundle: list[str] = field(default_factory=lambda: ["root"])  # newest first
    next: int = 2                                          # number for the next root-N
    activated_at: float = 0.0                              # unix s of the last activation


class CertificateAuthority:
    """Signs workload CSRs; owns the trust bundle. ``clock`` returns unix seconds."""

    def __init__(self, ca_dir: str | Path, trust_domain: str, *, ca_cert: str = "", ca_key: str = "",
                 ca_bundle: str = "", leaf_ttl: float = DEFAULT_CERT_TTL,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(ca_dir)
        self.trust_domain = check_trust_domain(trust_domain)
        self.leaf_ttl = leaf_ttl
        self.clock = clock
        self.plugged_in = bool(ca_cert or ca_key)
        self._state = _State()
        self._roots: dict[str, x509.Certificate] = {}
        if self.plugged_in:
            self._load_plugged(ca_cert, ca_key, ca_bundle)
        else:
            self._load_managed()

    # -- loading ---------------------------------------------------------------------------

    def _load_plugged(self, cert_file: str, key_file: str, bundle_file: str) -> None:
        if not (cert_file and key_file):
            raise ConfigError("a plugged-in CA needs both --ca-cert and --ca-key", field="ca_key")
        certs = read_certs(cert_file)
        self._signer, self._key = certs[0], read_key(key_file, certs[0])
        check_ca_cert(self._signer, cert_file)
        self._chain = [c for c in certs if not self_signed(c)]
        roots = read_certs(bundle_file) if bundle_file else [c for c in certs if self_signed(c)]
        if not roots:
            roots = [self._signer]
        elif self._chain and not any(r.subject == self._chain[-1].issuer for r in roots):
            raise ConfigError("the CA certificate is not issued by any certificate of the bundle",
                              file=bundle_file or cert_file)
        self._roots = {f"bundle-{i}": r for i, r in enumerate(roots)}
        self._state = _State(signing="", bundle=list(self._roots))
        log.info("plugged-in CA %s (%s), %d root(s) in the bundle", self._signer.subject.rfc4514_string(),
                 "intermediate" if self._chain else "root", len(roots))

    def _load_managed(self) -> None:
        try:
            private_dir(self.dir)
            state_path = self.dir / STATE_FILE
            if state_path.exists():
                self._state = _State(**json.loads(state_path.read_text()))
            elif not (self.dir / "root.pem").exists():
                self._new_root("root")
                log.info("created root CA in %s", self.dir)
            self._save()
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the CA: {exc}", file=str(self.dir)) from exc
        self._roots = {n: read_certs(str(self.dir / f"{n}.pem"))[0] for n in self._state.bundle}
        self._use_signer()

    def _use_signer(self) -> None:
        name = self._state.signing
        self._signer = self._roots[name]
        self._key = read_key(str(self.dir / f"{name}.key"), self._signer)
        self._chain = []

    def _new_root(self, name: str) -> None:
        cert, key = make_root(self.trust_domain, self.clock(), ROOT_LIFETIME)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        write_file(self.dir / f"{name}.key", key_pem, 0o600)
        write_file(self.dir / f"{name}.pem", to_pem(cert).encode())
        self._roots[name] = cert

    def _save(self) -> None:
        write_file(self.dir / STATE_FILE, json.dumps(self._state.__dict__, indent=1).encode(), 0o600)
        if self._roots:
            write_file(self.dir / "bundle.pem", "".join(self.trust_bundle()).encode())

    # -- issuing ---------------------------------------------------------------------------

    def sign_csr(self, csr_pem: str | bytes, spiffe_id: str, ttl_seconds: float) -> Issued:
        """Sign ``csr_pem`` as ``spiffe_id`` for ``ttl_seconds`` (capped at the signer's notAfter).

        The CSR's subject and SANs are ignored (the caller authorizes them first). Raises
        Refusal(reason "bad_csr", 400) for a malformed CSR, a bad signature or a weak key, and
        IdentityError for a TTL outside 1 s .. 90 days.
        """
        if not 1 <= ttl_seconds <= MAX_CERT_TTL:
            raise IdentityError(f"certificate ttl {ttl_seconds} s is outside 1 s .. 90 days")
        csr = load_csr(csr_pem)
        now = self.clock()
        not_after = min(now + ttl_seconds, self._signer.not_valid_after_utc.timestamp())
        serial = secrets.randbits(128) or 1
        builder = leaf_builder(csr.public_key(), self._signer, spiffe_id, serial,
                                  now - CLOCK_SKEW, not_after)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert_pem=to_pem(cert), chain_pems=[to_pem(c) for c in self._chain],
                      not_after=float(int(not_after)), serial=f"{serial:x}", spiffe_id=spiffe_id)

    def trust_bundle(self) -> list[str]:
        """The PEM roots every sidecar must trust, newest first."""
        return [to_pem(c) for c in self.trust_certs()]

    def trust_certs(self) -> list[x509.Certificate]:
        return [self._roots[n] for n in self._state.bundle]

    def chain_certs(self) -> list[x509.Certificate]:
        """Intermediates between leaves and the bundle (``[]`` for a root signer)."""
        return list(self._chain)

    def verify_workload(self, cert: x509.Certificate) -> str:
        """The SPIFFE ID of a leaf that chains to the bundle and is valid now.

        Raises Refusal: ``cert_expired`` (also not yet valid) or ``cert_untrusted`` (401).
        """
        return verify_leaf(cert, self.trust_certs(), self._chain, self.clock())

    # -- root rotation -----------------------------------------------------------------------

    def _managed_only(self) -> None:
        if self.plugged_in:
            raise RotationError("root rotation needs meshd's own CA; with a plugged-in CA restart "
                                "meshd with the new --ca-cert/--ca-key and both roots in --ca-bundle")

    def rotate_root(self) -> str:
        """Publish a new root next to the old one; the old root keeps signing. Returns its name."""
        self._managed_only()
        if len(self._state.bundle) > 1:
            raise RotationError("a root rotation is in progress: activate and retire it first")
        name = f"root-{self._state.next}"
        self._new_root(name)
        self._state.bundle.insert(0, name)
        self._state.next += 1
        self._save()
        log.warning("root rotation: new root %s published; %s still signs", name, self._state.signing)
        return name

    def activate_new_root(self) -> str:
        """Sign leaves with the newest root from now on; returns its name."""
        self._managed_only()
        newest = self._state.bundle[0]
        if newest == self._state.signing:
            raise RotationError("no new root to activate: run rotate first")
        self._state.signing, self._state.activated_at = newest, self.clock()
        self._use_signer()
        self._save()
        log.warning("root rotation: %s now signs leaves", newest)
        return newest

    def retire_old_root(self, force: bool = False) -> list[str]:
        """Drop every root but the signing one from the bundle; returns the retired names.

        Refused (RotationError) before activation, or while leaves of the old root may still be
        valid (``activated_at + leaf_ttl``) unless ``force``.
        """
        self._managed_only()
        old = [n for n in self._state.bundle if n != self._state.signing]
        if not old:
            raise RotationError("nothing to retire: rotate and activate a new root first")
        if self._state.bundle[0] != self._state.signing:
            raise RotationError("the new root does not sign yet: run activate first")
        until = self._state.activated_at + self.leaf_ttl
        if not force and self.clock() < until:
            raise RotationError(f"leaves signed by {', '.join(old)} stay valid until "
                                f"{iso(until)}; retire after that or force")
        self._state.bundle = [self._state.signing]
        for name in old:
            retired = private_dir(self.dir / "retired")
            (self.dir / f"{name}.pem").replace(retired / f"{name}.pem")
            (self.dir / f"{name}.key").unlink(missing_ok=True)
            del self._roots[name]
        self._save()
        log.warning("root rotation: retired %s", ", ".join(old))
        return old

    def status(self) -> dict[str, object]:
        """``{"trust_domain", "mode", "rotation", "retire_after", "cert_ttl", "roots": [info],
        "chain": [info]}``; info = ``describe`` + ``"name"``, ``"signing"``."""
        st = self._state
        if len(st.bundle) == 1:
            rotation = "none"
        else:
            rotation = "published" if st.bundle[0] != st.signing else "activated"
        roots = [{"name": n, **describe(self._roots[n]), "signing": n == st.signing and not self._chain}
                 for n in st.bundle]
        chain = [{"name": f"intermediate-{i}", **describe(c), "signing": c is self._signer}
                 for i, c in enumerate(self._chain)]
        return {"trust_domain": self.trust_domain, "mode": "plugged-in" if self.plugged_in else "managed",
                "rotation": rotation, "cert_ttl": self.leaf_ttl, "roots": roots, "chain": chain,
                "retire_after": st.activated_at + self.leaf_ttl if rotation == "activated" else 0.0}

