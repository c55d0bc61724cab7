"""Recording the audit trail from routes (one short transaction per event)."""

from __future__ import annotations

from functools import partial

from sqlalchemy.orm import Session

from api.deps import Caller
from api.state import AppState
from api.submit import Recorded
from db.audit import AuditAction, record_event
from db.session import transaction


def audit(
    state: AppState,
    caller: Caller,
    action: AuditAction,
    *,
    job_id: str | None = None,
    study_instance_uid: str | None = None,
    detail: str | None = None,
) -> None:
    """Record that ``caller`` did ``action``; blocking (call from a thread in async routes)."""
    with transaction(state.sessions) as session:
        record_event(
            session,
            actor=caller.name,
            action=action,
            job_id=job_id,
            study_instance_uid=study_instance_uid,
            detail=detail,
        )


def submitted(caller: Caller, detail: str) -> Recorded:
    """Records ``caller``'s submission in the transaction that records the job."""
    return partial(_record_submit, caller, detail)


def _record_submit(caller: Caller, detail: str, session: Session, job_id: str) -> None:
    record_event(session, actor=caller.name, action=AuditAction.SUBMIT, job_id=job_id, detail=detail)
