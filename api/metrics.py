"""Prometheus metrics of the API's ``/metrics``: requests, plus cluster state read at scrape.

Counts come from the source of truth (SQL), so every API replica reports the same
numbers; queue depths and live workers come from Redis. The figures each worker process
measures itself (batch sizes, stage latencies) are served by that worker
(:mod:`workers.metrics`, ``RADQ_WORKER_METRICS_PORT``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter as Tally
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.state import AppState
from db.models import Instance, Job, Result
from db.status import InstanceStatus, JobStatus
from radq.heartbeat import live_workers
from radq.queue import KOMBU_PRIORITY_STEPS, UNACKED, redis_queue_keys

log = logging.getLogger(__name__)

JOB_DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
"""Seconds from submission to the end of a job: an urgent study to a day-long archive."""


class DatabaseCollector(Collector):
    """Job, instance and per-model counts, queue depth by queue, job durations: all from SQL."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        instances = GaugeMetricFamily("radq_instances", "Instances by status", labels=["status"])
        jobs = GaugeMetricFamily("radq_jobs", "Jobs by status", labels=["status"])
        queued = GaugeMetricFamily(
            "radq_queue_instances",
            "Instances queued (waiting for a worker) by Celery queue",
            labels=["queue"],
        )
        processed = CounterMetricFamily(
            "radq_model_instances_processed",
            "Result rows per model (instances inferred, or reused by deduplication)",
            labels=["model"],
        )
        failed = GaugeMetricFamily(
            "radq_model_instances_failed",
            "Failed instances, attributed to each model their job names (a retry lowers it)",
            labels=["model"],
        )
        durations = HistogramMetricFamily(
            "radq_job_duration_seconds", "Finished jobs: finished_at - created_at"
        )
        default_queue = self.state.settings.queue
        with self.state.sessions() as session:
            for status, n in session.execute(select(Instance.status, func.count()).group_by(Instance.status)):
                instances.add_metric([status], n)
            for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                jobs.add_metric([status], n)
            # Every queue a job uses reads 0 when empty, so a dashboard's series has no gaps.
            used = session.scalars(select(Job.queue).where(Job.queue.is_not(None)).distinct()).all()
            depth: Tally[str] = Tally(dict.fromkeys([default_queue, *(q for q in used if q)], 0))
            rows = session.execute(
                select(Job.queue, func.count())
                .join(Instance, Instance.job_id == Job.id)
                .where(Instance.status == InstanceStatus.QUEUED)
                .group_by(Job.queue)
            )
            for queue, n in rows:
                depth[queue or default_queue] += n
            for model, n in session.execute(select(Result.model, func.count()).group_by(Result.model)):
                processed.add_metric([model], n)
            failed_by_job = dict(
                session.execute(
                    select(Instance.job_id, func.count())
                    .where(Instance.status == InstanceStatus.FAILED)
                    .group_by(Instance.job_id)
                ).all()
            )
            per_model: Tally[str] = Tally()
            if failed_by_job:
                # Job.models is JSON (no GROUP BY on PostgreSQL's json): summed here.
                for job_id, models in session.execute(
                    select(Job.id, Job.models).where(Job.id.in_(list(failed_by_job)))
                ):
                    for model in models or ["unknown"]:
                        per_model[model] += failed_by_job[job_id]
            finished = session.execute(
                select(Job.created_at, Job.finished_at).where(
                    Job.finished_at.is_not(None), Job.status.in_([JobStatus.DONE, JobStatus.CANCELLED])
                )
            ).all()
        for queue, n in sorted(depth.items()):
            queued.add_metric([queue], n)
        for model, n in sorted(per_model.items()):
            failed.add_metric([model], n)
        seconds = [(end - start).total_seconds() for start, end in finished if end is not None]
        buckets = [(_le(b), sum(1 for s in seconds if s <= b)) for b in JOB_DURATION_BUCKETS]
        durations.add_metric([], [*buckets, ("+Inf", len(seconds))], sum_value=sum(seconds))
        yield from (instances, jobs, queued, processed, failed, durations)


def _le(bound: float) -> str:
    return str(float(bound))


class BrokerCollector(Collector):
    """Messages waiting in Redis per queue and priority step, delivered-but-unacked, live workers."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._client = redis.Redis.from_url(
            state.settings.broker_url, socket_timeout=3, socket_connect_timeout=3
        )

    def _queues(self) -> list[str]:
        with self.state.sessions() as session:
            named = session.scalars(select(Job.queue).where(Job.queue.is_not(None)).distinct()).all()
        return sorted({self.state.settings.queue, *(q for q in named if q)})

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("radq_broker_up", "1 when the API could read the broker at this scrape")
        waiting = GaugeMetricFamily(
            "radq_broker_messages",
            "Messages waiting in Redis, by queue and kombu priority step (0 first)",
            labels=["queue", "priority"],
        )
        unacked = GaugeMetricFamily(
            "radq_broker_unacked", "Messages delivered to a worker and not yet acknowledged", labels=["queue"]
        )
        workers = GaugeMetricFamily("radq_workers", "Workers whose heartbeat is live in Redis")
        queues = self._queues()
        try:
            pipe = self._client.pipeline(transaction=False)
            for queue in queues:
                for key in redis_queue_keys(queue):
                    pipe.llen(key)
            lengths = pipe.execute()
            routed: Tally[str] = Tally()
            for raw in self._client.hvals(UNACKED):
                try:
                    routed[str(json.loads(raw)[2])] += 1
                except (ValueError, IndexError, TypeError):
                    continue
            live = len(live_workers(self._client))
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: the broker is unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        steps = len(KOMBU_PRIORITY_STEPS)
        for i, queue in enumerate(queues):
            for step, n in zip(KOMBU_PRIORITY_STEPS, lengths[i * steps : (i + 1) * steps], strict=True):
                waiting.add_metric([queue, str(step)], n)
            unacked.add_metric([queue], routed.get(queue, 0))
        workers.add_metric([], live)
        yield from (up, waiting, unacked, workers)


class DiskCollector(Collector):
    """The upload spool's free space and the reserve uploads leave (``RADQ_MIN_FREE_BYTES``),
    to alert on before uploads are refused with 507."""

    def __init__(self, state: AppState) -> None:
        self.reserve = state.reserve

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "radq_upload_disk_free_bytes", "Free bytes on the disk this API spools uploads to"
        )
        kept = GaugeMetricFamily(
            "radq_upload_disk_reserve_bytes", "Bytes uploads leave free on that disk (RADQ_MIN_FREE_BYTES)"
        )
        try:
            free.add_metric([], self.reserve.free())
        except OSError as exc:
            log.warning("metrics: the upload disk cannot be read: %s", exc)
        else:
            yield free
        kept.add_metric([], self.reserve.min_free)
        yield kept


class Metrics:
    def __init__(self, state: AppState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "radq_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "radq_http_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.registry.register(DatabaseCollector(state))
        self.registry.register(BrokerCollector(state))
        self.registry.register(DiskCollector(state))
