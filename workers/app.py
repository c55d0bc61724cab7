"""The worker's Celery app: the shared configuration plus radq's tasks."""

from __future__ import annotations

from celery import Celery

from radq.queue import make_celery
from radq.settings import Settings
from workers.tasks import register_tasks


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app, settings)
    return app
