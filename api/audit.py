"""Recording the audit trail from routes (one short transaction per event)."""

from __future__ import annotations

from api.deps import Caller
from api.state import AppState
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
