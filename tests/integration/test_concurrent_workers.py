"""Several worker processes writing at once: every instance once, no lock errors."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from db.models import Instance, Result
from radq.services import spawn, stop
from tests.conftest import Stack
from tests.integration.test_scale import _generate
from tests.jobwait import wait_done


def test_three_worker_processes_share_a_job(stack: Stack) -> None:
    extra = spawn(
        ["worker", "--concurrency", "2", "--hostname", f"extra-{uuid.uuid4().hex[:6]}@%h"],
        env=stack.settings.to_env(),
        log_file=stack.settings.home / "extra-worker.log",
    )
    try:
        root = stack.archive / f"concurrent-{uuid.uuid4().hex[:6]}"
        expected = _generate(root)
        response = stack.http.post("/v1/jobs", json={"paths": [str(root)]}, timeout=60)
        assert response.status_code == 202, response.text
        job = wait_done(stack.client, response.json()["id"], timeout=600)
        total = sum(expected.values())
        assert job["counts"]["done"] == total and job["counts"]["failed"] == 0
        with stack.sessions() as session:
            rows = session.execute(
                select(Result.instance_id, func.count())
                .join(Instance)
                .where(Instance.job_id == job["id"])
                .group_by(Result.instance_id)
            ).all()
        assert len(rows) == total and all(n == 1 for _, n in rows)
        assert extra.poll() is None and stack.worker.poll() is None
    finally:
        stop(extra)
