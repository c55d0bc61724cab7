"""Job summaries for webhooks, and the record of each delivery attempt."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.jobs import as_utc, get_job, job_counts
from db.models import WebhookDelivery


def job_summary(session: Session, job_id: str) -> dict[str, Any] | None:
    """What a webhook receives: the job's id, status, times and counts."""
    job = get_job(session, job_id)
    if job is None:
        return None
    finished = as_utc(job.finished_at)
    return {
        "id": job.id,
        "status": job.status,
        "priority": job.priority,
        "models": job.models,
        "created_at": as_utc(job.created_at).isoformat(),  # type: ignore[union-attr]
        "finished_at": finished.isoformat() if finished else None,
        "counts": job_counts(session, job_id),
        "url": f"/v1/jobs/{job.id}",
    }


def record_delivery(
    session: Session,
    *,
    job_id: str,
    url: str,
    attempt: int,
    status_code: int | None,
    error: str | None,
) -> None:
    delivered = error is None and status_code is not None and 200 <= status_code < 300
    session.add(
        WebhookDelivery(
            job_id=job_id, url=url, attempt=attempt, status_code=status_code, error=error, delivered=delivered
        )
    )
