"""``radq worker-health``: the compose healthcheck of a worker, against a real worker's heartbeat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from radq.heartbeat import live_workers
from radq.services import spawn, stop
from tests.conftest import Stack, make_settings


def _health(stack: Stack, hostname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radq.cli", "worker-health", "--hostname", hostname],
        env={**os.environ, **stack.settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_health_sees_the_running_worker_and_not_a_missing_one(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.settings.broker_url)
    deadline = time.monotonic() + 60
    ours: list[str] = []
    while not ours and time.monotonic() < deadline:
        ours = [name for name in live_workers(client) if name.startswith("test-")]
        time.sleep(0.5)
    assert ours, "the stack's worker never announced itself in Redis"
    alive = _health(stack, ours[0])
    assert alive.returncode == 0, alive.stderr
    assert ours[0] in alive.stdout
    missing = _health(stack, "nobody@nowhere")
    assert missing.returncode == 1
    assert "no live heartbeat from worker nobody@nowhere" in missing.stderr


def test_worker_takes_its_concurrency_from_the_settings(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """RADQ_WORKER_CONCURRENCY sets the messages in hand; --concurrency still overrides it.
    The pool has a thread for each message the worker may hold while they are small."""
    settings = make_settings(tmp_path, database_url, redis_url)
    env = {**settings.to_env(), "RADQ_WORKER_CONCURRENCY": "3"}
    for args, expected in (([], 3), (["--concurrency", "5"], 5)):
        log_file = tmp_path / f"worker-{expected}.log"
        worker = spawn(["worker", "--hostname", f"conc-{uuid.uuid4().hex[:6]}@%h", *args],
                       env=env, log_file=log_file)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "ready." not in log_file.read_text(errors="replace"):
                assert worker.poll() is None, log_file.read_text(errors="replace")
                assert time.monotonic() < deadline, "the worker never became ready"
                time.sleep(0.2)
            text = log_file.read_text(errors="replace")
            assert re.search(rf"holding {expected} message\(s\) at once, up to 16 while they are small", text)
            assert re.search(r"concurrency:\s+16 \(thread\)", text)
        finally:
            stop(worker)
