"""Deleting uploaded files once every job that uses them is done with them.

Run by the API's maintenance loop. Each round looks only at jobs that ended since the
previous round (a keyset cursor over ``(finished_at, id)``), so a big archive of old,
already swept jobs costs nothing per round; an API process's first round walks every
ended job once, in batches. A blob shared with a job still open is skipped then, and
looked at again when that job ends (its end enters the window).

Order of work per batch: find what may go (SQL), delete it from the store, then mark
its instances ``deleted`` (SQL). A crash between the last two leaves instances marked
``blob`` whose file is gone; the next first round deletes nothing more and marks them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from api.state import AppState
from db.models import utcnow
from db.retention import FinishedJob, deletable, finished_jobs, mark_deleted, uploads_of
from db.session import transaction

log = logging.getLogger(__name__)

JOBS_PER_BATCH = 200
"""Ended jobs read per query."""

SHAS_PER_BATCH = 500
"""Blobs checked per grouped query (and bound parameters per IN list)."""

LATE_COMMIT = timedelta(minutes=5)
"""How far back each round looks again: a job whose end was stamped before the previous
round's cutoff but committed after it is still seen."""


def retention_reason(sha256: str, days: float) -> str:
    """Why an instance whose upload was deleted cannot run again."""
    return (
        f"its uploaded file {sha256} was deleted from the blob store after its job finished "
        f"(RADQ_BLOB_RETENTION_DAYS={days:g}); submit the file again to process it"
    )


@dataclass
class SweepReport:
    blobs_deleted: int = 0
    instances_marked: int = 0


class BlobSweeper:
    """One per API process; remembers how far it has looked."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._cursor: FinishedJob | None = None

    def run_once(self) -> SweepReport:
        """Delete the uploads nothing holds any more; returns what was done."""
        report = SweepReport()
        cutoff = utcnow() - timedelta(days=self.state.settings.blob_retention_days)
        position = self._cursor
        if position is not None:
            position = FinishedJob(position.finished_at - LATE_COMMIT, "")
        while True:
            with self.state.sessions() as session:
                jobs = finished_jobs(session, after=position, until=cutoff, limit=JOBS_PER_BATCH)
                shas = uploads_of(session, [j.id for j in jobs])
            for start in range(0, len(shas), SHAS_PER_BATCH):
                self._sweep(shas[start : start + SHAS_PER_BATCH], cutoff, report)
            if jobs:
                position = jobs[-1]
                self._cursor = (
                    position
                    if self._cursor is None
                    else max(self._cursor, position, key=lambda p: (p.finished_at, p.id))
                )
            if len(jobs) < JOBS_PER_BATCH:
                break
        if report.blobs_deleted:
            log.info(
                "retention: deleted %d uploaded file(s) from %s (%d instance(s) marked)",
                report.blobs_deleted, self.state.blobs.url, report.instances_marked,
            )  # fmt: skip
        return report

    def _sweep(self, shas: list[str], cutoff: datetime, report: SweepReport) -> None:
        with self.state.sessions() as session:
            free = deletable(session, shas, finished_before=cutoff)
        store = self.state.blobs
        gone = [sha for sha, last_end in free.items() if store.delete(sha, unless_written_after=last_end)]
        if not gone:
            return
        with transaction(self.state.sessions) as session:
            report.instances_marked += mark_deleted(session, gone)
        report.blobs_deleted += len(gone)
