"""Observability end to end: real API and worker processes, real Redis and SQL, real scrapes.

One scenario per database: a job is submitted while no worker runs (the queue depth must
show it, from SQL and from Redis), then a worker with JSON logs and a metrics port
processes it. The tests read what an operator would read: ``/metrics`` of the API and of
the worker, the worker's log file, and the Grafana dashboard shipped in the repo.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from db.migrate import upgrade
from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.services import free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from tests.conftest import REPO, SAMPLES, PostgresServer, make_settings
from tests.jobwait import wait_done

DASHBOARD = REPO / "deploy" / "grafana" / "radq-dashboard.json"
GOOD = ["CT_small.dcm", "CT5N_2062.dcm", "CT5N_2392.dcm", "CR2_6247.dcm"]
BROKEN = ["zero_bytes.dcm", "random_bytes.bin"]

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
"""Sample name -> sorted labels -> value."""


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``; fails when there is none."""
    found = [v for key, v in samples.get(name, {}).items() if set(labels.items()) <= set(key)]
    assert found, f"no sample {name}{labels}; samples of it: {samples.get(name)}"
    return sum(found)


@dataclass
class Observed:
    settings: Settings
    job_id: str
    job: dict[str, Any]
    queue: str
    hostname: str
    before: Samples
    """The API's metrics while the job waited and no worker ran."""
    api: Samples
    worker: Samples
    worker_log: list[str]
    api_log: list[str]
    workers_after_stop: float
    """``radq_workers`` once the worker stopped, minus its value before it started (other
    tests' workers may share the Redis database)."""


def _wait_for_samples(url: str, ready: Any, timeout: float = 60) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def own_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database of this module's alone: the API's figures are database-wide."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('obs-sqlite') / 'radq.db'}"
        upgrade(url)
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    upgrade(url)
    yield url
    server.drop_database(url)


@pytest.fixture(scope="module")
def observed(
    own_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observed]:
    database_url = own_database_url
    home = tmp_path_factory.mktemp("obs")
    metrics_port = free_port()
    settings = make_settings(
        home, database_url, redis_url, log_format="json", worker_metrics_port=metrics_port, chunk_size=4
    )
    folder = settings.allowed_roots[0] / "obs"
    folder.mkdir(parents=True)
    for name in GOOD:
        shutil.copy(SAMPLES / "real" / name, folder / name)
    for name in BROKEN:
        shutil.copy(SAMPLES / "broken" / name, folder / name)
    env = settings.to_env()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    api = spawn(["api", "--port", str(port)], env=env, log_file=home / "api.log")
    worker: subprocess.Popen[bytes] | None = None
    hostname = f"obs-{uuid.uuid4().hex[:6]}@localhost"
    try:
        wait_for_http(f"{api_url}/healthz", api)
        token = issue_token(database_url, name=f"obs-{uuid.uuid4().hex[:6]}", scope=Scope.ADMIN)
        client = Client(api_url, timeout=60, token=token)
        submitted = client.submit_paths([str(folder)])
        job_id = str(submitted["id"])
        # The job's queue, chosen by routing (one model: <prefix>model.radq-smoke).
        queue = submitted["queue"]
        total = len(GOOD) + len(BROKEN)
        before = _wait_for_samples(
            f"{api_url}/metrics",
            lambda s: s.get("radq_queue_instances", {}).get((("queue", queue),)) == total,
        )
        worker = spawn(
            ["worker", "--concurrency", "2", "--hostname", hostname], env=env, log_file=home / "worker.log"
        )
        try:
            job = wait_done(client, job_id, timeout=180)
        finally:
            client.close()
        wait_for_http(f"http://127.0.0.1:{metrics_port}/metrics", worker)
        api_samples = scrape(f"{api_url}/metrics")
        worker_samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        stop(worker)
        after_stop = _wait_for_samples(
            f"{api_url}/metrics", lambda s: value(s, "radq_workers") == value(before, "radq_workers"), 30
        )
        log_lines = (home / "worker.log").read_text().splitlines()
        yield Observed(
            settings, job_id, job, queue, hostname, before, api_samples, worker_samples, log_lines,
            (home / "api.log").read_text().splitlines(),
            value(after_stop, "radq_workers") - value(before, "radq_workers"),
        )  # fmt: skip
    finally:
        if worker is not None:
            stop(worker)
        stop(api)


# --- queue depth before any worker ---------------------------------------------------------


