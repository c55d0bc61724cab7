"""Priorities, cancel, retry and listing, with a real worker on both databases."""

from __future__ import annotations

import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta

from tests.conftest import SAMPLES, Stack
from tests.integration.test_scale import _generate
from tests.jobwait import wait_done


def _paths_job(stack: Stack, paths: list[str], **extra: object) -> dict[str, object]:
    response = stack.http.post("/v1/jobs", json={"paths": paths, **extra}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def test_urgent_job_overtakes_a_running_bulk_job(stack: Stack) -> None:
    root = stack.archive / f"bulk-{uuid.uuid4().hex[:6]}"
    _generate(root)  # 300 instances: about 19 chunks of 16
    bulk = _paths_job(stack, [str(root)])
    assert bulk["priority"] == "bulk"  # the default for path submissions
    deadline = time.monotonic() + 60
    while stack.client.job(str(bulk["id"]))["counts"]["done"] == 0:  # the worker is on the backlog
        assert time.monotonic() < deadline, "the bulk job never started"
        time.sleep(0.05)
    urgent_file = stack.archive / f"urgent-{uuid.uuid4().hex[:6]}.dcm"
    shutil.copy(SAMPLES / "real" / "CT_small.dcm", urgent_file)
    urgent = _paths_job(stack, [str(urgent_file)], priority="urgent")
    urgent = wait_done(stack.client, str(urgent["id"]), timeout=120)
    bulk_now = stack.client.job(str(bulk["id"]))
    assert urgent["counts"]["done"] == 1
    # The urgent study finished while most of the bulk backlog was still waiting.
    assert bulk_now["status"] == "running", bulk_now["counts"]
    assert bulk_now["counts"]["queued"] > bulk_now["counts"]["total"] // 2, bulk_now["counts"]
    wait_done(stack.client, str(bulk["id"]), timeout=600)


def test_cancel_drops_waiting_work_and_keeps_counts_true(stack: Stack) -> None:
    root = stack.archive / f"cancel-{uuid.uuid4().hex[:6]}"
    _generate(root)
    job = _paths_job(stack, [str(root)])
    time.sleep(0.5)
    response = stack.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # in-flight chunks finish, nothing else starts
        counts = stack.client.job(str(job["id"]))["counts"]
        if counts["processing"] == 0:
            break
        time.sleep(0.2)
    final = stack.client.job(str(job["id"]))
    counts = final["counts"]
    assert final["status"] == "cancelled"
    assert counts["pending"] == counts["queued"] == counts["processing"] == 0
    assert counts["done"] + counts["skipped"] == counts["total"] == 300
    assert counts["skipped"] > 0
    skipped = stack.client.instances(str(job["id"]), "skipped")
    assert all(i["reason"] == "job cancelled before this file was processed" for i in skipped)
    again = stack.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["detail"]


def test_retry_runs_failed_instances_again(stack: Stack) -> None:
    target = stack.archive / f"late-{uuid.uuid4().hex[:6]}.dcm"
    target.write_bytes(b"")  # empty: fails
    job = wait_done(stack.client, str(_paths_job(stack, [str(target)])["id"]))
    assert job["counts"]["failed"] == 1
    shutil.copy(SAMPLES / "real" / "MR_small.dcm", target)  # the file is fixed on storage
    response = stack.http.post(f"/v1/jobs/{job['id']}/retry")
    assert response.status_code == 202, response.text
    job = wait_done(stack.client, str(job["id"]))
    assert job["counts"]["done"] == 1 and job["counts"]["failed"] == 0
    (inst,) = stack.client.instances(str(job["id"]))
    assert inst["attempts"] == 2 and inst["reason"] is None
    nothing = stack.http.post(f"/v1/jobs/{job['id']}/retry")
    assert nothing.status_code == 409 and "no failed instances" in nothing.json()["detail"]


def test_list_jobs_with_filters_and_progress(stack: Stack) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    done = wait_done(stack.client, stack.client.upload([SAMPLES / "real" / "MR_small.dcm"])["id"])
    root = stack.archive / f"listed-{uuid.uuid4().hex[:6]}"
    (root / "empty").mkdir(parents=True)
    shutil.copy(SAMPLES / "real" / "CT_small.dcm", root / "ct.dcm")
    by_path = wait_done(
        stack.client, str(_paths_job(stack, [str(root / "ct.dcm"), str(root / "empty")])["id"])
    )
    listed = stack.http.get("/v1/jobs", params={"status": "done", "since": before.isoformat()})
    assert listed.status_code == 200
    items = {j["id"]: j for j in listed.json()["items"]}
    assert all(j["status"] == "done" for j in items.values())
    # The page reads all its jobs at once; each entry still says what the job's own view says.
    assert items[done["id"]] == stack.client.job(str(done["id"]))
    assert items[by_path["id"]] == stack.client.job(str(by_path["id"]))
    assert items[by_path["id"]]["registration"]["errors"] == [f"{root / 'empty'}: no files found"]
    assert done["progress"]["finished"] == 1 and done["progress"]["eta_seconds"] == 0.0
    assert done["studies"][0]["done"] == 1
    assert stack.http.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    bad = stack.http.post("/v1/jobs", json={"paths": ["/x"], "priority": "asap"})
    assert bad.status_code == 400 and "priority" in bad.json()["detail"]
