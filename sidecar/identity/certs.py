"""Workload keys, CSRs and certificate checks for the sidecar (``cryptography``; no I/O, no trio).

Profile (X509-SVID, ``ecosystem-conventions.md`` §8): EC P-256 + ECDSA-SHA256, exactly one URI SAN
``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``. Times are unix seconds (``float``).

Every refusal raises ``meshd.errors.IdentityError`` whose ``reason`` attribute is one stable code
(for counters and log lines), and whose message names the certificate and the detail::

    malformed | no-spiffe-id | not-yet-valid | expired | wrong-ca | wrong-san | key-mismatch

A new certificate is checked with ``check_issued`` *before* it replaces the current one (linkerd
``Store::set_certificate`` does the same before publishing new rustls configs).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshd.errors import IdentityError

PrivateKey = ec.EllipticCurvePrivateKey
RENEW_FRACTION = 0.5   # Istio SECRET_GRACE_PERIOD_RATIO: renew at half the lifetime
RENEW_JITTER = 0.05    # ± fraction of the lifetime, so a fleet does not renew at one instant
MAX_CHAIN_DEPTH = 5    # leaf -> intermediates -> root; deeper chains are refused
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class Credentials:
    """One issued identity: our key, its certificate, and the roots we trust.

    ``cert``/``chain``/``bundle`` are PEM strings (``chain`` = intermediates, leaf excluded;
    ``bundle`` = trust roots). ``not_before``/``not_after`` are unix seconds; ``serial`` is the
    leaf's serial number; ``session_token`` is meshd's bearer token for sidecar endpoints.
    """

    key: PrivateKey
    cert: str
    chain: tuple[str, ...]
    bundle: tuple[str, ...]
    spiffe_id: str
    not_before: float
    not_after: float
    serial: int
    session_token: str = ""


def fail(reason: str, detail: str) -> IdentityError:
    """An ``IdentityError("<reason>: <detail>")`` carrying ``reason`` (a code listed above)."""
    err = IdentityError(f"{reason}: {detail}")
    err.reason = reason  # type: ignore[attr-defined]
    return err


def new_key() -> PrivateKey:
    """A fresh EC P-256 private key (a new one for every CSR: the key never leaves the sidecar)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of ``key``, encrypted with ``password`` when given."""
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def load_key(pem: str | bytes) -> PrivateKey:
    """Parse an unencrypted PEM key; raises IdentityError unless it is EC P-256."""
    try:
        key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, None)
    except (ValueError, TypeError) as exc:
        raise fail("malformed", f"private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise fail("malformed", "private key is not EC P-256")
    return key


def make_csr(key: PrivateKey, spiffe_id: str) -> str:
    """PEM CSR signed by ``key`` requesting one URI SAN ``spiffe_id`` (empty subject)."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(san, critical=False).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def proof(key: PrivateKey, csr_pem: str) -> str:
    """base64(ECDSA-SHA256 signature of the CSR's DER bytes by ``key``) — the renewal proof."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    return base64.b64encode(key.sign(der, ec.ECDSA(hashes.SHA256()))).decode()


def verify_proof(public_key: ec.EllipticCurvePublicKey, csr_pem: str, proof_b64: str) -> bool:
    """True if ``proof_b64`` is ``proof(key, csr_pem)`` for the key behind ``public_key``."""
    try:
        der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
        public_key.verify(base64.b64decode(proof_b64, validate=True), der, ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        return False
    return True


def load_cert(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate; raises IdentityError("malformed: …")."""
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise fail("malformed", f"certificate: {exc}") from None


