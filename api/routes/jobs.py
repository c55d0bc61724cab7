"""Submitting jobs and reading their state."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from api.deps import SessionDep, StateDep
from api.ingest import Ingest
from api.schemas import Counts, ErrorOut, InstanceOut, InstancesPage, JobOut, PathsRequest, StudyRef
from api.state import AppState
from api.submit import submit
from db.jobs import as_utc, get_job, job_counts, job_studies, list_instances
from db.status import InstanceStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

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


def job_view(session: Session, job_id: str) -> JobOut:
    job = get_job(session, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return JobOut(
        id=job.id,
        status=job.status,
        created_at=as_utc(job.created_at),  # type: ignore[arg-type]
        finished_at=as_utc(job.finished_at),
        models=job.models,
        options=job.options or {},
        counts=Counts(**job_counts(session, job_id)),
        studies=[StudyRef.model_validate(s) for s in job_studies(session, job_id)],
    )


def _options(explain_threshold: object) -> dict[str, Any]:
    """Job options from multipart form fields."""
    if explain_threshold is None or explain_threshold == "":
        return {}
    try:
        threshold = float(str(explain_threshold))
    except ValueError:
        raise HTTPException(400, f"explain_threshold must be a number, not {explain_threshold!r}") from None
    if not 0 <= threshold <= 1:
        raise HTTPException(400, f"explain_threshold must be between 0 and 1, not {threshold}")
    return {"explain_threshold": threshold}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    openapi_extra=_SUBMIT_BODY,
    responses={400: {"model": ErrorOut}, 403: {"model": ErrorOut}, 413: {"model": ErrorOut},
               415: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)
async def create_job(request: Request, response: Response, state: StateDep) -> JobOut:
    """Submit files (multipart upload) or paths on shared storage (JSON)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        limit = state.settings.max_archive_members
        async with request.form(max_files=limit, max_fields=limit) as form:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            models = [m.strip() for v in form.getlist("models") if isinstance(v, str) for m in v.split(",")]
            if not uploads:
                raise HTTPException(400, "multipart submission has no files: send them as 'files' parts")

            def collect(ingest: Ingest) -> None:
                for upload in uploads:
                    ingest.add_upload(upload.filename or "upload", upload.file)

            options = _options(form.get("explain_threshold"))
            job_id = await run_in_threadpool(submit, state, collect, models, options)
    elif content_type.startswith("application/json"):
        try:
            body = PathsRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPException(400, f"invalid JSON body: {where}: {first['msg']}") from None
        roots = state.settings.allowed_roots

        def collect(ingest: Ingest) -> None:
            for path in body.paths:
                ingest.add_path(path, roots)

        options = {"explain_threshold": body.explain_threshold} if body.explain_threshold is not None else {}
        job_id = await run_in_threadpool(submit, state, collect, body.models, options)
    else:
        raise HTTPException(
            415,
            "send multipart/form-data with 'files' parts, or application/json with {\"paths\": [...]}",
        )
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return await run_in_threadpool(_view, state, job_id)


def _view(state: AppState, job_id: str) -> JobOut:
    with state.sessions() as session:
        return job_view(session, job_id)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
def read_job(job_id: str, session: SessionDep) -> JobOut:
    return job_view(session, job_id)


@router.get("/{job_id}/instances", response_model=InstancesPage, responses={404: {"model": ErrorOut}})
def read_instances(
    job_id: str,
    session: SessionDep,
    status: Annotated[InstanceStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> InstancesPage:
    if get_job(session, job_id) is None:
        raise HTTPException(404, f"no job with id {job_id}")
    rows = list_instances(session, job_id, status=status, limit=limit, offset=offset)
    return InstancesPage(
        job_id=job_id,
        status=status,
        limit=limit,
        offset=offset,
        items=[InstanceOut.model_validate(r, from_attributes=True) for r in rows],
    )

