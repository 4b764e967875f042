"""The embedded default store: one SQLite file ``<data-dir>/meshd.db`` (WAL mode).

Tables: ``meta`` (schema version, epoch), ``rules`` (the live rule set as one JSON document,
replaced in one transaction), ``rule_history`` (every push/delete/rollback with its author, its
changes and the full resulting rule set: ``rule history``/``diff``/``rollback``), ``instances``
(built-in registry), ``tokens`` (join tokens: jti, service, namespace, created, expires,
revoked) and ``certs`` (issued leaf serial -> token lineage jti, pruned once expired). A push
either commits whole or not at all (one transaction), so a crash never leaves half a rule set.
``sqlite3.Error`` is mapped to ``ConfigError`` naming the file.

Schema versions: 1 = first release; 2 adds ``rule_history.author``; 3 adds ``tokens`` and
``certs``. An older file is migrated in place when opened (one transaction; old history entries
get author ``""``); a file of a newer version than this meshd is refused.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from meshd.errors import ConfigError
from meshd.rules.schema import RulesFile
from meshd.store.base import HistoryEntry, StoredRevision, StoredRules, TokenRecord
from registry.model import Instance

SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rules (id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL,
                                  revision INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rule_history (revision INTEGER PRIMARY KEY, at REAL NOT NULL,
    action TEXT NOT NULL, file TEXT NOT NULL, changes BLOB NOT NULL, body BLOB NOT NULL,
    author TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, body BLOB NOT NULL);
"""
_SCHEMA_3 = (  # run by every open (new files) and by the 2 -> 3 migration; idempotent
    "CREATE TABLE IF NOT EXISTS tokens (jti TEXT PRIMARY KEY, service TEXT NOT NULL, "
    "namespace TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, "
    "revoked REAL NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS certs (serial TEXT PRIMARY KEY, jti TEXT NOT NULL, "
    "spiffe_id TEXT NOT NULL, not_after REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS certs_not_after ON certs (not_after)",
)
_TOKEN_COLUMNS = "jti, service, namespace, created, expires, revoked"


class _RulesDoc(msgspec.Struct):
    rules: RulesFile
    sources: dict[str, str]


_ENTRY_COLUMNS = "revision, at, action, file, changes, author"


def _entry(row: Any) -> HistoryEntry:
    """A ``HistoryEntry`` from a sqlite3 row starting with ``_ENTRY_COLUMNS``."""
    changes = msgspec.json.decode(row[4], type=list[tuple[str, str, str]])
    return HistoryEntry(revision=int(row[0]), at=float(row[1]), action=str(row[2]),
                        file=str(row[3]), changes=changes, author=str(row[5]))


class SqliteStore:
    """``Store`` on one SQLite file; not shared between processes that write concurrently."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "meshd.db"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            for statement in _SCHEMA_3:
                self._db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"cannot open store: {exc}", file=str(self.path)) from exc
        self._check_schema()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ConfigError(f"store error: {exc}", file=str(self.path)) from exc

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _check_schema(self) -> None:
        """Stamp a new file, migrate an older one in place, refuse a newer one."""
        found = self._meta("schema") or "0"
        if not found.isdigit():
            raise ConfigError(f"store schema {found!r} is not a version number", file=str(self.path))
        if int(found) > SCHEMA_VERSION:
            raise ConfigError(f"store schema {found} is newer than this meshd ({SCHEMA_VERSION})",
                              file=str(self.path))
        if int(found) < SCHEMA_VERSION:
            with self._tx() as db:  # checked inside the transaction: safe if two open at once
                columns = {row[1] for row in db.execute("PRAGMA table_info(rule_history)")}
                if "author" not in columns:  # 1 -> 2
                    db.execute("ALTER TABLE rule_history ADD COLUMN author TEXT NOT NULL DEFAULT ''")
                for statement in _SCHEMA_3:  # 2 -> 3
                    db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def next_epoch(self) -> int:
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            epoch = (int(row[0]) if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
        return epoch

    def load_rules(self) -> StoredRules:
        row = self._db.execute("SELECT body, revision FROM rules WHERE id = 1").fetchone()
        if row is None:
            return StoredRules(rules=RulesFile(), sources={}, revision=0)
        doc = msgspec.json.decode(row[0], type=_RulesDoc)
        return StoredRules(rules=doc.rules, sources=doc.sources, revision=int(row[1]))

    def save_rules(self, rules: RulesFile, sources: dict[str, str], action: str, file: str,
                   changes: list[tuple[str, str, str]], *, author: str = "") -> int:
        body = msgspec.json.encode(_RulesDoc(rules=rules, sources=sources))
        with self._tx() as db:
            row = db.execute("SELECT COALESCE(MAX(revision), 0) FROM rule_history").fetchone()
            revision = int(row[0]) + 1
            db.execute("INSERT INTO rule_history (revision, at, action, file, changes, body, author) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (revision, time.time(), action, file, msgspec.json.encode(changes), body,
                        author))
            db.execute("INSERT OR REPLACE INTO rules VALUES (1, ?, ?)", (body, revision))
        return revision

    def history(self, limit: int = 50) -> list[HistoryEntry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM rule_history ORDER BY revision DESC LIMIT ?",
            (limit,)).fetchall()
        return [_entry(r) for r in rows]

    def revision(self, rev: int) -> StoredRevision:
        row = self._db.execute(f"SELECT {_ENTRY_COLUMNS}, body FROM rule_history WHERE revision = ?",
                               (rev,)).fetchone()
        if row is None:
            raise KeyError(f"no rule revision {rev}")
        try:
            doc = msgspec.json.decode(row[6], type=_RulesDoc)
        except msgspec.DecodeError as exc:  # a rule set this meshd's schema no longer accepts
            raise ConfigError(f"rule revision {rev} cannot be read by this meshd: {exc}",
                              file=str(self.path)) from exc
        return StoredRevision(rules=doc.rules, sources=doc.sources, entry=_entry(row))

    def load_instances(self) -> list[Instance]:
        rows = self._db.execute("SELECT body FROM instances ORDER BY id").fetchall()
        return [msgspec.json.decode(r[0], type=Instance) for r in rows]

    def put_instance(self, inst: Instance) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?)",
                       (inst.instance_id, msgspec.json.encode(inst)))

    def delete_instance(self, instance_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def put_token(self, rec: TokenRecord) -> None:
        with self._tx() as db:
            db.execute(f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (rec.jti, rec.service, rec.namespace, rec.created, rec.expires, rec.revoked))

    def get_token(self, jti: str) -> TokenRecord | None:
        row = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE jti = ?", (jti,)).fetchone()
        return None if row is None else TokenRecord(*row)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._db.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created DESC, jti")
        return [TokenRecord(*row) for row in rows.fetchall()]

    def revoke_token(self, jti: str, at: float) -> bool:
        with self._tx() as db:
            db.execute("UPDATE tokens SET revoked = ? WHERE jti = ? AND revoked = 0", (at, jti))
            found = db.execute("SELECT 1 FROM tokens WHERE jti = ?", (jti,)).fetchone()
        return found is not None

    def put_cert(self, serial: str, jti: str, spiffe_id: str, not_after: float, now: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM certs WHERE not_after < ?", (now,))
            db.execute("INSERT OR REPLACE INTO certs VALUES (?, ?, ?, ?)",
                       (serial, jti, spiffe_id, not_after))

    def cert_jti(self, serial: str) -> str | None:
        row = self._db.execute("SELECT jti FROM certs WHERE serial = ?", (serial,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._db.close()
