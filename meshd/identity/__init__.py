"""meshd's identity plane (Istio-Auth/Citadel): SPIFFE IDs, CA, join and session tokens.

Modules: ``ca`` (root/intermediate CA, CSR signing, root rotation), ``tokens`` (HS256 join and
session JWTs, revocation by jti), ``service`` (the glue the API calls, refusal counters). This
module holds what they share: SPIFFE ID helpers, TTL parsing, ``Refusal``, private-file helpers
and the X.509 profile (root and leaf builders, CSR checks, leaf verification with
``cryptography.x509.verification``).

Workload identity: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>`` (Istio's shape);
the trust domain defaults to ``cluster.local`` as Istio's ``TRUST_DOMAIN`` does.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshd.errors import ConfigError, IdentityError

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_NAMESPACE = "default"
DEFAULT_CERT_TTL = 24 * 3600.0          # seconds; Istio SECRET_TTL
MAX_CERT_TTL = 90 * 24 * 3600.0         # seconds; Istio's max workload cert TTL
DEFAULT_TOKEN_TTL = "720h"
MAX_TOKEN_TTL = 365 * 24 * 3600.0       # seconds
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # service / namespace (DNS-like)
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]{1,255}")    # SPIFFE trust domain characters
_SPIFFE_RE = re.compile(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)")
_TTL_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_TTL_SCALE = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def check_name(value: str, field: str) -> str:
    """``value`` if it is a valid service/namespace name; raises ValueError naming ``field``."""
    if not isinstance(value, str) or len(value) > 253 or not NAME_RE.fullmatch(value):
        raise ValueError(f"{field} {value!r} must be a lower-case DNS-style name")
    return value


def check_trust_domain(value: str) -> str:
    """``value`` if it is a valid SPIFFE trust domain; raises ConfigError otherwise."""
    if not _TRUST_DOMAIN_RE.fullmatch(value):
        raise ConfigError(f"trust domain {value!r} may only hold a-z 0-9 . - _", field="trust_domain")
    return value


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """``spiffe://<trust_domain>/ns/<namespace>/sa/<service>``."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """``(trust_domain, namespace, service)`` of a workload SPIFFE ID; raises IdentityError."""
    m = _SPIFFE_RE.fullmatch(uri)
    if m is None or not NAME_RE.fullmatch(m.group(2)) or not NAME_RE.fullmatch(m.group(3)):
        raise IdentityError(f"{uri!r} is not a spiffe://<td>/ns/<namespace>/sa/<service> ID")
    return m.group(1), m.group(2), m.group(3)


def parse_ttl(text: str) -> float:
    """``"720h"`` -> 2592000.0 seconds (units s, m, h, d); raises ValueError (0 or > 365 d too)."""
    m = _TTL_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f'ttl "{text}" is not a duration like "90s", "30m", "720h" or "30d"')
    seconds = float(m.group(1)) * _TTL_SCALE[m.group(2)]
    if not 0 < seconds <= MAX_TOKEN_TTL:
        raise ValueError(f'ttl "{text}" must be more than 0 and at most 365 days')
    return seconds


