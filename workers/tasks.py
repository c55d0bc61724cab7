"""Celery task bodies: thin wrappers that hand ids to :mod:`workers.pipeline`."""

from __future__ import annotations

from dataclasses import asdict

from celery import Celery
from sqlalchemy.exc import OperationalError

from radq.settings import Settings
from radq.tasks import INFER_CHUNK
from workers.context import get_context
from workers.pipeline import run_chunk


def register_tasks(app: Celery, settings: Settings) -> None:
    """Attach radq's tasks to ``app``; ``settings`` travel with them into forked children."""

    @app.task(
        name=INFER_CHUNK,
        shared=False,  # per-app closure over settings; never leak into other Celery apps
        # An unreachable database is transient: back off and try the chunk again.
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=10,
    )
    def infer_chunk(job_id: str, instance_ids: list[int]) -> dict[str, int]:
        return asdict(run_chunk(get_context(settings), job_id, instance_ids))