def test_queue_depth_shows_the_waiting_job_from_sql_and_redis(observed: Observed) -> None:
    queue = observed.queue
    total = len(GOOD) + len(BROKEN)
    assert value(observed.before, "radq_queue_instances", queue=queue) == total
    # chunk_size 4: six instances travel in two messages, at the job's priority step.
    assert value(observed.before, "radq_broker_messages", queue=queue) == 2
    assert value(observed.before, "radq_broker_unacked", queue=queue) == 0
    assert value(observed.before, "radq_broker_up") == 1


# --- after the worker processed the job ----------------------------------------------------


def test_api_metrics_count_the_job_per_model(observed: Observed) -> None:
    counts = observed.job["counts"]
    assert counts["done"] == len(GOOD) and counts["failed"] == len(BROKEN), counts
    api = observed.api
    assert value(api, "radq_model_instances_processed_total", model="radq-smoke") == len(GOOD)
    assert value(api, "radq_model_instances_failed", model="radq-smoke") == len(BROKEN)
    assert value(api, "radq_job_duration_seconds_count") == 1
    assert value(api, "radq_job_duration_seconds_bucket", le="+Inf") == 1
    assert value(api, "radq_job_duration_seconds_sum") > 0
    assert value(api, "radq_queue_instances", queue=observed.queue) == 0
    assert value(api, "radq_broker_messages", queue=observed.queue) == 0
    assert value(api, "radq_instances", status="done") == len(GOOD)
    assert value(api, "radq_workers") == value(observed.before, "radq_workers") + 1, "the worker's heartbeat"
    assert observed.workers_after_stop == 0, "a stopped worker no longer counts"


def test_worker_serves_its_own_metrics(observed: Observed) -> None:
    worker = observed.worker
    info = list(worker["radq_worker_info"])
    assert len(info) == 1 and dict(info[0])["hostname"] == observed.hostname, info
    assert dict(info[0])["device"] == "cpu" and observed.queue in dict(info[0])["queues"].split(",")
    assert value(worker, "radq_worker_instances_processed_total", model="radq-smoke") == len(GOOD)
    assert value(worker, "radq_worker_instances_failed_total", model="radq-smoke") == len(BROKEN)
    assert value(worker, "radq_worker_batch_size_sum", model="radq-smoke") == len(GOOD)
    batches = value(worker, "radq_worker_batch_size_count", model="radq-smoke")
    assert 1 <= batches <= len(GOOD)
    assert value(worker, "radq_worker_infer_seconds_count", model="radq-smoke") == batches
    assert value(worker, "radq_worker_preprocess_seconds_count", model="radq-smoke") == batches
    assert value(worker, "radq_worker_infer_seconds_sum", model="radq-smoke") > 0
    # Every file went through a decode process, the broken ones too.
    assert value(worker, "radq_worker_decode_seconds_count") == len(GOOD) + len(BROKEN)
    assert value(worker, "radq_worker_write_seconds_count") >= 1


def test_worker_json_log_is_one_object_per_line_with_the_job_id(observed: Observed) -> None:
    lines = [line for line in observed.worker_log if line.strip()]
    assert lines, "the worker wrote no log"
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"worker.log line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert record.get("worker") == observed.hostname, f"line {number} does not name the worker: {line}"
        records.append(record)
    about_job = [r for r in records if observed.job_id in r["message"]]
    assert about_job, "no log line mentions the job"
    for record in about_job:
        assert record.get("job_id") == observed.job_id, record
    # Each broken file is logged by the inference thread with its instance id and job id.
    failed = [r for r in records if r.get("instance_id") is not None and " failed: " in r["message"]]
    assert len(failed) == len(BROKEN), failed
    assert all(r["job_id"] == observed.job_id for r in failed), failed


def test_api_json_log_is_one_object_per_line(observed: Observed) -> None:
    lines = [line for line in observed.api_log if line.strip()]
    assert any("uvicorn" in json.loads(line)["logger"] for line in lines), "uvicorn's lines are missing"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(json.loads(line)), line


# --- the dashboard -------------------------------------------------------------------------


def _dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\bradq_[a-z0-9_]+", expr)}


def test_dashboard_queries_only_exported_metrics(observed: Observed) -> None:
    exported = set(observed.api) | set(observed.worker)
    used = _dashboard_metric_names()
    assert used, "the dashboard queries no radq metric"
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"
    # And it shows both sides: the API's cluster view and the workers' own figures.
    assert any(n.startswith("radq_worker_") for n in used) and "radq_queue_instances" in used
