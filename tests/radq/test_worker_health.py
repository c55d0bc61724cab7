"""``radq worker-health``: the compose healthcheck of a worker, against a real worker's heartbeat."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import redis

from radq.heartbeat import live_workers
from tests.conftest import Stack


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
