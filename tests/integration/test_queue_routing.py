"""Queue routing with real processes: a CPU worker runs CPU models through their queues,
never GPU-only work, hands back what reaches it by mistake, and reconcile re-publishes a
lost queue to the job's own queue."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.model_card import cards_in
from radq.queue import instance_ids_in_broker, make_celery, publish_chunks, redis_queue_keys
from radq.routing import all_queues, device_queue, model_queue
from radq.services import free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from tests.api.test_registration import queued_instance_ids
from tests.conftest import SAMPLES, make_settings
from tests.jobwait import wait_done
from tests.model_dirs import SMOKE, SMOKE_B, SMOKE_GPU, routing_model_dir

CT = sorted((SAMPLES / "real").glob("CT5N_*.dcm"))


def _settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    return make_settings(tmp_path, database_url, redis_url, model_dir=routing_model_dir(tmp_path / "models"))


@contextlib.contextmanager
def running(
    settings: Settings, worker_args: list[str], worker_env: dict[str, str] | None = None
) -> Iterator[tuple[Client, Path]]:
    """An API and one ``radq worker <worker_args>``; yields a client and the worker's log."""
    env = settings.to_env()
    port = free_port()
    api = spawn(["api", "--port", str(port)], env=env, log_file=settings.home / "api.log")
    log = settings.home / "worker.log"
    name = f"routing-{uuid.uuid4().hex[:6]}@%h"
    worker = spawn(
        ["worker", "--concurrency", "1", "--hostname", name, *worker_args],
        env={**env, **(worker_env or {})},
        log_file=log,
    )
    token = issue_token(settings.database_url, name=f"routing-{uuid.uuid4().hex[:6]}", scope=Scope.SUBMIT)
    client = Client(f"http://127.0.0.1:{port}", timeout=60, token=token)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
        yield client, log
    finally:
        client.close()
        stop(worker)
        stop(api)
        keys = [k for q in all_queues(settings, cards_in(settings.model_dir)) for k in redis_queue_keys(q)]
        redis.Redis.from_url(settings.broker_url).delete(*keys)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def taken_queues(log: Path) -> list[str]:
    """The queues the worker logged it takes."""
    wait_for(lambda: "taking queues" in log.read_text(errors="replace"), 60, "the worker to log its queues")
    line = next(line for line in log.read_text(errors="replace").splitlines() if "taking queues" in line)
    return line.split("taking queues ", 1)[1].strip().split(",")


