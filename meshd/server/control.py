"""The control plane's brain: rules + registry -> versioned snapshots (Pilot's discovery core).

``ControlPlane`` owns the live rule set, the built-in registry and the snapshot cache. Every
change (rule push/delete, instance registered/expired/deregistered, a new node subscribing)
calls ``rebuild()``: compile once, check consistency, and publish to each node whose content
changed, under version ``(epoch, counter)``. The epoch is taken from the store at start, so a
restarted meshd never re-issues a version number.

A rule push is validated whole (schema, semantics, references, then a trial compile checked
for consistency) before anything is stored: a rejected push changes nothing. Every accepted
push, delete and rollback is a numbered revision in the store's rule history (with author and
changes); ``rollback(rev)`` re-validates revision ``rev``'s full rule set and stores it as a new
revision, so history only ever grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from meshd.errors import ConfigError, RuleValidationError
from meshd.rules import validate as rv
from meshd.rules.checks import check_file, dotted
from meshd.rules.schema import KINDS, RulesFile
from meshd.server import rulediff
from meshd.server.cache import SnapshotCache
from meshd.server.quota import Quotas
from meshd.snapshot.compile import MeshConfig, NodeInfo, compile_mesh, for_node, listeners
from meshd.snapshot.consistency import consistency_errors
from meshd.snapshot.model import Version
from meshd.store.base import HistoryEntry, Store, StoredRevision, source_key
from registry.builtin import BuiltinRegistry
from registry.config import MeshdConfig
from registry.merge import Merger, Sink
from registry.model import Instance

log = logging.getLogger("meshd.control")
NODE_GONE_AFTER = 10.0  # seconds without a long-poll before a sidecar leaves proxy-status


class ControlPlane:
    def __init__(self, store: Store, clock: Callable[[], float] = trio.current_time,
                 config: MeshdConfig | None = None) -> None:
        self.store = store
        self.clock = clock
        self.epoch = store.next_epoch()
        self.counter = 0
        stored = store.load_rules()
        self.rules: RulesFile = stored.rules
        self.sources: dict[str, str] = dict(stored.sources)
        self.revision = stored.revision  # rule-history revision of the live rules (0 = none yet)
        self.registry = BuiltinRegistry()
        # every discovery source (registry.config), merged; the built-in registry is one of them
        self.config = config or MeshdConfig()
        names = [src.source_name for src in self.config.sources]
        self.merger = Merger(names if BuiltinRegistry.name in names else [BuiltinRegistry.name, *names],
                             self.config.merge.policy)
        self.cache = SnapshotCache()
        self.quotas = Quotas()
        self._mesh: MeshConfig | None = None
        self._restored = store.load_instances()

    def start(self) -> None:
        """Call inside trio.run: restores instances with a fresh lease and builds version 1."""
        self.registry.restore(self._restored, self.clock())
        self.merger.update(BuiltinRegistry.name, self.registry.instances(), self.clock())
        self.rebuild()

    @property
    def version(self) -> Version:
        return Version(self.epoch, self.counter)

    def instances(self) -> list[Instance]:
        """The merged view of every source (``registry.merge``): what routing sees."""
        return self.merger.instances()

    def sink(self, source: str) -> Sink:
        """Where discovery source ``source`` reports; a changed merged view rebuilds."""
        return Sink(self.merger, source, self.clock, self.rebuild)

    def tick(self) -> None:
        """Apply guard-withheld removals whose hold elapsed (``registry.guard``)."""
        if self.merger.tick(self.clock()):
            self.rebuild()

    def _builtin_changed(self) -> None:
        if self.merger.update(BuiltinRegistry.name, self.registry.instances(), self.clock()):
            self.rebuild()

    # -- snapshots -----------------------------------------------------------------------

    def rebuild(self) -> int:
        """Recompile and publish changed snapshots; returns how many nodes got a new version."""
        mesh = compile_mesh(self.rules, self.instances())
        self.counter += 1
        self._mesh = mesh
        self.quotas.sync(mesh)
        return sum(self._publish(info) for info in self.cache.nodes())

    def _publish(self, info: NodeInfo) -> bool:
        assert self._mesh is not None
        snap = for_node(self._mesh, info, self.version)
        problems = consistency_errors(snap)
        if problems:
            log.error("snapshot for %s withheld, inconsistent: %s", info.node, "; ".join(problems))
            return False
        return self.cache.set_snapshot(snap)

    def subscribe(self, info: NodeInfo) -> None:
        """Register/refresh a node and make sure it has a snapshot for its current listeners."""
        self.cache.touch(info)
        entry = self.cache.get(info.node)
        if entry is None or entry.snapshot.listeners != listeners(info):
            self._publish(info)

    # -- rules -----------------------------------------------------------------------------

    def _check_compiles(self, merged: RulesFile, file: str) -> None:
        probe = for_node(compile_mesh(merged, self.instances()), NodeInfo(node="probe"),
                         self.version)
        problems = consistency_errors(probe)
        if problems:
            raise RuleValidationError([ConfigError(p, file=file) for p in problems])

    def push_rules(self, text: str, file: str, dry_run: bool = False,
                   author: str = "") -> dict[str, object]:
        """Validate and apply a rules file; raises RuleValidationError (nothing changed).

        Returns ``{"changes": [[action, kind, name], ...], "dry_run": bool, "version": str}``
        plus ``"revision": int`` when something was stored (no changes = no new revision).
        """
        pushed, merged = rv.validate_push(text, file, self.rules, self._source_tuples())
        self._check_compiles(merged, file)
        changes = [c for c in rv.diff(self.rules, merged)]
        result: dict[str, object] = {"changes": [list(c) for c in changes], "dry_run": dry_run,
                                     "warnings": [w.to_dict() for w in rv.warnings(pushed, text, file)]}
        if dry_run or not changes:
            result["version"] = str(self.version)
            return result
        sources = dict(self.sources)
        for kind in KINDS:
            for rule in getattr(pushed, kind):
                sources[source_key(kind, rule.name)] = file
        result["revision"] = self._commit(merged, sources, "push", file, changes, author)
        result["version"] = str(self.version)
        return result

    def delete_rule(self, kind: str, name: str, author: str = "") -> dict[str, object]:
        """Remove one rule: ``{"revision": int, "version": str}``.

        Raises KeyError if absent, RuleValidationError if still referenced (nothing changed).
        """
        merged = rv.remove(self.rules, kind, name)
        errors = rv.check_references(merged, existing_sources=self._source_tuples())
        if errors:
            raise RuleValidationError(errors)
        self._check_compiles(merged, "<delete>")
        sources = {k: v for k, v in self.sources.items() if k != source_key(kind, name)}
        revision = self._commit(merged, sources, "delete", "<cli>", [("delete", kind, name)], author)
        return {"revision": revision, "version": str(self.version)}

    def rules_at(self, rev: int) -> StoredRevision:
        """The full rule set of revision ``rev``; 0 is the empty set before the first push.

        Raises KeyError (no such revision), ConfigError (stored by a meshd whose schema differs).
        """
        if not 0 <= rev <= self.revision:  # the live revision is always the newest one
            raise KeyError(f"no rule revision {rev}")
        if rev == 0:
            return StoredRevision(RulesFile(), {}, HistoryEntry(0, 0.0, "", "", []))
        return self.store.revision(rev)

    def rule_diff(self, a: int, b: int | None = None) -> dict[str, object]:
        """What changes from revision ``a`` to ``b`` (None = the live rules).

        Returns ``{"from": a, "to": int, "changes": [[action, kind, name], ...], "diff": str}``,
        ``diff`` a unified diff per changed rule (``rulediff.unified``). Raises as ``rules_at``.
        """
        old = self.rules_at(a).rules
        to, new = (self.revision, self.rules) if b is None else (b, self.rules_at(b).rules)
        return {"from": a, "to": to, "changes": [list(c) for c in rv.diff(old, new)],
                "diff": rulediff.unified(old, new, str(a), str(to))}

    def rollback(self, rev: int, author: str = "") -> dict[str, object]:
        """Make revision ``rev``'s rule set live again, stored as a new revision (action
        "rollback", file "rollback to REV"); a rollback to the live state stores nothing.

        The rule set is checked as a push is (semantics, references, trial compile) since the
        registry and the validator may have changed since it was stored. Returns
        ``{"changes": [[action, kind, name], ...], "target": rev, "revision": int, "version": str}``.
        Raises KeyError (no such revision), RuleValidationError (invalid today; nothing changed).
        """
        target = self.rules_at(rev)
        file = f"rollback to {rev}"
        errors = [ConfigError(reason, file=file, field=dotted(path))
                  for path, reason in check_file(target.rules)]
        errors += rv.check_references(target.rules, file=file)
        if errors:
            raise RuleValidationError(errors)
        self._check_compiles(target.rules, file)
        changes = rv.diff(self.rules, target.rules)
        result: dict[str, object] = {"changes": [list(c) for c in changes], "target": rev,
                                     "revision": self.revision}
        if changes:
            result["revision"] = self._commit(target.rules, dict(target.sources), "rollback",
                                              file, changes, author)
        result["version"] = str(self.version)
        return result

    def _commit(self, rules: RulesFile, sources: dict[str, str], action: str, file: str,
                changes: list[tuple[str, str, str]], author: str) -> int:
        """Store a validated rule set as a new revision, make it live and publish it."""
        revision = self.store.save_rules(rules, sources, action, file, changes, author=author)
        self.rules, self.sources, self.revision = rules, sources, revision
        self.rebuild()
        return revision

    def _source_tuples(self) -> dict[tuple[str, str], str]:
        return {tuple(k.split("/", 1)): v for k, v in self.sources.items()}  # type: ignore[misc]

    # -- registry --------------------------------------------------------------------------

    def register(self, inst: Instance) -> None:
        if self.registry.register(inst, self.clock()):
            self.store.put_instance(inst)
            self._builtin_changed()

    def heartbeat(self, instance_id: str) -> bool:
        return self.registry.heartbeat(instance_id, self.clock())

    def deregister(self, instance_id: str) -> bool:
        if not self.registry.deregister(instance_id):
            return False
        self.store.delete_instance(instance_id)
        self._builtin_changed()
        return True

    def expire(self) -> list[Instance]:
        """Drop lapsed leases (and sidecars gone from proxy-status); rebuild if any lapsed."""
        self.cache.prune(NODE_GONE_AFTER)
        gone = self.registry.expire(self.clock())
        for inst in gone:
            log.info("instance %s of %s expired (no heartbeat within %.1fs)",
                     inst.instance_id, inst.service, inst.ttl)
            self.store.delete_instance(inst.instance_id)
        if gone:
            self._builtin_changed()
        return gone
