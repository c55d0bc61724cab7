"""Creating jobs, registering their instances, and reading job state."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Insert, Select, TextClause, Update, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from db.models import Instance, Job, table_of, utcnow
from db.status import OPEN_JOB_STATUSES, WAITING_STATUSES, InstanceStatus, JobStatus, Priority, StorageKind


@dataclass(frozen=True)
class NewInstance:
    """A file to register: where it is and what to call it."""

    file_name: str
    storage: str
    location: str
    size_bytes: int | None = None
    failure: str | None = None  # set when the file is refused at registration: recorded failed


def create_job(
    session: Session,
    *,
    models: Sequence[str],
    options: dict[str, Any] | None = None,
    priority: str = Priority.NORMAL,
    webhook_url: str | None = None,
    status: JobStatus = JobStatus.QUEUED,
    queue: str | None = None,
) -> Job:
    job = Job(
        id=str(uuid.uuid4()),
        status=status,
        models=list(models),
        options=options or None,
        priority=priority,
        webhook_url=webhook_url,
        queue=queue,
    )
    session.add(job)
    session.flush()
    return job


def route_job(session: Session, job_id: str, queue: str) -> None:
    """Send a job's future messages (retries, recovery) to ``queue`` instead of its own."""
    session.execute(update(Job).where(Job.id == job_id).values(queue=queue))


def add_instances(
    session: Session, *, job_id: str, files: Sequence[NewInstance], batch: int = 1000
) -> list[int]:
    """Insert instances in bulk and return the ids of those left ``pending``, in order.

    Files with a ``failure`` are recorded ``failed`` with it as the reason.
    """
    ids: list[int] = []
    postgres = session.get_bind().dialect.name == "postgresql"
    for start in range(0, len(files), batch):
        rows: list[dict[str, Any]] = [
            {
                "job_id": job_id,
                "file_name": f.file_name,
                "storage": f.storage,
                "location": f.location,
                "size_bytes": f.size_bytes,
                "status": InstanceStatus.FAILED if f.failure else InstanceStatus.PENDING,
                "reason": f.failure,
                "attempts": 0,
            }
            for f in files[start : start + batch]
        ]
        if postgres and len(rows) > RETURNING_MAX_ROWS:
            _insert_with_reserved_ids(session, rows)
            ids.extend(row["id"] for row in rows if row["status"] == InstanceStatus.PENDING)
        else:
            result = session.execute(_insert_instances(), rows)
            ids.extend(i for i, status in result.all() if status == InstanceStatus.PENDING)
    return ids


RETURNING_MAX_ROWS = 5
"""Most rows PostgreSQL inserts with RETURNING: psycopg caches the parsed form of statements of
up to 50 parameters (5 rows of 9), and a one-file job would pay a round trip to reserve ids."""


def _insert_with_reserved_ids(session: Session, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: take the rows' ids from the sequence first, then insert them without RETURNING.

    An INSERT ... RETURNING of many rows is one statement with a placeholder per value, and
    psycopg rewrites such a statement's placeholders in Python on every execution (it caches
    only short ones): 45 ms of CPU per 1,000 instances, two thirds of a path walk's time.
    Without RETURNING the insert is a plain executemany of one short statement: 15 ms.
    """
    reserved = sorted(session.scalars(_reserve_instance_ids(), {"b_n": len(rows)}))
    for row, instance_id in zip(rows, reserved, strict=True):
        row["id"] = instance_id
    session.execute(_insert_plain(), rows)


def mark_queued(session: Session, instance_ids: Sequence[int]) -> None:
    """Move instances from pending to queued once their message is published.

    Conditional, so a worker that already claimed one is never set back.
    """
    for start in range(0, len(instance_ids), 1000):
        session.execute(_mark_queued(), {"b_ids": list(instance_ids[start : start + 1000])})


@lru_cache(maxsize=1)
def _reserve_instance_ids() -> TextClause:
    return text("SELECT nextval(pg_get_serial_sequence('instances', 'id')) FROM generate_series(1, :b_n)")


@lru_cache(maxsize=1)
def _insert_plain() -> Insert:
    return insert(table_of(Instance))


@lru_cache(maxsize=1)
def _insert_instances() -> ReturningInsert[int, str]:
    table = table_of(Instance)
    return insert(table).returning(table.c.id, table.c.status, sort_by_parameter_order=True)


@lru_cache(maxsize=1)
def _mark_queued() -> Update:
    table = table_of(Instance)
    return (
        update(table)
        .where(table.c.id.in_(bindparam("b_ids", expanding=True)), table.c.status == InstanceStatus.PENDING)
        .values(status=InstanceStatus.QUEUED)
    )


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


@dataclass(frozen=True)
class JobSpec:
    """What a worker reads of a job for each of its messages."""

    id: str
    models: list[str]
    options: dict[str, Any]
    queue: str | None
    priority: str
    status: str


def job_spec(session: Session, job_id: str) -> JobSpec | None:
    """The job's models, options, queue, priority and status; None when there is no such job.

    One cached statement and a plain row: a worker asks for every message, and loading the
    ORM object cost a one-file message more than the query did.
    """
    row = session.execute(_job_spec(), {"b_id": job_id}).first()
    if row is None:
        return None
    job_id, models, options, queue, priority, status = row
    return JobSpec(job_id, list(models or []), dict(options or {}), queue, priority, status)


@lru_cache(maxsize=1)
def _job_spec() -> Select[str, list[str], dict[str, Any] | None, str | None, str, str]:
    return select(Job.id, Job.models, Job.options, Job.queue, Job.priority, Job.status).where(
        Job.id == bindparam("b_id")
    )


def job_counts(session: Session, job_id: str) -> dict[str, int]:
    """Instance counts per status, plus ``total``; every status is present."""
    return _counts(session.execute(_job_counts(), {"b_job": job_id}).all())


@dataclass(frozen=True)
class JobTally:
    """A job's instance counts per status (``total`` included), and per study seen so far."""

    counts: dict[str, int]
    studies: list[dict[str, Any]]


