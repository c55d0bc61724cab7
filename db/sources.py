"""Background registration of path submissions: the sources a job enumerates.

A job submitted by path is recorded at once with one ``job_sources`` row per path and
status ``registering``; whoever holds a source's lease walks it and registers its
files in batches (:func:`record_batch`). Leases make the walk resumable: a source
whose holder died is claimed again by :func:`claim_stale_sources` and resumes after
the ``files_seen`` files it had registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    Update,
    bindparam,
    case,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from db.jobs import NewInstance, add_instances
from db.models import Instance, Job, JobSource, table_of, utcnow
from db.status import OPEN_JOB_STATUSES, WAITING_STATUSES, InstanceStatus, JobStatus, SourceStatus
from db.work import close_finished_jobs


@dataclass(frozen=True)
class SourceRef:
    """What a registrar needs to (re)start walking one source."""

    id: int
    job_id: str
    path: str
    files_seen: int
    priority: str
    queue: str | None


def add_sources(
    session: Session, *, job_id: str, paths: Sequence[str], lease_seconds: int
) -> list[SourceRef]:
    """Record a job's paths, leased to the caller, who starts walking them now."""
    lease = utcnow() + timedelta(seconds=lease_seconds)
    job = session.get(Job, job_id)
    assert job is not None
    # One executemany, not the ORM's unit of work: a list of 4,000 file paths took the API
    # ~0.4 s to answer through add_all + flush.
    table = table_of(JobSource)
    rows = [
        {"job_id": job_id, "path": p, "files_seen": 0, "registered": 0, "lease_expires_at": lease}
        for p in paths
    ]
    ids = session.scalars(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows).all()
    return [SourceRef(i, job_id, p, 0, job.priority, job.queue) for i, p in zip(ids, paths, strict=True)]


def claim_stale_sources(session: Session, *, lease_seconds: int, limit: int = 10) -> list[SourceRef]:
    """Take over sources still registering whose holder stopped renewing its lease."""
    now = utcnow()
    stale = (
        select(JobSource.id)
        .where(JobSource.status == SourceStatus.REGISTERING, JobSource.lease_expires_at < now)
        .limit(limit)
        .scalar_subquery()
    )
    rows = session.execute(
        update(JobSource)
        .where(JobSource.id.in_(stale), JobSource.lease_expires_at < now)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(JobSource.id, JobSource.job_id, JobSource.path, JobSource.files_seen)
        .execution_options(synchronize_session=False)
    ).all()
    routes = job_routes(session, [r.job_id for r in rows])
    return [SourceRef(r.id, r.job_id, r.path, r.files_seen, *routes[r.job_id]) for r in rows]


def record_batch(
    session: Session,
    source: SourceRef,
    files: Sequence[NewInstance],
    *,
    files_seen: int,
    lease_seconds: int,
) -> list[int] | None:
    """Register one batch of a source's files and move its resume point to ``files_seen``.

    Returns:
        The ids of the new pending instances, or None when the job is no longer
        registering (cancelled): nothing is inserted then.
    """
    if not _still_registering(session, source.job_id):
        return None
    ids = add_instances(session, job_id=source.job_id, files=files)
    session.execute(
        update(JobSource)
        .where(JobSource.id == source.id)
        .values(
            files_seen=files_seen,
            registered=JobSource.registered + len(files),
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
        )
    )
    return ids


def record_files(
    session: Session, job_id: str, files: Sequence[tuple[SourceRef, Sequence[NewInstance]]]
) -> list[int] | None:
    """Register many single-file sources of one job and close them, in this one transaction.

    What :func:`record_batch` and :func:`finish_source` do for a source each, done for a
    thousand sources in a few statements: a job of 10,000 listed file paths costs ten
    transactions, not 20,000.

    Returns:
        The ids of the new pending instances, or None when the job is no longer
        registering (cancelled): nothing is inserted or closed then.
    """
    if not _still_registering(session, job_id):
        return None
    ids = add_instances(session, job_id=job_id, files=[row for _, rows in files for row in rows])
    now = utcnow()
    session.execute(
        _close_listed(),
        [{"b_id": source.id, "b_registered": len(rows), "b_now": now} for source, rows in files],
    )
    return ids


def _still_registering(session: Session, job_id: str) -> bool:
    """Lock the job row if it is still registering; False when it is not (cancelled)."""
    # Touching the job row first takes its lock (PostgreSQL) or the write lock (SQLite),
    # so a concurrent cancel either sees this batch or stops it.
    return bool(getattr(session.execute(_touch_registering(), {"b_job": job_id}), "rowcount", 0))


