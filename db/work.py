"""What workers do to the database: claim instances, record outcomes, close jobs.

Every write here is idempotent, so a re-delivered message never duplicates a row or
moves an instance backwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import BindParameter, Insert, Select, Update, bindparam, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate

from db.models import Instance, Job, Result, table_of, utcnow
from db.status import FINAL_STATUSES, WAITING_STATUSES, InstanceStatus, JobStatus


@lru_cache(maxsize=1)
def _claim() -> ReturningUpdate[int, str, str, str, str, int]:
    # Built once, as the writer's statements are: the ORM-enabled UPDATE built per message
    # cost a one-file message 1.5 ms of the worker's CPU (SQLite), ten times its SQL.
    table, jobs = table_of(Instance), table_of(Job)
    job: BindParameter[str] = bindparam("b_job")
    # EXISTS on the one job, not `job_id IN (SELECT id FROM jobs WHERE ...)`: SQLite built
    # that list from every job in the database for each claim (68 ms with 50,000 jobs, a
    # day of one-file jobs), PostgreSQL's planner looks the one job up either way.
    job_live = exists().where(jobs.c.id == job, jobs.c.status != JobStatus.CANCELLED)
    return (
        update(table)
        .where(
            table.c.id.in_(bindparam("b_ids", expanding=True)),
            table.c.job_id == job,
            job_live,
            table.c.status.in_(WAITING_STATUSES),
        )
        .values(
            status=InstanceStatus.PROCESSING,
            attempts=table.c.attempts + 1,
            lease_expires_at=bindparam("b_lease"),
            worker=bindparam("b_worker"),
            updated_at=bindparam("b_now"),
        )
        .returning(
            table.c.id, table.c.job_id, table.c.file_name, table.c.storage, table.c.location, table.c.attempts
        )  # fmt: skip
    )


@lru_cache(maxsize=1)
def _job_running() -> Update:
    jobs = table_of(Job)
    return (
        update(jobs)
        .where(jobs.c.id == bindparam("b_job"), jobs.c.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING)
    )


@dataclass(frozen=True)
class Claimed:
    id: int
    job_id: str
    file_name: str
    storage: str
    location: str
    attempts: int


def still_waiting(session: Session, job_id: str, instance_ids: Sequence[int]) -> list[int]:
    """Those of ``instance_ids`` (of job ``job_id``) still waiting for a worker, in id order."""
    return list(
        session.scalars(
            select(Instance.id)
            .where(
                Instance.id.in_(instance_ids),
                Instance.job_id == job_id,
                Instance.status.in_(WAITING_STATUSES),
            )
            .order_by(Instance.id)
        )
    )


def claim(
    session: Session,
    job_id: str,
    instance_ids: Sequence[int],
    *,
    lease_seconds: int,
    worker: str | None = None,
    job_running: bool = False,
) -> list[Claimed]:
    """Take the instances that are waiting, for this worker, and mark a queued job running.

    Instances already final, being processed, or in a cancelled job are left alone:
    that is what makes a re-delivered message harmless. An instance whose worker died
    is not retaken here but by the reaper (:func:`db.recovery.reap_expired_leases`),
    which sends it on its own so that a file that kills workers takes no others down.
    ``job_running``: the caller read the job as running in this transaction, so marking it
    is skipped (a statement per message on one-file streams).
    """
    now = utcnow()
    values = {
        "b_ids": list(instance_ids),
        "b_job": job_id,
        "b_lease": now + timedelta(seconds=lease_seconds),
        "b_worker": worker,
        "b_now": now,
    }
    claimed = [Claimed(*row) for row in session.execute(_claim(), values)]
    if claimed and not job_running:
        session.execute(_job_running(), {"b_job": job_id})
    return sorted(claimed, key=lambda c: c.id)


@dataclass(frozen=True)
class ResultRow:
    instance_id: int
    model: str
    model_version: str
    weights_sha256: str
    radq_version: str
    preprocessing: str
    precision: str | None  # fp32, bf16 or fp16: what the forward pass computed in
    outputs: Mapping[str, float]
    saliency: Mapping[str, str] | None = None  # label -> PNG sha256
    reused_from: int | None = None  # the result this one copies (deduplication)


def renew_leases(session: Session, instance_ids: Sequence[int], *, lease_seconds: int) -> int:
    """Extend the leases of instances this worker still processes; returns how many."""
    result = session.execute(
        update(Instance)
        .where(Instance.id.in_(instance_ids), Instance.status == InstanceStatus.PROCESSING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def record_metadata(session: Session, metadata: Sequence[Mapping[str, Any]]) -> None:
    """Bulk-update header fields (each mapping has ``id`` plus column values).

    Rows of one instance merge (the later value wins); rows with the same columns share
    one executemany of a cached statement.
    """
    by_id: dict[int, dict[str, Any]] = {}
    for row in metadata:
        by_id.setdefault(row["id"], {}).update(row)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    now = utcnow()
    for instance_id, row in by_id.items():
        columns = tuple(sorted(c for c in row if c != "id"))
        params = {f"b_{c}": row[c] for c in columns}
        params.update(b_id=instance_id, b_updated_at=now)
        groups.setdefault(columns, []).append(params)
    for columns, rows in groups.items():
        session.execute(_metadata_update(columns), rows)


@lru_cache(maxsize=32)
def _metadata_update(columns: tuple[str, ...]) -> Update:
    # Cached statements keep their memoised cache key: building one per batch (and the
    # ORM's bulk UPDATE by primary key) cost a GPU worker's writer more than the SQL did.
    table = table_of(Instance)
    values: dict[str, Any] = {c: bindparam(f"b_{c}") for c in columns}
    values["updated_at"] = bindparam("b_updated_at")
    return update(table).where(table.c.id == bindparam("b_id")).values(values)


def write_results(session: Session, results: Sequence[ResultRow]) -> None:
    """Insert results; a row that already exists for (instance, model, version) is replaced.

    One statement executed with many parameter sets, on the table rather than the mapped
    class: its compiled form is cached and the ORM adds no per-row work. A multi-row VALUES
    was compiled anew for every batch: 0.25 ms per row against 0.02-0.05 now (SQLite and
    PostgreSQL here), which capped a GPU worker's writer near 2,000 rows/s.
    """
    if not results:
        return
    now = utcnow()
    session.execute(
        _result_upsert(session.get_bind().dialect.name),
        [
            {
                "instance_id": r.instance_id,
                "model": r.model,
                "model_version": r.model_version,
                "weights_sha256": r.weights_sha256,
                "radq_version": r.radq_version,
                "preprocessing": r.preprocessing,
                "precision": r.precision,
                "outputs": dict(r.outputs),
                "saliency": dict(r.saliency) if r.saliency else None,
                "reused_from": r.reused_from,
                "created_at": now,
            }
            for r in results
        ],
    )


@lru_cache(maxsize=4)
def _result_upsert(dialect: str) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table_of(Result))
    return stmt.on_conflict_do_update(
        index_elements=["instance_id", "model", "model_version"],
        set_={
            "outputs": stmt.excluded.outputs,
            "precision": stmt.excluded.precision,
            "saliency": stmt.excluded.saliency,
            "created_at": stmt.excluded.created_at,
        },
    )


def finish(session: Session, outcomes: Sequence[tuple[int, str, str | None]]) -> None:
    """Set final statuses: ``(instance_id, status, reason)``. Only processing rows move.

    One executemany round trip, whatever the mix of statuses and reasons.
    """
    if not outcomes:
        return
    now = utcnow()
    session.execute(
        _finish_update(),
        [
            {"b_id": i, "b_status": status, "b_reason": reason, "b_updated_at": now}
            for i, status, reason in outcomes
        ],
    )


@lru_cache(maxsize=1)
def _finish_update() -> Update:
    table = table_of(Instance)
    return (
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.status == InstanceStatus.PROCESSING)
        .values(
            status=bindparam("b_status"),
            reason=bindparam("b_reason"),
            lease_expires_at=None,
            updated_at=bindparam("b_updated_at"),
        )
    )


def write_outcomes(
    session: Session,
    metadata: Sequence[Mapping[str, Any]],
    results: Sequence[ResultRow],
    outcomes: Sequence[tuple[int, str, str | None]],
    job_ids: Iterable[str],
) -> list[str]:
    """One transaction of a worker's writer: header columns, result rows, final statuses,
    then the jobs that ended; returns those jobs' ids."""
    record_metadata(session, metadata)
    write_results(session, results)
    finish(session, outcomes)
    return close_finished_jobs(session, job_ids)


