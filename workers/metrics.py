"""Prometheus metrics of one worker process, served on ``RADQ_WORKER_METRICS_PORT``.

The stages report figures they measure anyway (the decode process times its work and
returns the time with the result; the inference thread's :class:`workers.batching.StageTimes`
timings; the writer's transaction), so nothing is timed twice. Every worker process has
its own registry and its own port; the API's ``/metrics`` holds the cluster-wide figures
read from SQL and Redis.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
"""Stage latencies from a millisecond (a small CT slice on a GPU) to a decode timeout."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Batch sizes up to ``RADQ_BATCH_SIZE``'s largest value."""


class WorkerMetrics:
    """The metrics one worker process exports; safe to update from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("radq_worker", "This worker process: Celery hostname, device, queues", registry=r)
        self.batch_size = Histogram(
            "radq_worker_batch_size", "Images per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_seconds = Histogram(
            "radq_worker_decode_seconds",
            "Reading, checking and decoding one instance in a decode process",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "radq_worker_preprocess_seconds",
            "Device preprocessing of one batch (rescale, window, resize, normalise)",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.infer_seconds = Histogram(
            "radq_worker_infer_seconds",
            "Forward pass of one batch, results copied back to the host (with Grad-CAM when asked)",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.write_seconds = Histogram(
            "radq_worker_write_seconds",
            "One writer transaction (metadata, results and statuses of many instances)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.processed = Counter(
            "radq_worker_instances_processed",
            "Instances this process inferred, per model",
            ["model"],
            registry=r,
        )
        self.failed = Counter(
            "radq_worker_instances_failed",
            "Instances this process failed, per model of their job (unreadable files count for each)",
            ["model"],
            registry=r,
        )

    def describe(self, *, hostname: str, device: str, queues: Iterable[str]) -> None:
        self.info.info({"hostname": hostname, "device": device, "queues": ",".join(queues)})

    def batch(self, model: str, size: int, preprocess_s: float, infer_s: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.preprocess_seconds.labels(model).observe(preprocess_s)
        self.infer_seconds.labels(model).observe(infer_s)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread of this process."""
        start_http_server(port, addr=addr, registry=self.registry)
