"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{study}]`` stores instances as one radq job."""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.audit import audit
from api.deps import Caller, StateDep, SubmitDep
from api.dicomweb import (
    DICOM_JSON,
    Failure,
    Instance,
    Outcome,
    UnsupportedMediaType,
    accepts_dicom_json,
    boundary_of,
    check_part,
    not_stored,
    response_dataset,
    store_instances,
    warning_headers,
)
from api.ingest import Ingest
from api.multipart import Part, PartSpool, spool_body
from api.schemas import ErrorOut
from api.state import AppState
from api.submit import resolve_models, submit
from db.audit import AuditAction
from radq.errors import StorageFull

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

ModelsQuery = Annotated[
    list[str] | None,
    Query(description="Model names (repeat or comma-separate); default: the server's RADQ_DEFAULT_MODELS"),
]

_STORE_RESPONSE: dict[str, Any] = {"content": {DICOM_JSON: {"schema": {"type": "object"}}}}
_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"},
            }
        },
        "description": "One DICOM file (PS3.10) per part, each with Content-Type: application/dicom",
    }
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every instance stored; the radq job is in Location", **_STORE_RESPONSE},
    202: {"description": "Some instances stored, the others in FailedSOPSequence", **_STORE_RESPONSE},
    409: {"description": "No instance stored; reasons in FailedSOPSequence", **_STORE_RESPONSE},
    400: {"model": ErrorOut},
    406: {"model": ErrorOut},
    413: {"model": ErrorOut},
    415: {"model": ErrorOut},
    422: {"model": ErrorOut},
    503: {"model": ErrorOut},
}


@router.post("/studies", openapi_extra=_OPENAPI, responses=_RESPONSES, response_class=Response)
async def store_instances_route(
    request: Request, state: StateDep, caller: SubmitDep, models: ModelsQuery = None
) -> Response:
    """STOW-RS Store Instances: any studies, submitted together as one radq job."""
    return await _stow(request, state, caller, models, study=None)


@router.post("/studies/{study}", openapi_extra=_OPENAPI, responses=_RESPONSES, response_class=Response)
async def store_study_instances_route(
    study: str, request: Request, state: StateDep, caller: SubmitDep, models: ModelsQuery = None
) -> Response:
    """STOW-RS Store Instances of one study: parts of another study fail with 0xA900."""
    return await _stow(request, state, caller, models, study=study)


async def _stow(
    request: Request, state: AppState, caller: Caller, models: list[str] | None, study: str | None
) -> Response:
    if not accepts_dicom_json(request.headers.get("accept")):
        raise HTTPException(406, f"STOW-RS responses are {DICOM_JSON}; send Accept: {DICOM_JSON}")
    try:
        boundary = boundary_of(request.headers.get("content-type", ""))
    except UnsupportedMediaType as exc:
        raise HTTPException(415, str(exc)) from None
    names = [m.strip() for value in models or [] for m in value.split(",") if m.strip()]
    await run_in_threadpool(resolve_models, state, names)  # an unknown model: 400 before the body is read

    settings = state.settings
    spool = PartSpool(
        boundary,
        state.blobs.spool_dir,
        max_bytes=settings.max_upload_bytes,
        max_parts=settings.max_archive_members,
        reserve=state.reserve,
    )
    try:
        parts = await spool_body(request, spool)
        outcome, job_id = await run_in_threadpool(check_and_submit, state, parts, study, names)
    finally:
        await run_in_threadpool(spool.cleanup)

    if job_id is not None:
        detail = f"stow-rs: {len(outcome.stored)} instance(s)"
        await run_in_threadpool(
            partial(audit, job_id=job_id, study_instance_uid=study, detail=detail), state, caller,
            AuditAction.SUBMIT,
        )  # fmt: skip
    for failure in outcome.failed:
        log.info("stow-rs: %s", failure.reason)
    log.info(
        "stow-rs: job %s: %d instance(s) stored, %d part(s) failed",
        job_id,
        len(outcome.stored),
        len(outcome.failed),
    )
    # Relative, like Location: an absolute URL built from Host is wrong behind proxies and for
    # clients that send Host without the port (dicomweb-client does).
    retrieve_url = f"/v1/jobs/{job_id}" if job_id else ""
    status = 409 if job_id is None else 202 if outcome.failed else 200
    response = Response(
        json.dumps(response_dataset(outcome, retrieve_url)), status_code=status, media_type=DICOM_JSON
    )
    if job_id is not None:
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        response.headers["X-Radq-Job-Id"] = job_id
    for value in warning_headers(outcome.failed):
        response.headers.append("Warning", value)
    return response


def check_and_submit(
    state: AppState, parts: list[Part], study: str | None, models: list[str]
) -> tuple[Outcome, str | None]:
    """Check every part, then submit the good ones as one job; the job id is None if none was stored."""
    outcome = Outcome()
    accepted: list[Instance] = []
    for part in parts:
        checked = check_part(part, study)
        if isinstance(checked, Failure):
            outcome.failed.append(checked)
        else:
            accepted.append(checked)
    if not accepted:
        return outcome, None

    def collect(ingest: Ingest) -> None:
        store_instances(ingest, accepted, outcome)

    try:
        return outcome, submit(state, collect, models, {})
    except (OSError, StorageFull) as exc:  # the store could not take them: no job is made
        log.warning("stow-rs: %d part(s) not stored: %s", len(accepted), exc)
        outcome.stored.clear()
        outcome.failed.extend(not_stored(accepted, exc))
        return outcome, None