@lru_cache(maxsize=1)
def _touch_registering() -> Update:
    jobs = table_of(Job)
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("b_job"), jobs.c.status == JobStatus.REGISTERING)
        .values(status=JobStatus.REGISTERING)
    )


@lru_cache(maxsize=1)
def _close_listed() -> Update:
    sources = table_of(JobSource)
    return (
        update(sources)
        .where(sources.c.id == bindparam("b_id"))
        .values(
            files_seen=1,
            registered=bindparam("b_registered"),
            status=SourceStatus.DONE,
            finished_at=bindparam("b_now"),
            lease_expires_at=None,
        )
    )


def cancel_sources(session: Session, job_id: str, source_ids: Sequence[int]) -> str | None:
    """Close sources of a cancelled job that were never walked, in one statement.

    Returns:
        The job id when this closed the whole job and the job has a webhook to call.
    """
    session.execute(
        update(JobSource)
        .where(JobSource.id.in_(source_ids), JobSource.status == SourceStatus.REGISTERING)
        .values(status=SourceStatus.CANCELLED, finished_at=utcnow(), lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return leave_registering(session, job_id)


def finish_source(
    session: Session, source_id: int, status: SourceStatus, error: str | None = None
) -> str | None:
    """Close one source; when it was the job's last, the job leaves ``registering``.

    Returns:
        The job id when this closed the whole job and the job has a webhook to call.
    """
    source = session.get(JobSource, source_id)
    assert source is not None
    source.status = status
    source.error = error
    source.finished_at = utcnow()
    source.lease_expires_at = None
    session.flush()
    return leave_registering(session, source.job_id)


def leave_registering(session: Session, job_id: str) -> str | None:
    """Move the job on from ``registering`` once none of its sources is; close it if all is final.

    Returns:
        The job id when this closed the whole job and the job has a webhook to call.
    """
    session.execute(_leave_registering(), {"b_job": job_id})
    closed = close_finished_jobs(session, [job_id])
    return closed[0] if closed else None


@lru_cache(maxsize=1)
def _leave_registering() -> Update:
    jobs, sources, instances = table_of(Job), table_of(JobSource), table_of(Instance)
    job: BindParameter[str] = bindparam("b_job")
    others = exists().where(sources.c.job_id == job, sources.c.status == SourceStatus.REGISTERING)
    started = exists().where(instances.c.job_id == job, instances.c.status.not_in(WAITING_STATUSES))
    return (
        update(jobs)
        .where(jobs.c.id == job, jobs.c.status == JobStatus.REGISTERING, ~others)
        .values(status=case((started, JobStatus.RUNNING), else_=JobStatus.QUEUED))
    )


def release_sources(session: Session, source_ids: Sequence[int]) -> None:
    """Give up leases at shutdown so the next API process resumes these at once."""
    if source_ids:
        session.execute(
            update(JobSource)
            .where(JobSource.id.in_(source_ids), JobSource.status == SourceStatus.REGISTERING)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


@dataclass(frozen=True)
class Registration:
    """How far a job's background enumeration has come (``GET /v1/jobs/{id}``)."""

    status: str
    files_seen: int
    registered: int
    errors: list[str]
    started_at: datetime
    finished_at: datetime | None


def registration_of(session: Session, job_id: str) -> Registration | None:
    """The job's registration summary, or None for a job that was not submitted by path.

    Aggregated in SQL: a job of 4,000 listed files has 4,000 sources, and every
    ``GET /v1/jobs/{id}`` asks.
    """
    summary_query, errors_query = _registration_statements()
    summary = session.execute(summary_query, {"b_job": job_id}).one()
    errors = session.execute(errors_query, {"b_job": job_id}).all() if _with_error(summary) else []
    return _registration(summary, errors)


def registrations_of(session: Session, job_ids: Sequence[str]) -> dict[str, Registration]:
    """:func:`registration_of` for many jobs in at most two queries (a jobs page shows up to
    500); jobs not submitted by path are absent."""
    if not job_ids:
        return {}
    summary_query, errors_query = _registrations_statements()
    summaries = {row[0]: row[1:] for row in session.execute(summary_query, {"b_jobs": list(job_ids)})}
    errors: dict[str, list[tuple[str, str | None]]] = {job_id: [] for job_id in summaries}
    with_error = [job_id for job_id, summary in summaries.items() if _with_error(summary)]
    if with_error:
        for job_id, path, error in session.execute(errors_query, {"b_jobs": with_error}):
            errors[job_id].append((path, error))
    found = {job_id: _registration(summary, errors[job_id]) for job_id, summary in summaries.items()}
    return {job_id: registration for job_id, registration in found.items() if registration is not None}


def _with_error(summary: Sequence[Any]) -> bool:
    return bool(summary[_WITH_ERROR])


def _registration(summary: Sequence[Any], errors: Sequence[Any]) -> Registration | None:
    total, seen, registered, started, finished, ended, _, registering, failed, cancelled = summary
    if not total:
        return None
    overall = SourceStatus.DONE
    for status, count in ((SourceStatus.REGISTERING, registering), (SourceStatus.FAILED, failed),
                          (SourceStatus.CANCELLED, cancelled)):  # fmt: skip
        if count:
            overall = status
            break
    return Registration(
        status=overall,
        files_seen=int(seen or 0),
        registered=int(registered or 0),
        errors=[f"{path}: {error}" for path, error in errors],
        started_at=started,
        finished_at=finished if ended == total else None,
    )


_WITH_ERROR = 6
"""Where :func:`_summary_columns` counts the sources with an error."""


def _summary_columns() -> list[ColumnElement[Any]]:
    """The aggregates :func:`_registration` reads, in its order."""

    def having(status: str) -> ColumnElement[int]:
        return func.sum(case((JobSource.status == status, 1), else_=0))

    return [
        func.count(),
        func.sum(JobSource.files_seen),
        func.sum(JobSource.registered),
        func.min(JobSource.created_at),
        func.max(JobSource.finished_at),
        func.count(JobSource.finished_at),
        func.count(JobSource.error),
        having(SourceStatus.REGISTERING),
        having(SourceStatus.FAILED),
        having(SourceStatus.CANCELLED),
    ]


# Built once: building the summary's ten aggregates cost more CPU than SQLite took to run it.
@lru_cache(maxsize=1)
def _registration_statements() -> tuple[Select[*tuple[Any, ...]], Select[str, str | None]]:
    job: BindParameter[str] = bindparam("b_job")
    summary = select(*_summary_columns()).where(JobSource.job_id == job)
    errors = (
        select(JobSource.path, JobSource.error)
        .where(JobSource.job_id == job, JobSource.error.is_not(None))
        .order_by(JobSource.id)
    )
    return summary, errors


@lru_cache(maxsize=1)
def _registrations_statements() -> tuple[Select[*tuple[Any, ...]], Select[str, str, str | None]]:
    jobs: BindParameter[list[str]] = bindparam("b_jobs", expanding=True)
    summary = (
        select(JobSource.job_id, *_summary_columns())
        .where(JobSource.job_id.in_(jobs))
        .group_by(JobSource.job_id)
    )
    errors = (
        select(JobSource.job_id, JobSource.path, JobSource.error)
        .where(JobSource.job_id.in_(jobs), JobSource.error.is_not(None))
        .order_by(JobSource.id)
    )
    return summary, errors


def stale_pending(
    session: Session, *, older_than_seconds: float, limit: int = 10_000
) -> dict[str, list[int]]:
    """Claim instances left ``pending`` (their message was never published) for re-publishing.

    Touching ``updated_at`` is the claim, so two API processes never publish the same
    instance twice in one round.

    Returns:
        Instance ids per job id.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    live = select(Job.id).where(Job.status.in_(OPEN_JOB_STATUSES))
    candidates = (
        select(Instance.id)
        .where(
            Instance.status == InstanceStatus.PENDING, Instance.updated_at < cutoff, Instance.job_id.in_(live)
        )
        .order_by(Instance.id)
        .limit(limit)
        .scalar_subquery()
    )
    rows = session.execute(
        update(Instance)
        .where(
            Instance.id.in_(candidates),
            Instance.status == InstanceStatus.PENDING,
            Instance.updated_at < cutoff,
        )
        .values(updated_at=now)
        .returning(Instance.id, Instance.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    by_job: dict[str, list[int]] = {}
    for instance_id, job_id in rows:
        by_job.setdefault(job_id, []).append(instance_id)
    for ids in by_job.values():
        ids.sort()
    return by_job


def job_routes(session: Session, job_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """Where each job's messages go: ``job id -> (priority, queue or None for RADQ_QUEUE)``."""
    rows = session.execute(select(Job.id, Job.priority, Job.queue).where(Job.id.in_(set(job_ids)))).all()
    return {job_id: (priority, queue) for job_id, priority, queue in rows}
