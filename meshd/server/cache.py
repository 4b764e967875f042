"""Snapshot cache: the latest snapshot per node, long-poll watches, ACK/NACK status.

As go-control-plane's ``SimpleCache``: ``set_snapshot`` stores a node's snapshot and wakes every
watcher; ``wait_for(node, known_version, timeout)`` answers at once when the node's snapshot
version differs from ``known_version``, else parks until a change or the timeout (seconds).
``ack`` records what each sidecar reports: an ACK moves its applied version, a NACK keeps it and
records the reason (Envoy ``error_detail``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from meshd.snapshot.compile import NodeInfo
from meshd.snapshot.model import Snapshot, encode


@dataclass
class NodeStatus:
    info: NodeInfo
    applied: str = ""           # last ACKed version
    nacked: str = ""            # last NACKed version
    nack_reason: str = ""
    last_seen: float = field(default_factory=time.time)  # unix seconds
    watching: int = 0           # long-polls in flight: >0 means connected right now


@dataclass(frozen=True, slots=True)
class Entry:
    snapshot: Snapshot
    body: bytes          # JSON encoding, what the API serves
    content: bytes       # content key (no version), to push only changes


class SnapshotCache:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._status: dict[str, NodeStatus] = {}
        self._changed = trio.Event()

    def nodes(self) -> list[NodeInfo]:
        return [s.info for s in self._status.values()]

    def touch(self, info: NodeInfo) -> None:
        st = self._status.get(info.node)
        if st is None:
            self._status[info.node] = NodeStatus(info)
        else:
            st.info, st.last_seen = info, time.time()

    def get(self, node: str) -> Entry | None:
        return self._entries.get(node)

    def set_snapshot(self, snap: Snapshot) -> bool:
        """Publish ``snap`` unless its content equals what the node has; True if published."""
        content = snap.content_key()
        old = self._entries.get(snap.node)
        if old is not None and old.content == content:
            return False
        self._entries[snap.node] = Entry(snap, encode(snap), content)
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_for(self, node: str, known_version: str, wait: float) -> Entry | None:
        """The node's entry once its version differs from ``known_version``; None after ``wait`` s."""
        st = self._status.get(node)
        if st is not None:
            st.watching += 1
        try:
            with trio.move_on_after(wait):
                while True:
                    entry = self._entries.get(node)
                    if entry is not None and str(entry.snapshot.version) != known_version:
                        return entry
                    await self._changed.wait()
            return None
        finally:
            if st is not None:
                st.watching -= 1
                st.last_seen = time.time()

    def connected(self, node: str) -> bool:
        st = self._status.get(node)
        return st is not None and st.watching > 0

    def ack(self, node: str, version: str, error: str | None) -> bool:
        st = self._status.get(node)
        if st is None:
            return False
        st.last_seen = time.time()
        if error:
            st.nacked, st.nack_reason = version, error
        else:
            st.applied = version
        return True

    def prune(self, idle: float) -> list[str]:
        """Forget nodes with no long-poll in flight and none for ``idle`` seconds."""
        cutoff = time.time() - idle
        gone = [n for n, st in self._status.items() if st.watching == 0 and st.last_seen < cutoff]
        for node in gone:
            self.forget(node)
        return gone

    def forget(self, node: str) -> None:
        self._entries.pop(node, None)
        self._status.pop(node, None)

    def status(self) -> list[dict[str, object]]:
        """One row per node: intended vs applied version, sync state, last NACK."""
        rows = []
        for node, st in sorted(self._status.items()):
            entry = self._entries.get(node)
            intended = str(entry.snapshot.version) if entry else ""
            state = "SYNCED" if intended and intended == st.applied else (
                "NACKED" if st.nacked == intended and intended else "STALE")
            rows.append({"node": node, "service": st.info.service, "intended": intended,
                         "applied": st.applied, "state": state, "connected": st.watching > 0,
                         "nacked": st.nacked, "nack_reason": st.nack_reason,
                         "last_seen": st.last_seen})
        return rows
