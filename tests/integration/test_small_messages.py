"""One-file jobs share batches: a worker takes more messages while those in hand are small.

Real API and worker processes, real Redis and SQL. Ten one-file jobs wait in the queue
before the worker starts with ``--concurrency 1``; the worker's own metrics then tell how
many forward passes their ten images took.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.services import free_port, spawn, stop, wait_for_http
from tests.conftest import SAMPLES, make_settings
from tests.integration.test_observability import _wait_for_samples, scrape, value
from tests.jobwait import wait_done

JOBS = 10
FILES = ["CT_small.dcm", "CT5N_2062.dcm", "CT5N_2392.dcm", "MR_small.dcm", "CR2_6247.dcm"]


def _forward_passes(
    tmp_path: Path, database_url: str, redis_url: str, max_messages: int
) -> tuple[float, float]:
    """Images and forward passes of ten one-file jobs queued before a worker holding one
    message (and up to ``max_messages`` small ones) starts."""
    metrics_port = free_port()
    settings = make_settings(
        tmp_path, database_url, redis_url, worker_metrics_port=metrics_port, batch_size=16,
        worker_concurrency=1, worker_max_messages=max_messages,
    )  # fmt: skip
    folder = settings.allowed_roots[0] / "one-file-jobs"
    folder.mkdir(parents=True)
    paths = []
    for i in range(JOBS):
        name = FILES[i % len(FILES)]
        paths.append(folder / f"{i}-{name}")
        shutil.copy(SAMPLES / "real" / name, paths[-1])
    env = settings.to_env()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    api = spawn(["api", "--port", str(port)], env=env, log_file=tmp_path / "api.log")
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_for_http(f"{api_url}/healthz", api)
        token = issue_token(database_url, name=f"small-{uuid.uuid4().hex[:6]}", scope=Scope.ADMIN)
        client = Client(api_url, timeout=60, token=token)
        try:
            submitted = [client.submit_paths([str(path)]) for path in paths]
            queue = submitted[0]["queue"]
            waiting = (("queue", queue),)
            _wait_for_samples(  # every job registered and queued before the worker starts
                f"{api_url}/metrics", lambda s: s.get("radq_queue_instances", {}).get(waiting) == JOBS
            )
            worker = spawn(["worker", "--concurrency", "1", "--hostname", f"small-{uuid.uuid4().hex[:6]}@%h"],
                           env=env, log_file=tmp_path / "worker.log")  # fmt: skip
            for job in submitted:
                assert wait_done(client, str(job["id"]), timeout=180)["counts"]["done"] == 1
        finally:
            client.close()
        wait_for_http(f"http://127.0.0.1:{metrics_port}/metrics", worker)
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        images = value(samples, "radq_worker_batch_size_sum")
        passes = value(samples, "radq_worker_batch_size_count")
        print(f"max_messages={max_messages}: {images:.0f} images in {passes:.0f} forward passes")
        return images, passes
    finally:
        if worker is not None:
            stop(worker)
        stop(api)


def test_one_file_jobs_share_forward_passes_while_the_worker_takes_more_small_messages(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    # Held to one message at a time, every forward pass holds one job's one image.
    images, passes = _forward_passes(tmp_path / "one", database_url, redis_url, max_messages=1)
    assert (images, passes) == (JOBS, JOBS)
    # Taking another message for each small one in hand, the worker holds them all at once
    # and their images share forward passes.
    images, passes = _forward_passes(tmp_path / "more", database_url, redis_url, max_messages=16)
    assert images == JOBS
    assert passes <= JOBS / 2, f"{passes:.0f} forward passes for {JOBS} one-file jobs"

