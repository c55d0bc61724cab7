"""The audit trail: who (a token's name) submitted, read, cancelled or retried what."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEvent


class AuditAction(StrEnum):
    SUBMIT = "job.submit"  # uploads, path submissions and STOW-RS
    CANCEL = "job.cancel"
    RETRY = "job.retry"
    READ_INSTANCES = "job.instances"  # a job's per-file outcomes
    READ_STUDY = "study.read"  # a study's results
    FIND_STUDIES = "study.find"  # studies listed by patient pseudonym


def record_event(
    session: Session,
    *,
    actor: str,
    action: AuditAction,
    job_id: str | None = None,
    study_instance_uid: str | None = None,
    detail: str | None = None,
) -> None:
    """Add one audit row; the caller commits."""
    session.add(
        AuditEvent(
            actor=actor, action=action, job_id=job_id, study_instance_uid=study_instance_uid, detail=detail
        )
    )


def list_events(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    job_id: str | None = None,
    study_instance_uid: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Audit rows matching every filter given, newest first."""
    query = select(AuditEvent)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if job_id is not None:
        query = query.where(AuditEvent.job_id == job_id)
    if study_instance_uid is not None:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)))
