"""The identity glue the API calls: certificate requests, join tokens, CA steps, refusal counters.

Certificate request document (``POST /v1/identity/csr``), one of::

    {"csr": PEM, "token": "<join token>"}                                    first certificate
    {"csr": PEM, "cert": PEM current leaf, "proof": base64 signature}        renewal

optionally with ``"service"`` / ``"namespace"`` naming the identity the caller expects. The
proof is the current key's signature over the CSR's DER bytes (ECDSA/SHA-256 for EC keys,
PKCS#1 v1.5/SHA-256 for RSA). The issued identity is the token's (first certificate) or the
current certificate's (renewal); a CSR or request field asking for another one is refused (403).

Answer: ``{"cert": PEM, "chain": [PEM], "trust_bundle": [PEM], "not_after": float,
"session_token": str, "spiffe_id": str}``. Every refusal raises ``Refusal`` after being counted
in ``refused[reason]`` and logged as one line.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshd.errors import ConfigError, IdentityError
from meshd.identity import (
    DEFAULT_CERT_TTL,
    DEFAULT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    MAX_CERT_TTL,
    Refusal,
    check_name,
    iso,
    load_csr,
    parse_spiffe_id,
    parse_ttl,
    uri_sans,
)
from meshd.identity.ca import CertificateAuthority
from meshd.identity.tokens import Claims, TokenIssuer, load_secret
from meshd.store.base import Store

log = logging.getLogger("meshd.identity")


@dataclass(frozen=True)
class IdentityConfig:
    """``meshd serve`` identity options: trust domain, plugged-in CA files, leaf TTL (seconds)."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ca_cert: str = ""
    ca_key: str = ""
    ca_bundle: str = ""
    cert_ttl: float = DEFAULT_CERT_TTL