def test_cpu_worker_runs_cpu_models_and_never_gpu_only_work(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = _settings(tmp_path, database_url, redis_url)
    broker, gpu_queue = settings.broker_url, model_queue(settings, SMOKE_GPU)
    with running(settings, ["--device", "cpu"]) as (client, log):
        assert taken_queues(log) == [
            settings.queue, device_queue(settings, "cpu"), model_queue(settings, SMOKE),
            model_queue(settings, SMOKE_B),
        ]  # fmt: skip
        gpu_job = client.upload(CT[:2], [SMOKE_GPU])
        cpu_job = client.upload(CT[2:], [SMOKE])
        assert gpu_job["queue"] == gpu_queue
        assert cpu_job["queue"] == model_queue(settings, SMOKE)
        done = wait_done(client, cpu_job["id"], timeout=240)
        assert done["counts"]["done"] == 3

        # The GPU-only job waits, its message in Redis under its model's queue.
        gpu_ids = sorted(i["id"] for i in client.instances(gpu_job["id"]))
        assert client.job(gpu_job["id"])["counts"]["queued"] == 2
        assert sorted(queued_instance_ids(broker, gpu_queue, gpu_job["id"])) == gpu_ids

        # A chunk of it reaching the CPU worker anyway (published by hand to the general
        # queue) is handed back to the job's queue, unclaimed, and acknowledged.
        publish_chunks(
            make_celery(settings),
            job_id=gpu_job["id"],
            instance_ids=gpu_ids,
            chunk_size=16,
            queue=settings.queue,
        )
        handed = "hands 2 waiting instance(s) back"
        wait_for(lambda: handed in log.read_text(errors="replace"), 120, "the chunk to be handed back")
        back = lambda: queued_instance_ids(broker, gpu_queue, gpu_job["id"])  # noqa: E731
        wait_for(lambda: len(back()) == 4, 30, "the chunk to be back in its queue")
        assert sorted(back()) == sorted(gpu_ids * 2)  # the original message and the handed-back one
        assert not instance_ids_in_broker(broker, [settings.queue]) & set(gpu_ids)  # acknowledged
        instances = client.instances(gpu_job["id"])
        assert {(i["status"], i["attempts"]) for i in instances} == {("queued", 0)}
        assert client.job(gpu_job["id"])["queue"] == gpu_queue  # already a GPU-only queue: kept

        # Redis loses the queue; reconcile publishes to the job's own queue again.
        redis.Redis.from_url(broker).delete(*redis_queue_keys(gpu_queue))
        reconciled = subprocess.run(
            [sys.executable, "-m", "radq.cli", "reconcile", "--grace", "0"],
            env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert reconciled.returncode == 0, reconciled.stderr
        assert "re-published 2 that no message carried" in reconciled.stdout
        assert sorted(queued_instance_ids(broker, gpu_queue, gpu_job["id"])) == gpu_ids
        assert queued_instance_ids(broker, settings.queue, gpu_job["id"]) == []
        assert client.job(gpu_job["id"])["counts"]["queued"] == 2


def test_worker_on_one_model_queue_runs_jobs_naming_that_model(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    settings = _settings(tmp_path, database_url, redis_url)
    only = model_queue(settings, SMOKE)
    with running(settings, ["--device", "cpu", "--queues", only]) as (client, log):
        assert taken_queues(log) == [only]
        general_job = client.upload(CT[:2], [SMOKE, SMOKE_B])
        assert general_job["queue"] == settings.queue
        job = client.upload(CT[2:], [SMOKE])
        done = wait_done(client, job["id"], timeout=240)
        assert done["counts"]["done"] == 3
        study = client.study_results(client.instances(job["id"], "done")[0]["study_instance_uid"])
        ran = {r["model"] for s in study["series"] for i in s["instances"] if i["job_id"] == job["id"]
               for r in i["results"]}  # fmt: skip
        assert ran == {SMOKE}
        # The general queue is not this worker's: the two-model job is still waiting.
        assert client.job(general_job["id"])["counts"]["queued"] == 2


def test_chunk_routed_by_another_model_dir_is_handed_back_and_the_job_rerouted(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    """The API's cards say radq-smoke-b runs anywhere, the worker's say GPU only."""
    settings = _settings(tmp_path, database_url, redis_url)
    worker_models = routing_model_dir(tmp_path / "worker-models")
    card = worker_models / SMOKE_B / "model.json"
    card.write_text(
        card.read_text().replace('"name": "radq-smoke-b"', '"name": "radq-smoke-b", "device": "gpu"')
    )
    gpu = device_queue(settings, "gpu")
    with running(settings, ["--device", "cpu"], {"RADQ_MODEL_DIR": str(worker_models)}) as (client, log):
        assert gpu not in taken_queues(log) and model_queue(settings, SMOKE_B) not in taken_queues(log)
        job = client.upload(CT[:2], [SMOKE, SMOKE_B])
        assert job["queue"] == settings.queue
        ids = sorted(i["id"] for i in client.instances(job["id"]))
        wait_for(lambda: client.job(job["id"])["queue"] == gpu, 120, "the job to be re-routed")
        wait_for(lambda: len(queued_instance_ids(settings.broker_url, gpu, job["id"])) == 2, 30, "hand-back")
        assert sorted(queued_instance_ids(settings.broker_url, gpu, job["id"])) == ids
        assert {(i["status"], i["attempts"]) for i in client.instances(job["id"])} == {("queued", 0)}
        assert (
            f"back to the queue {gpu} (the job is re-routed there from {settings.queue})" in log.read_text()
        )
