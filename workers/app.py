"""The worker's Celery app: the shared configuration, radq's tasks, and the process's lifecycle.

Once Celery has started the worker (``worker_ready``), the process announces itself in
Redis (:class:`radq.heartbeat.Heartbeat`, which the API counts) and, when
``RADQ_WORKER_METRICS_PORT`` is set, serves its Prometheus metrics there. Its pool has a
thread per message it may hold (:func:`pool_threads`); :mod:`workers.prefetch` decides how
many it takes.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from radq.heartbeat import Heartbeat
from radq.logs import set_worker_name
from radq.queue import make_celery
from radq.settings import Settings
from workers.metrics import WorkerMetrics
from workers.prefetch import install as install_prefetch
from workers.tasks import register_tasks

log = logging.getLogger(__name__)


def _consumed_queues(app: Celery) -> list[str]:
    queues = app.amqp.queues
    return sorted(queues.consume_from or queues)


def pool_threads(settings: Settings) -> int:
    """Threads of the worker's pool: one per message it may hold at once."""
    return max(settings.worker_concurrency, settings.worker_max_messages)


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    metrics = WorkerMetrics()
    register_tasks(app, settings, metrics)
    install_prefetch(app, settings.worker_concurrency, settings.worker_max_messages, settings.batch_size)
    beats: list[Heartbeat] = []

    # radq configures logging itself (RADQ_LOG_FORMAT); a receiver here keeps Celery off it.
    @signals.setup_logging.connect(weak=False)
    def _keep_radq_logging(**_: Any) -> None:
        return None

    @signals.celeryd_after_setup.connect(weak=False)
    def _name_logs(sender: str, **_: Any) -> None:
        set_worker_name(sender)  # the Celery hostname, on every later log line

    @signals.worker_ready.connect(weak=False)
    def _announce(sender: Any, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        from workers.device import resolve_device  # torch: only in the worker process

        hostname = str(sender.hostname)
        queues = _consumed_queues(app)
        device = str(resolve_device(settings.device))
        metrics.describe(hostname=hostname, device=device, queues=queues)
        if settings.worker_metrics_port:
            metrics.serve(settings.worker_metrics_port)
            log.info("serving metrics on port %d", settings.worker_metrics_port)
        beat = Heartbeat(
            settings.broker_url,
            hostname,
            {"queues": queues, "device": device, "metrics_port": settings.worker_metrics_port},
        )
        beat.start()
        beats.append(beat)

    @signals.worker_shutdown.connect(weak=False)
    def _retire(sender: Any, **_: Any) -> None:
        while beats:
            beats.pop().stop()

    return app