class IdentityService:
    """CA + token issuer + counters. ``on_bundle_change`` runs after every root-rotation step."""

    def __init__(self, ca: CertificateAuthority, tokens: TokenIssuer, cert_ttl: float = DEFAULT_CERT_TTL,
                 on_bundle_change: Callable[[], object] | None = None) -> None:
        self.ca = ca
        self.tokens = tokens
        self.trust_domain = ca.trust_domain
        self.cert_ttl = cert_ttl
        self.on_bundle_change = on_bundle_change
        self.refused: Counter[str] = Counter()
        self.issued: Counter[str] = Counter({"join": 0, "renewal": 0})

    @classmethod
    def open(cls, data_dir: str | Path, config: IdentityConfig, store: Store,
             clock: Callable[[], float] = time.time) -> IdentityService:
        """CA and token key under ``<data_dir>/ca``; raises ConfigError for unusable files."""
        if not 1 <= config.cert_ttl <= MAX_CERT_TTL:
            raise ConfigError("certificate ttl must be within 1 s .. 90 days", field="cert_ttl")
        ca_dir = Path(data_dir) / "ca"
        ca = CertificateAuthority(ca_dir, config.trust_domain, ca_cert=config.ca_cert,
                                  ca_key=config.ca_key, ca_bundle=config.ca_bundle,
                                  leaf_ttl=config.cert_ttl, clock=clock)
        tokens = TokenIssuer(load_secret(ca_dir), store, config.trust_domain, clock)
        return cls(ca, tokens, config.cert_ttl)

    # -- refusals ----------------------------------------------------------------------------

    def refuse(self, exc: Refusal, what: str, client: str) -> Refusal:
        """Count and log one refusal; returns ``exc`` for the caller to raise or answer."""
        self.refused[exc.reason] += 1
        log.warning("identity: refused %s from %s: %s [%s, %d]", what, client or "?", exc,
                    exc.reason, exc.status)
        return exc

    def stats(self) -> dict[str, Any]:
        """``{"refused": {reason: n}, "refused_total": n, "issued": {"join": n, "renewal": n}}``."""
        return {"refused": dict(sorted(self.refused.items())), "refused_total": self.refused.total(),
                "issued": dict(self.issued)}

    # -- certificates ------------------------------------------------------------------------

    def request_certificate(self, doc: object, client: str = "") -> dict[str, Any]:
        """Answer a certificate request document (module doc); raises a counted Refusal."""
        try:
            if not isinstance(doc, dict) or not isinstance(doc.get("csr"), str):
                raise Refusal("want {csr, token} or {csr, cert, proof}", "bad_request", 400)
            if isinstance(doc.get("token"), str):
                return self._first(doc)
            if isinstance(doc.get("cert"), str) and isinstance(doc.get("proof"), str):
                return self._renew(doc)
            raise Refusal("want {csr, token} or {csr, cert, proof}", "bad_request", 400)
        except Refusal as exc:
            raise self.refuse(exc, "certificate request", client) from None

    def _first(self, doc: dict[str, Any]) -> dict[str, Any]:
        claims = self.tokens.verify(doc["token"], "join")
        csr = load_csr(doc["csr"])
        _check_wanted(csr, doc, claims.sub)
        return self._issue(csr, claims.sub, claims.jti, "join")

    def _renew(self, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            cert = x509.load_pem_x509_certificate(doc["cert"].encode())
        except ValueError as exc:
            raise Refusal(f"malformed certificate: {exc}", "bad_request", 400) from exc
        spiffe = self.ca.verify_workload(cert)
        csr = load_csr(doc["csr"])
        _check_proof(cert, csr, doc["proof"])
        try:
            trust_domain = parse_spiffe_id(spiffe)[0]
        except IdentityError as exc:
            raise Refusal(str(exc), "identity_mismatch", 403) from exc
        if trust_domain != self.trust_domain:
            raise Refusal(f"{spiffe} is not in trust domain {self.trust_domain}", "identity_mismatch", 403)
        _check_wanted(csr, doc, spiffe)
        jti = self.tokens.store.cert_jti(f"{cert.serial_number:x}")
        if jti is None:
            jti = secrets.token_hex(16)
            log.info("identity: renewing %s whose lineage is unknown; new lineage %s", spiffe, jti)
        elif self.tokens.revoked(jti):
            raise Refusal("token revoked", "token_revoked")
        return self._issue(csr, spiffe, jti, "renewal")

    def _issue(self, csr: x509.CertificateSigningRequest, spiffe: str, jti: str,
               kind: str) -> dict[str, Any]:
        issued = self.ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), spiffe, self.cert_ttl)
        self.tokens.store.put_cert(issued.serial, jti, spiffe, issued.not_after, self.tokens.clock())
        _, ns, svc = parse_spiffe_id(spiffe)
        self.issued[kind] += 1
        log.info("identity: issued %s (%s) serial %s until %s", spiffe, kind, issued.serial,
                 iso(issued.not_after))
        return {"cert": issued.cert_pem, "chain": issued.chain_pems,
                "trust_bundle": self.ca.trust_bundle(), "not_after": issued.not_after,
                "session_token": self.tokens.session(svc, ns, jti, issued.not_after), "spiffe_id": spiffe}

    def bundle(self) -> dict[str, Any]:
        """``{"trust_bundle": [PEM], "trust_domain": str}``."""
        return {"trust_bundle": self.ca.trust_bundle(), "trust_domain": self.trust_domain}

    def bearer(self, token: str) -> Claims:
        """Claims of a valid join or session token used as an API bearer; raises Refusal (uncounted)."""
        return self.tokens.verify(token)

    # -- tokens and CA (operator) ---------------------------------------------------------------

    def create_token(self, doc: object) -> dict[str, Any]:
        """``{"service", "namespace"?, "ttl"?: "720h"}`` -> ``{"token", "jti", "expires_at",
        "spiffe_id"}``; raises ValueError for bad input."""
        if not isinstance(doc, dict):
            raise ValueError("want {service, namespace, ttl}")
        service = check_name(doc.get("service", ""), "service")
        namespace = check_name(doc.get("namespace") or DEFAULT_NAMESPACE, "namespace")
        token, claims = self.tokens.create(service, namespace, parse_ttl(doc.get("ttl") or "720h"))
        log.info("identity: join token %s created for %s until %s", claims.jti, claims.sub, iso(claims.exp))
        return {"token": token, "jti": claims.jti, "expires_at": float(claims.exp), "spiffe_id": claims.sub}

    def list_tokens(self) -> list[dict[str, Any]]:
        """Every join token: ``{"jti", "service", "namespace", "spiffe_id", "created", "expires",
        "revoked" (unix s, 0 = no), "state": "valid" | "expired" | "revoked"}``, newest first."""
        now = self.tokens.clock()
        out = []
        for r in self.tokens.records():
            state = "revoked" if r.revoked else "expired" if now >= r.expires else "valid"
            out.append({"jti": r.jti, "service": r.service, "namespace": r.namespace,
                        "spiffe_id": f"spiffe://{self.trust_domain}/ns/{r.namespace}/sa/{r.service}",
                        "created": r.created, "expires": r.expires, "revoked": r.revoked, "state": state})
        return out

    def revoke(self, jti: str) -> bool:
        """Revoke a join token and its lineage; False if unknown."""
        ok = self.tokens.revoke(jti)
        if ok:
            log.warning("identity: token %s revoked (its session tokens and renewals too)", jti)
        return ok

    def ca_step(self, action: str, force: bool = False) -> dict[str, Any]:
        """Run ``rotate`` | ``activate`` | ``retire`` and return ``ca.status()``; raises
        RotationError (out of order) or ValueError (unknown action)."""
        steps: dict[str, Callable[[], object]] = {
            "rotate": self.ca.rotate_root, "activate": self.ca.activate_new_root,
            "retire": lambda: self.ca.retire_old_root(force)}
        if action not in steps:
            raise ValueError(f"unknown CA action {action!r}: want rotate, activate or retire")
        steps[action]()
        if self.on_bundle_change is not None:
            self.on_bundle_change()
        return self.ca.status()


def _check_wanted(csr: x509.CertificateSigningRequest, doc: dict[str, Any], spiffe: str) -> None:
    """Refuse (403) a CSR URI SAN or a ``service``/``namespace`` field naming another identity."""
    _, ns, svc = parse_spiffe_id(spiffe)
    for uri in uri_sans(csr):
        if uri != spiffe:
            raise Refusal(f"CSR asks for {uri} but the credential is for {spiffe}", "identity_mismatch", 403)
    for field, have in (("service", svc), ("namespace", ns)):
        want = doc.get(field)
        if want and want != have:
            raise Refusal(f"request asks for {field} {want!r} but the credential is for {spiffe}",
                          "identity_mismatch", 403)


def _check_proof(cert: x509.Certificate, csr: x509.CertificateSigningRequest, proof: str) -> None:
    """Refuse (401, ``bad_proof``) unless ``proof`` is the cert key's signature over the CSR DER."""
    try:
        sig = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refusal("proof is not base64", "bad_proof") from exc
    data = csr.public_bytes(serialization.Encoding.DER)
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise Refusal("current certificate key is neither EC nor RSA", "bad_proof")
    except InvalidSignature as exc:
        raise Refusal("proof does not verify with the current certificate's key", "bad_proof") from exc
