"""Submitting jobs and reading their state."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, BeforeValidator, ValidationError
from sqlalchemy.orm import Session

from api.audit import audit, submitted
from api.deps import Caller, ReadDep, RegistrarDep, SessionDep, StateDep, SubmitDep
from api.multipart import FormSpool, form_boundary, spool_body
from api.retention import retention_reason
from api.schemas import (
    Counts,
    ErrorOut,
    InstanceOut,
    InstancesPage,
    JobOut,
    JobsPage,
    PathsRequest,
    Progress,
    RegistrationOut,
    StudyRef,
    SubmitOptions,
)
from api.state import AppState
from api.submit import enqueue, notify_ended, submit, submit_paths
from db.audit import AuditAction
from db.jobs import (
    JobTally,
    as_utc,
    cancel_job,
    get_job,
    job_tallies,
    job_tally,
    list_instances,
    list_jobs,
    reset_failed,
)
from db.models import Job
from db.session import snapshot, transaction
from db.sources import Registration, registration_of, registrations_of
from db.status import InstanceStatus, JobStatus, Priority

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Options = TypeVar("Options", bound=BaseModel)

_SUBMIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "DICOM files and/or .zip/.tar/.tar.gz archives",
                        },
                        "models": {"type": "array", "items": {"type": "string"}},
                        "explain_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": PathsRequest.model_json_schema()},
        },
    }
}


def _job_or_404(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return job


def job_view(session: Session, job_id: str) -> JobOut:
    job = _job_or_404(session, job_id)
    return _job_out(job, job_tally(session, job_id), registration_of(session, job_id))


def jobs_view(session: Session, jobs: Sequence[Job]) -> list[JobOut]:
    """Views of many jobs from at most three grouped queries, not three per job."""
    ids = [job.id for job in jobs]
    tallies, registrations = job_tallies(session, ids), registrations_of(session, ids)
    return [_job_out(job, tallies[job.id], registrations.get(job.id)) for job in jobs]


def _job_out(job: Job, tally: JobTally, registration: Registration | None) -> JobOut:
    counts = Counts(**tally.counts)
    created = as_utc(job.created_at)
    assert created is not None
    return JobOut(
        id=job.id,
        status=job.status,
        created_at=created,
        finished_at=as_utc(job.finished_at),
        models=job.models,
        options=job.options or {},
        priority=job.priority,
        queue=job.queue,
        webhook_url=job.webhook_url,
        counts=counts,
        progress=_progress(counts, created, as_utc(job.finished_at)),
        studies=[StudyRef.model_validate(s) for s in tally.studies],
        registration=_registration_out(registration),
    )


def _registration_out(found: Registration | None) -> RegistrationOut | None:
    if found is None:
        return None
    started, finished = as_utc(found.started_at), as_utc(found.finished_at)
    assert started is not None
    elapsed = ((finished or datetime.now(UTC)) - started).total_seconds()
    return RegistrationOut(
        status=found.status,
        files_seen=found.files_seen,
        registered=found.registered,
        rate_per_s=round(found.files_seen / elapsed, 1) if elapsed > 0 else None,
        errors=found.errors,
        started_at=started,
        finished_at=finished,
    )


def _progress(counts: Counts, created: datetime, finished_at: datetime | None) -> Progress:
    finished = counts.done + counts.failed + counts.skipped
    elapsed = ((finished_at or datetime.now(UTC)) - created).total_seconds()
    rate = finished / elapsed if elapsed > 0 and finished else None
    remaining = counts.total - finished
    eta = (remaining / rate if rate else None) if remaining else 0.0
    return Progress(finished=finished, rate_per_s=rate and round(rate, 3), eta_seconds=eta and round(eta, 1))


async def _accept_form(request: Request, state: AppState, caller: Caller) -> JobOut:
    """A multipart/form-data upload: its files (a tar's members) spooled to disk as they
    arrive, one at a time (:mod:`api.multipart`), then stored and recorded as one job."""
    settings = state.settings
    spool = FormSpool(
        form_boundary(request.headers.get("content-type", "")), state.blobs.spool_dir,
        max_bytes=settings.max_upload_bytes, max_parts=settings.max_archive_members,
        max_ratio=settings.max_compression_ratio, reserve=state.reserve,
    )  # fmt: skip
    try:
        await spool_body(request, spool)
        uploads = spool.files
        if not uploads:
            raise HTTPException(400, "multipart submission has no files: send them as 'files' parts")
        opts = _form_options(spool.fields)

        def accept_upload() -> JobOut:
            job_id = submit(
                state, spool.add_to, opts.models, opts.job_options(dedup_by_default=settings.dedup),
                priority=opts.priority or Priority.NORMAL, webhook_url=opts.webhook_url,
                recorded=submitted(caller, f"upload: {len(uploads)} part(s)"),
            )  # fmt: skip
            return _view(state, job_id)

        return await run_in_threadpool(accept_upload)
    finally:
        await run_in_threadpool(spool.cleanup)


def _form_options(fields: Sequence[tuple[str, str]]) -> SubmitOptions:
    """Submission options from multipart fields (``models`` may repeat or be comma-separated)."""
    keys = ("explain_threshold", "priority", "webhook_url", "force")
    values = {key: [value for name, value in fields if name == key] for key in (*keys, "models")}
    repeated = [k for k in keys if len(values[k]) > 1]
    if repeated:  # which one was meant is unknown: taking the first would hide the mistake
        raise HTTPException(
            400, f"invalid request: {repeated[0]}: give it once, not {len(values[repeated[0]])} times"
        )
    empty = [k for k in keys if values[k] and not values[k][0]]
    if empty:  # "not set" or a value lost on the way: guessing would hide the mistake
        raise HTTPException(400, f"invalid request: {empty[0]}: empty; give a value or leave the field out")
    given = {k: values[k][0] for k in keys if values[k]}
    models = [m.strip() for v in values["models"] for m in v.split(",")]
    return _validated(SubmitOptions, {"models": models, **given})


def _validated(model: type[Options], data: object) -> Options:
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HTTPException(400, f"invalid request: {where}: {first['msg']}") from None


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    openapi_extra=_SUBMIT_BODY,
    responses={
        400: {"model": ErrorOut},
        403: {"model": ErrorOut},
        413: {"model": ErrorOut},
        415: {"model": ErrorOut},
        503: {"model": ErrorOut},
    },
)
async def create_job(
    request: Request, response: Response, state: StateDep, registrar: RegistrarDep, caller: SubmitDep
) -> JobOut:
    """Submit files (multipart upload) or paths on shared storage (JSON).

    A path submission answers at once with status ``registering``; its files are
    enumerated, recorded and queued in the background (see ``registration``).
    """
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        view = await _accept_form(request, state, caller)
    elif content_type.startswith("application/json"):
        body = _validated(PathsRequest, await request.body())

        def accept_paths() -> JobOut:
            job_id, sources = submit_paths(
                state, body.paths, body.models, body.job_options(dedup_by_default=state.settings.dedup),
                priority=body.priority or Priority.BULK, webhook_url=body.webhook_url,
                recorded=submitted(caller, f"paths: {len(body.paths)}"),
            )  # fmt: skip
            registrar.register(sources)
            return _view(state, job_id)

        # One hop to a thread for the whole submission: a one-file job is mostly overhead.
        view = await run_in_threadpool(accept_paths)
    else:
        raise HTTPException(
            415,
            "send multipart/form-data with 'files' parts, or application/json with {\"paths\": [...]}",
        )
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    return view


def _view(state: AppState, job_id: str) -> JobOut:
    # One snapshot: the job's status, counts and registration agree even while workers commit.
    with snapshot(state.sessions) as session:
        return job_view(session, job_id)


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
"""What pydantic would read as a number of seconds: ``20240131``, ``1.5``, ``1.19e-07``."""


def not_a_number(value: object) -> object:
    """Refuse a number for a date-time: pydantic would read it as Unix time, so ISO 8601's
    basic form ``20240131`` would silently mean 1970-08-23."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        raise ValueError("expected an ISO 8601 date-time such as 2024-01-31T00:00:00Z, not a number")
    return value


@router.get("", response_model=JobsPage, responses={422: {"model": ErrorOut}})
async def read_jobs(
    state: StateDep,
    status: Annotated[JobStatus | None, Query()] = None,
    since: Annotated[
        datetime | None,
        BeforeValidator(not_a_number),
        Query(description="ISO 8601; jobs created at or after"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobsPage:
    """Jobs, newest first."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)

    def page() -> JobsPage:  # one hop to a thread, and every view from one snapshot
        with snapshot(state.sessions) as session:
            jobs = list_jobs(session, status=status, since=since, limit=limit)
            return JobsPage(items=jobs_view(session, jobs))

    return await run_in_threadpool(page)


@router.get("/{job_id}", response_model=JobOut,
            responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}})  # fmt: skip
async def read_job(job_id: str, state: StateDep) -> JobOut:
    # One hop to a thread: a session dependency and a plain def cost three (pollers ask often).
    return await run_in_threadpool(_view, state, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                        422: {"model": ErrorOut}})  # fmt: skip
def cancel(job_id: str, state: StateDep, caller: SubmitDep) -> JobOut:
    """Drop a job's waiting work; chunks already being processed finish and are counted."""
    with transaction(state.sessions) as session:
        job = _job_or_404(session, job_id)
        if not cancel_job(session, job_id):
            raise HTTPException(409, f"job {job_id} has already ended ({job.status}); nothing to cancel")
        webhook = job.webhook_url
    audit(state, caller, AuditAction.CANCEL, job_id=job_id)
    if webhook:
        notify_ended(state, job_id)
    return _view(state, job_id)


@router.post("/{job_id}/retry", response_model=JobOut, status_code=202,
             responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                        422: {"model": ErrorOut}})  # fmt: skip
def retry(job_id: str, state: StateDep, caller: SubmitDep) -> JobOut:
    """Run a job's failed instances again."""
    with transaction(state.sessions) as session:
        job = _job_or_404(session, job_id)
        if job.status == JobStatus.CANCELLED:
            raise HTTPException(409, f"job {job_id} was cancelled; submit its files again instead")
        days = state.settings.blob_retention_days
        retried = reset_failed(session, job_id, deleted_reason=lambda sha: retention_reason(sha, days))
        priority, queue = job.priority, job.queue
    ids, gone = retried.queued, retried.deleted
    if not ids and gone:
        raise HTTPException(
            409,
            f"job {job_id}: the uploaded files of its {gone} failed instance(s) were deleted from the blob "
            f"store after the job finished (RADQ_BLOB_RETENTION_DAYS={days:g}); submit them again",
        )
    if not ids:
        raise HTTPException(409, f"job {job_id} has no failed instances to retry")
    audit(state, caller, AuditAction.RETRY, job_id=job_id, detail=f"{len(ids)} instance(s)")
    enqueue(state, job_id, ids, priority, queue=queue)
    return _view(state, job_id)


@router.get("/{job_id}/instances", response_model=InstancesPage,
            responses={404: {"model": ErrorOut}, 422: {"model": ErrorOut}})  # fmt: skip
def read_instances(
    job_id: str,
    session: SessionDep,
    state: StateDep,
    caller: ReadDep,
    status: Annotated[InstanceStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    # SQL's OFFSET is a signed 64-bit integer: past it SQLite and PostgreSQL raise, not answer.
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> InstancesPage:
    _job_or_404(session, job_id)
    audit(state, caller, AuditAction.READ_INSTANCES, job_id=job_id)
    rows = list_instances(session, job_id, status=status, limit=limit, offset=offset)
    return InstancesPage(
        job_id=job_id,
        status=status,
        limit=limit,
        offset=offset,
        items=[InstanceOut.model_validate(r, from_attributes=True) for r in rows],
    )
