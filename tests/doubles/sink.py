"""A ``SourceSink`` that records what a discovery source reports, for adapter tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from registry.model import Instance


class RecordingSink:
    def __init__(self) -> None:
        self.updates: list[list[Instance]] = []
        self.errors: list[tuple[str, str | None]] = []
        self.marks: list[int] = []  # len(errors) when each update arrived

    def omitted_only_failed(self, good: Sequence[Instance]) -> bool:
        """Every update is non-empty and lacks only instances of services reported failing before."""
        for upd, mark in zip(self.updates, self.marks, strict=True):
            failed = {svc for _m, svc in self.errors[:mark]}
            missing = {i.service for i in good if i not in upd}
            if not upd or (missing and None not in failed and not missing <= failed):
                return False
        return True

    def update(self, instances: Sequence[Instance]) -> None:
        self.updates.append(list(instances))
        self.marks.append(len(self.errors))

    def error(self, message: str, service: str | None = None) -> None:
        self.errors.append((message, service))

    @property
    def last(self) -> dict[str, Instance]:
        return {i.instance_id: i for i in (self.updates[-1] if self.updates else [])}

    async def until(self, pred: Callable[[RecordingSink], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``pred(self)`` holds (polling; generous timeouts, never latency asserts)."""
        with trio.fail_after(timeout):
            while not pred(self):  # noqa: ASYNC110 - predicates over recorded lists, 20 ms polls
                await trio.sleep(0.02)

    async def seen(self, pred: Callable[[dict[str, Instance]], bool],
                   timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the latest update satisfies ``pred`` (keyed by instance id)."""
        await self.until(lambda s: bool(s.updates) and pred(s.last), timeout)
