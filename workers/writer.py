"""The writing stage: one thread per worker process stores outcomes in bulk transactions.

Everything the other stages produce (header columns, result rows, final statuses) is
queued here and written in transactions of up to :data:`MAX_ROWS` items, so SQL costs
one round trip per batch of instances, not per instance. Items keep their order, so an
instance's results always commit no later than its final status. Header columns alone
do not start a transaction: they wait (at most :data:`METADATA_HOLD_S`) for the outcomes
that follow their decoding within a forward pass, and commit with them. An unreachable
database is retried until it comes back; meanwhile the leases of waiting instances run
out and the reaper hands them to other workers, whose writes are idempotent with ours.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.session import transaction
from db.work import ResultRow, write_outcomes
from radq.logs import log_context
from workers.chunk import Chunk
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

MAX_ROWS = 512
"""Most queued items written in one transaction."""
LINGER_S = 0.02
"""How long the writer waits for more items once it has some, so bursts share a transaction."""
METADATA_HOLD_S = 2.0
"""Longest header columns wait for outcomes to share a transaction with: written alone,
they cost a third of a CT worker's transactions for a fifth of its rows."""
RETRY_MAX_S = 30.0
"""Longest pause between attempts while the database is unreachable."""


@dataclass
class _Batch:
    metadata: list[dict[str, Any]] = field(default_factory=list)
    results: list[ResultRow] = field(default_factory=list)
    outcomes: list[tuple[Chunk, int, str, str | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metadata) + len(self.results) + len(self.outcomes)


_Item = tuple[str, Chunk, Any]


class Writer:
    """Queue writes from any thread; a background thread commits them in order."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        sleep: Callable[[float], None] = time.sleep,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._sleep = sleep
        # Not SimpleQueue, whose timed get can outlive its timeout until the next put on
        # CPython 3.11-3.12 (see Engine._ready): a batch would wait for company that never comes.
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="radq-writer", daemon=True)
        self._thread.start()

    def metadata(self, chunk: Chunk, row: dict[str, Any]) -> None:
        if row:
            self._queue.put(("metadata", chunk, row))

    def result(self, chunk: Chunk, row: ResultRow) -> None:
        self._queue.put(("result", chunk, row))

    def outcome(self, chunk: Chunk, instance_id: int, status: str, reason: str | None = None) -> None:
        self._queue.put(("outcome", chunk, (instance_id, status, reason)))

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _collect(self, batch: _Batch, first: _Item) -> bool:
        """Add ``first`` and what follows within :data:`LINGER_S` to ``batch``; returns
        whether :meth:`close` was called."""
        item: _Item | None = first
        deadline = time.monotonic() + LINGER_S
        while item is not None:
            kind, chunk, payload = item
            if kind == "metadata":
                batch.metadata.append(payload)
            elif kind == "result":
                batch.results.append(payload)
            else:
                batch.outcomes.append((chunk, *payload))
            if len(batch) >= MAX_ROWS:
                return False
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
        return True

    def _run(self) -> None:
        batch = _Batch()
        held_since: float | None = None  # when header columns alone began to wait
        while True:
            timeout = None if held_since is None else held_since + METADATA_HOLD_S - time.monotonic()
            try:
                first = self._queue.get(timeout=None if timeout is None else max(0.0, timeout))
            except queue.Empty:  # header columns that waited long enough go alone
                self._commit_logged(batch)
                batch, held_since = _Batch(), None
                continue
            stop = first is None or self._collect(batch, first)
            if stop or batch.results or batch.outcomes or len(batch) >= MAX_ROWS:
                if len(batch):
                    self._commit_logged(batch)
                batch, held_since = _Batch(), None
            elif held_since is None:
                held_since = time.monotonic()
            if stop:
                return

    def _commit_logged(self, batch: _Batch) -> None:
        jobs = {chunk.job_id for chunk, *_ in batch.outcomes}
        # A transaction often serves several jobs; its log lines name the job when it is one.
        with log_context(job_id=jobs.pop() if len(jobs) == 1 else None):
            self._commit(batch)

    def _commit(self, batch: _Batch) -> None:
        delay = 1.0
        while True:
            try:
                started = time.perf_counter()
                closed = self._write(batch)
                if self._metrics is not None:
                    self._metrics.write_seconds.observe(time.perf_counter() - started)
                break
            except OperationalError as exc:
                log.warning("could not write %d item(s), retrying in %.0f s: %s", len(batch), delay, exc.orig)
            except Exception:  # a bug must not stop the stage, nor hold the tasks waiting on it
                log.exception(
                    "writing %d item(s) failed; their instances go back through the reaper", len(batch)
                )
                for chunk, instance_id, *_ in batch.outcomes:
                    chunk.give_up(instance_id)
                return
            self._sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
        chunks_of_job: dict[str, Chunk] = {}
        for chunk, *_ in batch.outcomes:
            chunks_of_job.setdefault(chunk.job_id, chunk)
        for job_id in closed:  # the task of one chunk of the job calls its webhook
            chunks_of_job[job_id].report.closed_with_webhook.append(job_id)
        for chunk, instance_id, status, _ in batch.outcomes:
            chunk.settle(instance_id, status)

    def _write(self, batch: _Batch) -> list[str]:
        outcomes = [(i, status, reason) for _, i, status, reason in batch.outcomes]
        jobs = {chunk.job_id for chunk, *_ in batch.outcomes}
        with transaction(self._sessions) as session:
            return write_outcomes(session, batch.metadata, batch.results, outcomes, jobs)
