"""Join and session tokens: HS256 JWTs (PyJWT) signed with meshd's own 256-bit secret.

Claims (both kinds)::

    {"iss": "meshd", "sub": "spiffe://<td>/ns/<ns>/sa/<svc>", "svc": str, "ns": str,
     "jti": str (32 hex), "iat": int, "exp": int (unix s), "typ": "join" | "session"}

* **join** token: made by an operator (``meshd token create``), recorded in the store by jti,
  presented once with the sidecar's first CSR.
* **session** token: returned with every certificate; ``exp`` = the certificate's notAfter and
  ``jti`` = the jti of the join token that started the lineage, so revoking a join token also
  revokes the session tokens (and certificate renewals) that descend from it. Sidecars use it as
  their bearer for sidecar API calls.

The secret lives in ``<ca-dir>/token.key`` (hex, 0600), created on first start. ``verify``
raises ``Refusal`` (status 401) with ``str()`` one of "token expired", "token revoked", "bad
token signature", "malformed token: ...", "wrong token type", "wrong token issuer", "unknown
token", "token for another trust domain"; the ``reason`` key names the counter.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import msgspec

from meshd.errors import ConfigError
from meshd.identity import Refusal, private_dir, spiffe_id, write_file
from meshd.store.base import Store, TokenRecord

ISSUER = "meshd"
KEY_FILE = "token.key"
TYPES = ("join", "session")
_REQUIRED = ["iss", "sub", "jti", "iat", "exp"]


class Claims(msgspec.Struct, frozen=True):
    """Decoded claims of a join or session token (times in unix seconds)."""

    iss: str
    sub: str
    svc: str
    ns: str
    jti: str
    iat: int
    exp: int
    typ: str


def load_secret(ca_dir: Path) -> bytes:
    """The 32-byte HMAC secret of ``ca_dir/token.key``, created (0600) if missing.

    Raises ConfigError if it cannot be read or written, or is not 64 hex digits.
    """
    path = ca_dir / KEY_FILE
    try:
        if not path.exists():
            private_dir(ca_dir)
            write_file(path, secrets.token_hex(32).encode(), 0o600)
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the token key: {exc}", file=str(path)) from exc
    if len(key) != 32:
        raise ConfigError("token key must be 32 bytes (64 hex digits)", file=str(path))
    return key


class TokenIssuer:
    """Creates, verifies and revokes tokens of one trust domain; ``clock`` returns unix seconds."""

    def __init__(self, secret: bytes, store: Store, trust_domain: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.store = store
        self.trust_domain = trust_domain
        self.clock = clock

    def _encode(self, claims: Claims) -> str:
        return jwt.encode(msgspec.to_builtins(claims), self._secret, algorithm="HS256")

    def create(self, service: str, namespace: str, ttl: float) -> tuple[str, Claims]:
        """A join token for ``service`` in ``namespace`` valid ``ttl`` seconds, recorded in the
        store. Returns ``(jwt, claims)``."""
        now = int(self.clock())
        claims = Claims(iss=ISSUER, sub=spiffe_id(self.trust_domain, namespace, service), svc=service,
                        ns=namespace, jti=secrets.token_hex(16), iat=now, exp=now + int(ttl), typ="join")
        self.store.put_token(TokenRecord(jti=claims.jti, service=service, namespace=namespace,
                                         created=float(now), expires=float(claims.exp)))
        return self._encode(claims), claims

    def session(self, service: str, namespace: str, jti: str, exp: float) -> str:
        """A session token of lineage ``jti`` expiring at ``exp`` (the certificate's notAfter)."""
        claims = Claims(iss=ISSUER, sub=spiffe_id(self.trust_domain, namespace, service), svc=service,
                        ns=namespace, jti=jti, iat=int(self.clock()), exp=int(exp), typ="session")
        return self._encode(claims)

    def _decode(self, token: str) -> Claims:
        try:
            raw = jwt.decode(token, self._secret, algorithms=["HS256"], issuer=ISSUER,
                             options={"verify_exp": False, "verify_iat": False, "require": _REQUIRED})
            return msgspec.convert(raw, Claims)
        except jwt.InvalidSignatureError as exc:
            raise Refusal("bad token signature", "bad_token") from exc
        except jwt.InvalidIssuerError as exc:
            raise Refusal("wrong token issuer", "bad_token") from exc
        except (jwt.PyJWTError, msgspec.ValidationError) as exc:
            raise Refusal(f"malformed token: {exc}", "bad_token") from exc

    def verify(self, token: str, typ: str | None = None) -> Claims:
        """Check signature, issuer, type (``typ``; None = join or session), expiry, subject and
        revocation; returns the claims. Raises Refusal (401) as listed in the module doc."""
        claims = self._decode(token)
        if claims.typ not in TYPES or (typ is not None and claims.typ != typ):
            raise Refusal("wrong token type", "token_wrong_type")
        if self.clock() >= claims.exp:
            raise Refusal("token expired", "token_expired")
        if claims.sub != spiffe_id(self.trust_domain, claims.ns, claims.svc):
            raise Refusal("token for another trust domain", "bad_token")
        rec = self.store.get_token(claims.jti)
        if rec is None and claims.typ == "join":
            raise Refusal("unknown token", "token_unknown")
        if rec is not None and rec.revoked:
            raise Refusal("token revoked", "token_revoked")
        return claims

    def revoked(self, jti: str) -> bool:
        """True if the lineage ``jti`` was revoked."""
        rec = self.store.get_token(jti)
        return rec is not None and rec.revoked > 0

    def revoke(self, jti: str) -> bool:
        """Revoke join token ``jti`` and its lineage; False if no such token."""
        return self.store.revoke_token(jti, self.clock())

    def records(self) -> list[TokenRecord]:
        """Every join token, newest first."""
        return self.store.list_tokens()