def job_tally(session: Session, job_id: str) -> JobTally:
    """Counts per status and per study from one grouped query: every job view asks for both."""
    return _tally(session.execute(_job_tally(), {"b_job": job_id}).all())


def job_tallies(session: Session, job_ids: Sequence[str]) -> dict[str, JobTally]:
    """:func:`job_tally` for many jobs from one grouped query: a jobs page shows up to 500."""
    rows: dict[str, list[tuple[str | None, str, int]]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        for job_id, uid, status, n in session.execute(_jobs_tally(), {"b_jobs": list(job_ids)}):
            rows[job_id].append((uid, status, n))
    return {job_id: _tally(found) for job_id, found in rows.items()}


def _tally(rows: Sequence[Any]) -> JobTally:
    studies: dict[str, dict[str, Any]] = {}
    for uid, status, n in rows:
        if uid is None:
            continue
        study = studies.setdefault(uid, {"study_instance_uid": uid, "instances": 0, "done": 0, "failed": 0,
                                         "skipped": 0})  # fmt: skip
        study["instances"] += n
        if status in study:
            study[status] += n
    counts = _counts((status, n) for _, status, n in rows)
    return JobTally(counts, [studies[uid] for uid in sorted(studies)])


def _counts(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    counts = {s.value: 0 for s in InstanceStatus}
    for status, n in rows:
        counts[status] += n
    counts["total"] = sum(counts.values())
    return counts


# Built once: constructing a grouped select costs more CPU than SQLite takes to run it on a
# small job, and every job view and webhook asks.
@lru_cache(maxsize=1)
def _job_counts() -> Select[str, int]:
    return (
        select(Instance.status, func.count())
        .where(Instance.job_id == bindparam("b_job"))
        .group_by(Instance.status)
    )


@lru_cache(maxsize=1)
def _job_tally() -> Select[str | None, str, int]:
    return (
        select(Instance.study_instance_uid, Instance.status, func.count())
        .where(Instance.job_id == bindparam("b_job"))
        .group_by(Instance.study_instance_uid, Instance.status)
    )


@lru_cache(maxsize=1)
def _jobs_tally() -> Select[str, str | None, str, int]:
    return (
        select(Instance.job_id, Instance.study_instance_uid, Instance.status, func.count())
        .where(Instance.job_id.in_(bindparam("b_jobs", expanding=True)))
        .group_by(Instance.job_id, Instance.study_instance_uid, Instance.status)
    )


def cancel_job(session: Session, job_id: str) -> bool:
    """Cancel a job: waiting instances end ``skipped``; claimed ones finish. False if it had ended."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(OPEN_JOB_STATUSES))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
    )
    if not getattr(result, "rowcount", 0):
        return False
    session.execute(
        update(Instance)
        .where(Instance.job_id == job_id, Instance.status.in_(WAITING_STATUSES))
        .values(status=InstanceStatus.SKIPPED, reason="job cancelled before this file was processed")
    )
    return True


@dataclass(frozen=True)
class Retried:
    """What a retry did: instances put back to pending, and failed uploads that cannot run again."""

    queued: list[int]
    deleted: int


def reset_failed(
    session: Session, job_id: str, *, deleted_reason: Callable[[str], str] | None = None
) -> Retried:
    """Put a job's failed instances back to pending and reopen the job.

    A job still registering keeps that status: its enumeration closes it later. Failed
    uploads whose file the retention sweep deleted cannot run again: they stay failed,
    with ``deleted_reason(sha256)`` as their reason, and are only counted.
    """
    gone: Sequence[Any] = []
    failed = select(Instance.id).where(Instance.job_id == job_id, Instance.status == InstanceStatus.FAILED)
    if deleted_reason is not None:
        gone = session.execute(
            select(Instance.id, Instance.location).where(
                Instance.job_id == job_id,
                Instance.status == InstanceStatus.FAILED,
                Instance.storage == StorageKind.DELETED,
            )
        ).all()
        if gone:
            session.execute(
                update(Instance),
                [{"id": i, "reason": deleted_reason(sha)} for i, sha in gone],
            )
        failed = failed.where(Instance.storage != StorageKind.DELETED)
    ids = list(session.scalars(failed))
    if ids:
        for start in range(0, len(ids), 1000):
            session.execute(
                update(Instance)
                .where(Instance.id.in_(ids[start : start + 1000]))
                .values(status=InstanceStatus.PENDING, reason=None, lease_expires_at=None)
            )
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.DONE)
            .values(status=JobStatus.QUEUED, finished_at=None)
        )
    return Retried(ids, len(gone))


def list_instances(
    session: Session,
    job_id: str,
    *,
    status: str | None = None,
    limit: int = 1000,
    offset: int = 0,
) -> Sequence[Instance]:
    query = select(Instance).where(Instance.job_id == job_id)
    if status:
        query = query.where(Instance.status == status)
    return session.scalars(query.order_by(Instance.id).limit(limit).offset(offset)).all()


def list_jobs(
    session: Session, *, status: str | None = None, since: datetime | None = None, limit: int = 50
) -> Sequence[Job]:
    """Newest first, optionally only one status and jobs created at or after ``since``."""
    query = select(Job)
    if status:
        query = query.where(Job.status == status)
    if since:
        query = query.where(Job.created_at >= since)
    return session.scalars(query.order_by(Job.created_at.desc()).limit(limit)).all()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; radq stores UTC, so label them so."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