def uri_sans(obj: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """Every URI SAN of a certificate or CSR (``[]`` when it has no SAN extension)."""
    try:
        san = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as upper-case hex pairs joined by ``:`` (openssl's format)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``, created with permissions ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # umask may have cleared bits
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700; returns it. Raises OSError."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Refusal(IdentityError):
    """A request meshd refuses for identity reasons.

    ``reason``: stable counter key (``"token_expired"``, ``"bad_proof"``, ...); ``status``: the
    HTTP status the API answers with (400 bad input, 401 not authenticated, 403 not allowed).
    """

    def __init__(self, msg: str, reason: str, status: int = 401) -> None:
        self.reason = reason
        self.status = status
        super().__init__(msg)


# -- X.509 profile -----------------------------------------------------------------------------

_LEAF_USAGE = x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                            crl_sign=False, encipher_only=False, decipher_only=False)
_CA_USAGE = x509.KeyUsage(digital_signature=False, key_encipherment=False, content_commitment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False)


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def iso(ts: float) -> str:
    """Unix seconds as ``2026-01-02T03:04:05Z``."""
    return _utc(int(ts)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_root(trust_domain: str, now: float,
              lifetime: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 root CA for ``trust_domain`` valid ``lifetime`` seconds from now-60 s."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root CA {trust_domain}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - 60)).not_valid_after(_utc(now + lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def leaf_builder(public_key: object, issuer: x509.Certificate, spiffe: str, serial: int,
                 not_before: float, not_after: float) -> x509.CertificateBuilder:
    """An unsigned X509-SVID for ``public_key`` (times in unix seconds)."""
    return (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuer.subject)
            .public_key(public_key).serial_number(serial)  # type: ignore[arg-type]
            .not_valid_before(_utc(not_before)).not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
            .add_extension(_aki(issuer), critical=False))


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR: valid self-signature, EC P-256 or RSA >= 2048 bits.

    Raises Refusal(reason ``"bad_csr"``, status 400).
    """
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise Refusal(f"malformed CSR: {exc}", "bad_csr", 400) from exc
    if not valid:
        raise Refusal("CSR signature does not verify", "bad_csr", 400)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise Refusal(f"CSR key curve {key.curve.name} refused: use P-256", "bad_csr", 400)
    elif not (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        raise Refusal("CSR key refused: use EC P-256 or RSA >= 2048 bits", "bad_csr", 400)
    return csr


def verify_leaf(cert: x509.Certificate, roots: list[x509.Certificate],
                intermediates: list[x509.Certificate], now: float) -> str:
    """The one SPIFFE ID of a client-auth leaf valid at ``now`` chaining to one of ``roots``.

    Raises Refusal ``cert_expired`` (also not yet valid) or ``cert_untrusted``, status 401.
    """
    if now > cert.not_valid_after_utc.timestamp():
        raise Refusal(f"certificate expired at {iso(cert.not_valid_after_utc.timestamp())}", "cert_expired")
    if now < cert.not_valid_before_utc.timestamp():
        raise Refusal("certificate not yet valid", "cert_expired")
    verifier = PolicyBuilder().store(Store(roots)).time(_utc(now)).build_client_verifier()
    try:
        verifier.verify(cert, intermediates)
    except VerificationError as exc:
        raise Refusal(f"certificate does not chain to the trust bundle: {exc}", "cert_untrusted") from exc
    sans = uri_sans(cert)
    if len(sans) != 1:
        raise Refusal(f"certificate has {len(sans)} URI SANs, want exactly one", "cert_untrusted")
    return sans[0]


def read_certs(file: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file (at least one); raises ConfigError naming ``file``."""
    try:
        return x509.load_pem_x509_certificates(Path(file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificates: {exc}", file=file) from exc


def read_key(file: str, cert: x509.Certificate) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """The unencrypted PEM private key of ``cert``; raises ConfigError if unreadable or mismatched."""
    try:
        key = serialization.load_pem_private_key(Path(file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the CA key: {exc}", file=file) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("CA key must be EC or RSA", file=file)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError("CA key does not belong to the CA certificate", file=file)
    return key


def check_ca_cert(cert: x509.Certificate, file: str) -> None:
    """Raise ConfigError unless ``cert`` may sign certificates (CA:true, keyCertSign)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise ConfigError(f"CA certificate lacks {exc.oid._name}", file=file) from exc
    if not bc.ca or not ku.key_cert_sign:
        raise ConfigError("certificate is not a CA (needs CA:true and keyCertSign)", file=file)


def self_signed(cert: x509.Certificate) -> bool:
    """True for a self-issued certificate whose signature verifies with its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def describe(cert: x509.Certificate) -> dict[str, object]:
    """``{"subject", "serial" (hex), "fingerprint" (SHA-256), "not_before", "not_after"}`` (unix s)."""
    return {"subject": cert.subject.rfc4514_string(), "serial": f"{cert.serial_number:x}",
            "fingerprint": fingerprint(cert), "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp()}
