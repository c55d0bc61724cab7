"""One message's instances as the engine tracks them, and what the task reports back."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class HandBack:
    """A chunk a worker must not run, to be published again to ``queue``."""

    queue: str
    priority: int
    instance_ids: list[int]


@dataclass
class ChunkReport:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    closed_with_webhook: list[str] = field(default_factory=list)
    """Jobs this chunk finished that have a webhook to call."""
    handed_back: HandBack | None = None
    """Set when nothing was claimed because another kind of worker must run the chunk."""


class Chunk:
    """The instances of one message still waiting for a final status in SQL.

    The writer settles them as their outcomes commit; the task thread waits on ``done``.
    """

    def __init__(self, job_id: str, instance_ids: set[int]) -> None:
        self.job_id = job_id
        self.report = ChunkReport(claimed=len(instance_ids))
        self.done = threading.Event()
        self._waiting = set(instance_ids)
        self._lock = threading.Lock()
        if not self._waiting:
            self.done.set()

    def settle(self, instance_id: int, status: str) -> None:
        """Count a committed outcome; the last one wakes the task."""
        with self._lock:
            if instance_id not in self._waiting:
                return
            self._waiting.discard(instance_id)
            setattr(self.report, status, getattr(self.report, status) + 1)
            if not self._waiting:
                self.done.set()

    def give_up(self, instance_id: int) -> None:
        """Stop waiting for an outcome that could not be written; the reaper takes the instance
        back once its lease, no longer renewed after the task returns, runs out."""
        with self._lock:
            self._waiting.discard(instance_id)
            if not self._waiting:
                self.done.set()

    @property
    def unsettled(self) -> int:
        with self._lock:
            return len(self._waiting)