def spiffe_id_of(cert: x509.Certificate | bytes) -> str:
    """The single ``spiffe://`` URI SAN of ``cert`` (object or DER bytes, as from
    ``getpeercert(binary_form=True)``). Raises IdentityError("no-spiffe-id: …") for no SAN, no URI,
    several URIs (X509-SVID: exactly one) or a URI that is not ``spiffe://``."""
    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError as exc:
            raise fail("malformed", f"peer certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise fail("no-spiffe-id", f"certificate {cert.serial_number:x} has no SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise fail("no-spiffe-id", f"certificate {cert.serial_number:x} has URI SANs {uris}, "
                   "expected exactly one spiffe:// URI")
    return uris[0]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_ca(ca: x509.Certificate, now: float) -> None:
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    name = ca.subject.rfc4514_string()
    if not is_ca:
        raise fail("wrong-ca", f"issuer {name!r} is not a CA (basicConstraints CA=false)")
    if not ca.not_valid_before_utc.timestamp() <= now <= ca.not_valid_after_utc.timestamp():
        raise fail("wrong-ca", f"issuer {name!r} is outside its validity period")


def check_chain(leaf: x509.Certificate, chain: Sequence[x509.Certificate],
                roots: Sequence[x509.Certificate], now: float) -> None:
    """Walk issuer signatures from ``leaf`` through ``chain`` to one of ``roots``; raises
    IdentityError("wrong-ca: …") when no root is reached within MAX_CHAIN_DEPTH."""
    cert = leaf
    for _ in range(MAX_CHAIN_DEPTH):
        root = next((r for r in roots if _issued_by(cert, r)), None)
        if root is not None:
            return _check_ca(root, now)
        parent = next((c for c in chain if c is not cert and _issued_by(cert, c)), None)
        if parent is None:
            raise fail("wrong-ca", f"issuer {cert.issuer.rfc4514_string()!r} of certificate "
                       f"{cert.serial_number:x} does not chain to any trust-bundle root")
        _check_ca(parent, now)
        cert = parent
    raise fail("wrong-ca", f"chain deeper than {MAX_CHAIN_DEPTH} certificates")


def check_issued(cert_pem: str, chain: Sequence[str], bundle: Sequence[str], key: PrivateKey,
                 expected_id: str, now: float) -> None:
    """Refuse a certificate we must not serve: raises IdentityError with reason ``malformed``,
    ``not-yet-valid``, ``expired``, ``wrong-san``, ``key-mismatch`` or ``wrong-ca`` (in that
    order of checking). ``now`` is unix seconds; PEM strings in, nothing out."""
    cert = load_cert(cert_pem)
    serial = f"{cert.serial_number:x}"
    nb, na = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if now < nb:
        raise fail("not-yet-valid", f"certificate {serial} is valid from {nb:.0f}, now is {now:.0f}")
    if now >= na:
        raise fail("expired", f"certificate {serial} expired at {na:.0f}, now is {now:.0f}")
    got = spiffe_id_of(cert)
    if got != expected_id:
        raise fail("wrong-san", f"certificate {serial} is for {got}, expected {expected_id}")
    if cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise fail("key-mismatch", f"certificate {serial} does not hold our public key")
    if not bundle:
        raise fail("wrong-ca", "empty trust bundle")
    check_chain(cert, [load_cert(p) for p in chain], [load_cert(p) for p in bundle], now)


def renew_at(not_before: float, not_after: float,
             draw: Callable[[float, float], float] = random.uniform, *, now: float | None = None) -> float:
    """When to renew (unix seconds): ``not_before + lifetime * f`` with ``f = draw(0.45, 0.55)``
    (Istio: 50 % of lifetime; jitter ±5 % staggers a fleet), never before ``now`` when given.
    ``draw`` is ``random.uniform``-shaped; out-of-range draws are clamped. Raises ValueError for
    a non-positive lifetime."""
    lifetime = not_after - not_before
    if lifetime <= 0:
        raise ValueError(f"certificate lifetime must be positive, got {lifetime} s")
    lo, hi = RENEW_FRACTION - RENEW_JITTER, RENEW_FRACTION + RENEW_JITTER
    at = not_before + lifetime * min(hi, max(lo, draw(lo, hi)))
    return at if now is None else max(at, now)
