"""Waiting on a job through the real API."""

from __future__ import annotations

import time
from typing import Any

from radq.client import Client


def wait_done(client: Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if job["status"] in ("done", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not done after {timeout}s: {job}")
        time.sleep(0.25)
