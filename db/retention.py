"""Which uploaded files may leave the blob store, and recording that they left.

An upload is kept while any job that references its sha256 is open, has an instance
that is not final, or finished less than ``RADQ_BLOB_RETENTION_DAYS`` ago. Only
instances stored as ``blob`` count; saliency maps (referenced by results) and
path-submitted files are never candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import case, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from db.models import Instance, Job
from db.status import FINAL_STATUSES, JobStatus, StorageKind

ENDED_JOB_STATUSES = (JobStatus.DONE, JobStatus.CANCELLED)


@dataclass(frozen=True)
class FinishedJob:
    """A keyset position in the jobs that finished: (finished_at, id)."""

    finished_at: datetime
    id: str


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite returns naive datetimes


def finished_jobs(
    session: Session, *, after: FinishedJob | None, until: datetime, limit: int
) -> list[FinishedJob]:
    """Ended jobs that finished after ``after`` (exclusive) and at or before ``until``, oldest first."""
    query = select(Job.finished_at, Job.id).where(
        Job.status.in_(ENDED_JOB_STATUSES), Job.finished_at.is_not(None), Job.finished_at <= until
    )
    if after is not None:
        query = query.where(tuple_(Job.finished_at, Job.id) > tuple_(after.finished_at, after.id))
    rows = session.execute(query.order_by(Job.finished_at, Job.id).limit(limit)).all()
    return [FinishedJob(_utc(at), job_id) for at, job_id in rows if at is not None]


def uploads_of(session: Session, job_ids: Sequence[str]) -> list[str]:
    """The distinct sha256 of the uploaded files these jobs still hold in the blob store."""
    if not job_ids:
        return []
    query = select(Instance.location).where(
        Instance.job_id.in_(job_ids), Instance.storage == StorageKind.BLOB
    )
    return list(session.scalars(query.distinct()))


def deletable(session: Session, shas: Sequence[str], *, finished_before: datetime) -> dict[str, datetime]:
    """Of ``shas``, those every referencing instance is done with, each with its last job's end.

    A sha is deletable when every instance stored under it is final and belongs to a job
    that ended at or before ``finished_before``. One grouped query for the whole batch.
    """
    if not shas:
        return {}
    holding = or_(
        Instance.status.not_in(FINAL_STATUSES),
        Job.finished_at.is_(None),
        Job.finished_at > finished_before,
    )
    rows = session.execute(
        select(Instance.location, func.max(Job.finished_at), func.sum(case((holding, 1), else_=0)))
        .join(Job, Job.id == Instance.job_id)
        .where(Instance.storage == StorageKind.BLOB, Instance.location.in_(shas))
        .group_by(Instance.location)
    ).all()
    return {sha: _utc(last) for sha, last, held in rows if not held and last is not None}


def mark_deleted(session: Session, shas: Sequence[str]) -> int:
    """Record that these uploads left the blob store: their final instances become ``deleted``.

    Returns:
        How many instances were marked.
    """
    marked = 0
    for start in range(0, len(shas), 500):
        result = session.execute(
            update(Instance)
            .where(
                Instance.storage == StorageKind.BLOB,
                Instance.location.in_(shas[start : start + 500]),
                Instance.status.in_(FINAL_STATUSES),
            )
            .values(storage=StorageKind.DELETED, updated_at=Instance.updated_at)  # progress rates read it
            .execution_options(synchronize_session=False)
        )
        marked += int(getattr(result, "rowcount", 0) or 0)
    return marked
