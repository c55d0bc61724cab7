"""Calling a job's webhook when it ends: POST the summary, record every attempt."""

from __future__ import annotations

import logging

import httpx

from db.jobs import get_job
from db.session import transaction
from db.webhooks import job_summary, record_delivery
from workers.context import WorkerContext

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class DeliveryFailed(Exception):
    """Raised when the receiver did not answer 2xx; the task retries with backoff."""


def deliver(ctx: WorkerContext, job_id: str, attempt: int) -> bool:
    """POST the job summary once. Returns False when there is nothing to send.

    Raises:
        DeliveryFailed: the receiver is unreachable or answered other than 2xx.
    """
    with ctx.sessions() as session:
        job = get_job(session, job_id)
        summary = job_summary(session, job_id)
        url = job.webhook_url if job else None
    if not url or summary is None:
        return False
    status: int | None = None
    error: str | None = None
    try:
        response = httpx.post(url, json=summary, timeout=TIMEOUT_S)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    with transaction(ctx.sessions) as session:
        record_delivery(session, job_id=job_id, url=url, attempt=attempt, status_code=status, error=error)
    if error:
        log.warning("webhook for job %s attempt %d failed: %s", job_id, attempt, error)
        raise DeliveryFailed(error)
    log.info("webhook for job %s delivered (attempt %d)", job_id, attempt)
    return True
