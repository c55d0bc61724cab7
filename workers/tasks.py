"""Celery task bodies: thin wrappers that hand ids to :mod:`workers.pipeline`."""

from __future__ import annotations

from dataclasses import asdict

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from radq.settings import Settings
from radq.tasks import INFER_CHUNK, NOTIFY_JOB
from workers.context import get_context
from workers.metrics import WorkerMetrics
from workers.pipeline import run_chunk
from workers.webhooks import DeliveryFailed, deliver

WEBHOOK_ATTEMPTS = 5
"""Deliveries tried per job end before giving up (all recorded)."""
WEBHOOK_BACKOFF_S = 1.0
"""First retry delay; doubled each attempt (1, 2, 4, 8 s)."""


def register_tasks(app: Celery, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
    """Attach radq's tasks to ``app``; ``settings`` travel with them into forked children.

    ``metrics``: where the engine reports (the worker process's served metrics).
    """

    @app.task(
        name=INFER_CHUNK,
        shared=False,  # per-app closure over settings; never leak into other Celery apps
        # An unreachable database is transient: back off and try the chunk again.
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=10,
        bind=True,
    )
    def infer_chunk(self: Task, job_id: str, instance_ids: list[int]) -> dict[str, object]:
        context = get_context(settings, metrics)
        report = run_chunk(context, job_id, instance_ids, worker=self.request.hostname)
        back = report.handed_back
        if back is not None and back.instance_ids:
            # Published before this message is acknowledged (acks_late): a crash in
            # between duplicates the chunk, which claims make harmless, and loses nothing.
            app.send_task(
                INFER_CHUNK, args=[job_id, back.instance_ids], queue=back.queue, priority=back.priority
            )
        for closed in report.closed_with_webhook:
            app.send_task(NOTIFY_JOB, args=[closed], queue=settings.queue)
        return asdict(report)

    @app.task(name=NOTIFY_JOB, shared=False, bind=True, max_retries=WEBHOOK_ATTEMPTS - 1)
    def notify_job(self: Task, job_id: str) -> bool:
        attempt = self.request.retries + 1
        try:
            return deliver(get_context(settings, metrics), job_id, attempt)
        except DeliveryFailed as exc:
            if attempt >= WEBHOOK_ATTEMPTS:
                return False  # every attempt is recorded in webhook_deliveries
            raise self.retry(exc=exc, countdown=WEBHOOK_BACKOFF_S * 2 ** (attempt - 1)) from None
