"""The audit trail (admin tokens only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BeforeValidator

from api.deps import AdminDep, SessionDep
from api.routes.jobs import not_a_number
from api.schemas import AuditEventOut, AuditPage, ErrorOut
from db.audit import AuditAction, list_events
from db.jobs import as_utc

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage, responses={403: {"model": ErrorOut}, 422: {"model": ErrorOut}})
def read_audit(
    session: SessionDep,
    _: AdminDep,
    actor: Annotated[str | None, Query(max_length=64, description="A token's name")] = None,
    action: Annotated[AuditAction | None, Query()] = None,
    job_id: Annotated[str | None, Query(max_length=36)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[
        datetime | None, BeforeValidator(not_a_number), Query(description="ISO 8601; events at or after")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Who did what, newest first: submissions, reads of results and studies, cancels, retries."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    events = list_events(
        session, actor=actor, action=action, job_id=job_id, study_instance_uid=study_instance_uid,
        since=since, limit=limit,
    )  # fmt: skip
    return AuditPage(
        items=[
            AuditEventOut(
                at=as_utc(e.at),  # type: ignore[arg-type]
                actor=e.actor,
                action=e.action,
                job_id=e.job_id,
                study_instance_uid=e.study_instance_uid,
                detail=e.detail,
            )
            for e in events
        ]
    )
