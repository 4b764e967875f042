"""The embedded default store: one SQLite file ``<data-dir>/meshd.db`` (WAL mode).

Tables: ``meta`` (schema version, epoch), ``rules`` (the live rule set as one JSON document,
replaced in one transaction), ``rule_history`` (every push/delete with the full resulting rule
set, the seam for ``rule history``/``rollback``), ``instances`` (built-in registry).
A push either commits whole or not at all (one transaction), so a crash never leaves half a
rule set. ``sqlite3.Error`` is mapped to ``ConfigError`` naming the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from meshd.errors import ConfigError
from meshd.rules.schema import RulesFile
from meshd.store.base import HistoryEntry, StoredRules
from registry.model import Instance

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rules (id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL,
                                  revision INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rule_history (revision INTEGER PRIMARY KEY, at REAL NOT NULL,
    action TEXT NOT NULL, file TEXT NOT NULL, changes BLOB NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, body BLOB NOT NULL);
"""


class _RulesDoc(msgspec.Struct):
    rules: RulesFile
    sources: dict[str, str]


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
        found = self._meta("schema")
        if found is None:
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(found) > SCHEMA_VERSION:
            raise ConfigError(f"store schema {found} is newer than this meshd ({SCHEMA_VERSION})",
                              file=str(self.path))

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
                   changes: list[tuple[str, str, str]]) -> int:
        body = msgspec.json.encode(_RulesDoc(rules=rules, sources=sources))
        with self._tx() as db:
            row = db.execute("SELECT COALESCE(MAX(revision), 0) FROM rule_history").fetchone()
            revision = int(row[0]) + 1
            db.execute("INSERT INTO rule_history VALUES (?, ?, ?, ?, ?, ?)",
                       (revision, time.time(), action, file, msgspec.json.encode(changes), body))
            db.execute("INSERT OR REPLACE INTO rules VALUES (1, ?, ?)", (body, revision))
        return revision

    def history(self, limit: int = 50) -> list[HistoryEntry]:
        rows = self._db.execute(
            "SELECT revision, at, action, file, changes FROM rule_history "
            "ORDER BY revision DESC LIMIT ?", (limit,)).fetchall()
        return [HistoryEntry(revision=r[0], at=r[1], action=r[2], file=r[3],
                             changes=[tuple(c) for c in msgspec.json.decode(r[4])])
                for r in rows]

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

    def close(self) -> None:
        self._db.close()