def close_finished_jobs(session: Session, job_ids: Iterable[str]) -> list[str]:
    """Mark jobs done whose every instance is final (failed and skipped count as final).

    Returns:
        The ids of the jobs this call closed and that have a webhook to call.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return []
    lock, close = _close_statements()
    # Lock the job rows first: two transactions finishing the last instances of one job
    # (two workers, or a worker and the registrar) then check one after the other, and
    # the second sees what the first committed, so the job cannot be left open. SQLite
    # has no row locks (the SELECT would lock nothing): its one writer at a time already
    # runs the UPDATE below against everything committed before it.
    if session.get_bind().dialect.name != "sqlite":
        session.execute(lock, {"ids": ids})
    closed = session.execute(close, {"ids": ids, "finished_at": utcnow()}).all()
    return [job_id for job_id, url in closed if url]


@lru_cache(maxsize=1)
def _close_statements() -> tuple[Select[str], ReturningUpdate[str, str | None]]:
    jobs, instances = table_of(Job), table_of(Instance)
    ids: BindParameter[str] = bindparam("ids", expanding=True)
    unfinished = exists().where(instances.c.job_id == jobs.c.id, instances.c.status.not_in(FINAL_STATUSES))
    lock = select(jobs.c.id).where(jobs.c.id.in_(ids)).order_by(jobs.c.id).with_for_update()
    close = (
        update(jobs)
        .where(
            jobs.c.id.in_(ids),
            jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
            ~unfinished,
        )
        .values(status=JobStatus.DONE, finished_at=bindparam("finished_at"))
        .returning(jobs.c.id, jobs.c.webhook_url)
    )
    return lock, close


def open_jobs_with_nothing_left(session: Session, limit: int = 1000) -> list[str]:
    """Queued or running jobs whose every instance is final (a safety net for closing)."""
    unfinished = exists().where(Instance.job_id == Job.id, Instance.status.not_in(FINAL_STATUSES))
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), ~unfinished)
            .limit(limit)
        )
    )


def find_reusable(
    session: Session, keys: Iterable[tuple[str, str]], models: Iterable[tuple[str, str]]
) -> dict[tuple[str, str, str], Result]:
    """Earlier results for the same content: ``(SOPInstanceUID, sha256, model) -> Result``.

    Only results of the given model versions count; the oldest original wins.
    """
    wanted = set(keys)
    versions = dict(models)
    if not wanted or not versions:
        return {}
    found: dict[tuple[str, str, str], Result] = {}
    uids = sorted({uid for uid, _ in wanted})
    for start in range(0, len(uids), 500):
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.content_sha256, Result)
            .join(Result, Result.instance_id == Instance.id)
            .where(
                Instance.sop_instance_uid.in_(uids[start : start + 500]),
                Result.model.in_(list(versions)),
                Result.reused_from.is_(None),
            )
            .order_by(Result.id)
        ).all()
        for uid, sha, result in rows:
            if uid is None or sha is None or (uid, sha) not in wanted:
                continue
            key = (uid, sha, result.model)
            if versions[result.model] == result.model_version and key not in found:
                found[key] = result
    return found
