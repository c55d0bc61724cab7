"""Which received files make one job: one per association, or one per study after a quiet spell."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from scp.spool import Received, Spool

log = logging.getLogger(__name__)


class Grouping(StrEnum):
    """How ``radq scp`` turns received instances into jobs."""

    ASSOCIATION = "association"  # one job per association, when it ends (released, aborted, dropped)
    STUDY = "study"  # one job per StudyInstanceUID, after a quiet period across associations


@dataclass
class Group:
    """Files that will become one job."""

    path: Path
    label: str
    finished: Callable[[], bool] | None
    """For a group tied to an association: whether it has ended. None: the quiet rule applies."""
    count: int = 0
    size: int = 0
    last_added: float = 0.0
    calling_aes: set[str] = field(default_factory=set)


class Batcher:
    """Puts received files into groups and hands out the groups that are complete.

    Thread-safe: the C-STORE handlers of concurrent associations call :meth:`add`, one
    flusher thread calls :meth:`take_ready`. A group handed out is never added to again:
    a later file with the same key starts a new group.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        quiet_seconds: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.quiet_seconds = quiet_seconds
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[Hashable, Group] = {}
        self._full: list[Group] = []

    def add(
        self,
        key: Hashable,
        received: Received,
        *,
        label: str,
        finished: Callable[[], bool] | None = None,
    ) -> Group:
        """Move ``received`` into the open group for ``key``, starting one if needed.

        A group that would pass ``max_bytes`` (``RADQ_MAX_UPLOAD_BYTES``, the most one job
        may hold) is closed first and a new one started, so a long association or a large
        study becomes several jobs instead of a refused one.
        """
        with self._lock:
            group = self._open.get(key)
            if group is not None and group.count and group.size + received.size > self.max_bytes:
                self._full.append(self._open.pop(key))
                group = None
            if group is None:
                group = Group(self.spool.new_group_dir(), label, finished)
                self._open[key] = group
            replaced = self.spool.adopt(received, group.path)
            if replaced is None:
                group.count += 1
            else:
                log.info("%s: %s was sent again; the new copy replaces the earlier one", label, received.name)
            group.size += received.size - (replaced or 0)
            group.last_added = self.clock()
            group.calling_aes.add(received.calling_ae)
            return group

    def take_ready(self) -> list[Group]:
        """Remove and return the groups that are complete: their association has ended,
        or (study groups) nothing was added for ``quiet_seconds``, or they are full."""
        now = self.clock()
        with self._lock:
            ready, self._full = self._full, []
            for key, group in list(self._open.items()):
                done = group.finished() if group.finished else now - group.last_added >= self.quiet_seconds
                if done:
                    ready.append(self._open.pop(key))
            return ready

    def take_all(self) -> list[Group]:
        """Remove and return every group, complete or not (at shutdown)."""
        with self._lock:
            groups, self._full = [*self._full, *self._open.values()], []
            self._open.clear()
            return groups

    def pending(self) -> int:
        """Instances received and not yet handed out."""
        with self._lock:
            return sum(g.count for g in (*self._full, *self._open.values()))
