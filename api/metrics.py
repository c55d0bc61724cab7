"""Prometheus metrics: request counters, plus job and instance counts read from SQL at scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.state import AppState
from db.models import Instance, Job


class DatabaseCollector(Collector):
    """Counts from the source of truth, so every API replica reports the same numbers."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        instances = GaugeMetricFamily("radq_instances", "Instances by status", labels=["status"])
        jobs = GaugeMetricFamily("radq_jobs", "Jobs by status", labels=["status"])
        with self.state.sessions() as session:
            for status, n in session.execute(select(Instance.status, func.count()).group_by(Instance.status)):
                instances.add_metric([status], n)
            for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
                jobs.add_metric([status], n)
        yield instances
        yield jobs


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
