"""The state store behind meshd: rules, registry instances, the version epoch, rule history,
join tokens (with revocation) and the lineage of issued workload certificates.

One small interface so that the embedded SQLite default (``sqlite.py``) can later be joined by
an etcd store shared by several meshd replicas. Calls are synchronous and short (single-row
or single-transaction work); callers on trio may run them directly.

Errors: implementations raise ``meshd.errors.MeshError`` subclasses only (``ConfigError`` for a
corrupt or newer-schema store).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from meshd.rules.schema import RulesFile
from registry.model import Instance


class StoredRules(msgspec.Struct, frozen=True):
    """The live rule set: ``rules`` plus, per ``(kind, name)``, the file it was pushed from."""

    rules: RulesFile
    sources: dict[str, str]  # "kind/name" -> file name
    revision: int            # rule-history revision of this state (0 = never pushed)


class HistoryEntry(msgspec.Struct, frozen=True):
    """One accepted change of the rule set: revision ``revision`` is the state right after it."""

    revision: int
    at: float                # unix seconds
    action: str              # "push" | "delete" | "rollback"
    file: str                # pushed file, "<cli>" for a delete, "rollback to N" for a rollback
    changes: list[tuple[str, str, str]]  # (action, kind, name), action in create/update/delete
    author: str = ""         # who asked (x-meshd-author header); "" before schema 2


class StoredRevision(msgspec.Struct, frozen=True):
    """The complete rule set as it was right after history entry ``entry``."""

    rules: RulesFile
    sources: dict[str, str]  # "kind/name" -> file name
    entry: HistoryEntry


class TokenRecord(msgspec.Struct, frozen=True):
    """One join token meshd issued (the JWT itself is never stored, only its claims)."""

    jti: str                 # token id; session tokens of its lineage carry the same jti
    service: str
    namespace: str
    created: float           # unix seconds
    expires: float           # unix seconds
    revoked: float = 0.0     # unix seconds of the revocation, 0 = not revoked


class Store(Protocol):
    def next_epoch(self) -> int:
        """Persistently increment and return the epoch (called once per meshd start)."""
        ...

    def load_rules(self) -> StoredRules: ...

    def save_rules(self, rules: RulesFile, sources: dict[str, str], action: str, file: str,
                   changes: list[tuple[str, str, str]], *, author: str = "") -> int:
        """Atomically replace the live rule set and append a history entry; returns the revision
        (1, 2, ... in order, never reused)."""
        ...

    def history(self, limit: int = 50) -> list[HistoryEntry]:
        """The newest ``limit`` entries, newest first."""
        ...

    def revision(self, rev: int) -> StoredRevision:
        """The full rule set of revision ``rev``; raises ``KeyError`` if there is no such
        revision, ``ConfigError`` if it no longer decodes with this meshd's schema."""
        ...

    def load_instances(self) -> list[Instance]: ...

    def put_instance(self, inst: Instance) -> None: ...

    def delete_instance(self, instance_id: str) -> None: ...

    def put_token(self, rec: TokenRecord) -> None:
        """Insert a new token record (jti unique)."""
        ...

    def get_token(self, jti: str) -> TokenRecord | None: ...

    def list_tokens(self) -> list[TokenRecord]:
        """Every token record, newest first."""
        ...

    def revoke_token(self, jti: str, at: float) -> bool:
        """Mark ``jti`` revoked at ``at`` (the first revocation time is kept); False if unknown."""
        ...

    def put_cert(self, serial: str, jti: str, spiffe_id: str, not_after: float, now: float) -> None:
        """Record that leaf ``serial`` (hex) belongs to token lineage ``jti``; forgets leaves
        that expired before ``now``."""
        ...

    def cert_jti(self, serial: str) -> str | None:
        """The token lineage of leaf ``serial``, None if unknown or forgotten."""
        ...

    def close(self) -> None: ...


def source_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"
