"""Path submissions are enumerated in the background: real HTTP, Redis and both databases.

No worker runs here, so what the API queued stays in Redis where the tests read it.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from bench.tree import REAL_CT, make_tree
from db.models import Instance
from db.session import make_engine
from radq.model_card import cards_in
from radq.queue import redis_queue_keys
from radq.routing import all_queues, model_queue
from radq.services import free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from tests.apiserver import bearer, serve
from tests.archives import damaged_zip
from tests.conftest import make_settings


def queued_instance_ids(broker_url: str, queue: str, job_id: str | None = None) -> list[int]:
    """Instance ids carried by every message waiting in ``queue`` (all priority lists).

    With ``job_id``, only that job's messages: the database is shared with other tests'
    API processes, whose maintenance loops may publish stray instances of their own.
    """
    client = redis.Redis.from_url(broker_url)
    ids: list[int] = []
    for key in redis_queue_keys(queue):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            if job_id is None or args[0] == job_id:
                ids.extend(args[1])
    return ids


def drop_queue(broker_url: str, queue: str) -> None:
    client = redis.Redis.from_url(broker_url)
    client.delete(*redis_queue_keys(queue))


def wait_registered(http: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        # Both: on SQLite each SELECT of one GET may see a different commit.
        if job["registration"]["status"] != "registering" and job["status"] != "registering":
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"registration of {job_id} not finished after {timeout}s: {job}")
        time.sleep(0.1)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[Settings]:
    settings = make_settings(tmp_path, database_url, redis_url)
    yield settings
    for queue in all_queues(settings, cards_in(settings.model_dir)):
        drop_queue(redis_url, queue)


def test_large_tree_is_registered_and_queued_in_the_background(settings: Settings) -> None:
    root = make_tree(settings.allowed_roots[0] / "archive-a", 2500)
    (root / ".DS_Store").write_bytes(b"clutter")  # hidden: never an instance
    with serve(settings) as http:
        response = http.post("/v1/jobs", json={"paths": [str(root)]})
        assert response.status_code == 202, response.text
        first = response.json()
        assert first["status"] == "registering" and first["priority"] == "bulk"
        assert first["registration"]["status"] == "registering"
        job = wait_registered(http, first["id"])
    assert job["status"] == "queued"
    assert job["registration"]["files_seen"] == job["registration"]["registered"] == 2500
    assert job["registration"]["errors"] == []
    counts = job["counts"]
    assert counts["total"] == counts["queued"] == 2500 and counts["pending"] == 0
    assert job["queue"] == model_queue(settings, "radq-smoke")  # the one model it names
    carried = queued_instance_ids(settings.broker_url, job["queue"], first["id"])
    assert len(carried) == len(set(carried)) == 2500  # every instance in exactly one message


def messages_of(broker_url: str, queue: str, job_id: str) -> list[list[int]]:
    client = redis.Redis.from_url(broker_url)
    chunks = []
    for key in redis_queue_keys(queue):
        for raw in client.lrange(key, 0, -1):
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            if args[0] == job_id:
                chunks.append(args[1])
    return chunks


def test_a_list_of_single_files_is_published_in_full_chunks(settings: Settings) -> None:
    """Workers batch what a message brings: 100 file paths must not become 100 messages."""
    root = make_tree(settings.allowed_roots[0] / "listed", 100)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    with serve(settings) as http:
        response = http.post("/v1/jobs", json={"paths": files})
        assert response.status_code == 202, response.text
        job = wait_registered(http, response.json()["id"])
    assert job["counts"]["queued"] == 100
    sizes = sorted(len(chunk) for chunk in messages_of(settings.broker_url, job["queue"], job["id"]))
    assert sizes == [4] + [settings.chunk_size] * 6  # 100 = 6 x 16 + 4


def test_listed_files_register_in_bulk_beside_folders_archives_and_refusals(
    settings: Settings, tmp_path: Path
) -> None:
    """A list of many file paths (as an archive index gives them) registers every one,
    mixed with a folder (holding a link out of the roots) and a zip, each with its own outcome."""
    listed = make_tree(settings.allowed_roots[0] / "listed-many", 2500)
    files = sorted(str(p) for p in listed.rglob("*") if p.is_file())
    folder = make_tree(settings.allowed_roots[0] / "folder", 30)
    archive = settings.allowed_roots[0] / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(REAL_CT, "a.dcm")
        zf.write(REAL_CT, "b.dcm")
    outside = tmp_path / "outside.dcm"
    shutil.copy(REAL_CT, outside)
    escape = folder / "escape.dcm"  # listed directly, the submission itself would refuse it (403)
    escape.symlink_to(outside)
    paths = [*files[:1000], str(folder), *files[1000:], str(archive)]
    with serve(settings) as http:
        response = http.post("/v1/jobs", json={"paths": paths})
        assert response.status_code == 202, response.text
        job = wait_registered(http, response.json()["id"])
        failed = http.get(f"/v1/jobs/{job['id']}/instances", params={"status": "failed"}).json()["items"]
    assert job["status"] == "running"  # one instance is final already: the refused link
    assert job["registration"]["status"] == "done"
    assert job["registration"]["registered"] == 2500 + 30 + 2 + 1
    assert job["registration"]["errors"] == []
    assert job["counts"]["total"] == 2533 and job["counts"]["queued"] == 2532
    assert [f["file_name"] for f in failed] == [str(escape)]
    assert "outside the allowed roots" in failed[0]["reason"]
    carried = queued_instance_ids(settings.broker_url, job["queue"], job["id"])
    assert len(carried) == len(set(carried)) == 2532  # every waiting instance in exactly one message


def test_cancel_while_listed_files_register_leaves_nothing_waiting(settings: Settings) -> None:
    root = make_tree(settings.allowed_roots[0] / "listed-cancel", 20_000)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    with serve(settings) as http:
        job_id = http.post("/v1/jobs", json={"paths": files}).json()["id"]
        cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        job = wait_registered(http, job_id)
    assert job["status"] == "cancelled"
    assert job["registration"]["status"] == "cancelled"
    assert job["registration"]["errors"] == []  # not one line per listed file
    counts = job["counts"]
    assert counts["pending"] == counts["queued"] == counts["processing"] == 0
    assert counts["skipped"] == counts["total"] < 20_000


def test_files_the_walk_cannot_take_are_recorded_with_their_reason(
    settings: Settings, tmp_path: Path
) -> None:
    root = settings.allowed_roots[0] / "mixed"
    root.mkdir()
    shutil.copy(REAL_CT, root / "a.dcm")
    outside = tmp_path / "outside.dcm"
    shutil.copy(REAL_CT, outside)
    (root / "escape.dcm").symlink_to(outside)
    (root / "loop").symlink_to(root)  # a symlinked folder is not followed
    empty = settings.allowed_roots[0] / "empty"
    empty.mkdir()
    with serve(settings) as http:
        job_id = http.post("/v1/jobs", json={"paths": [str(root), str(empty)]}).json()["id"]
        job = wait_registered(http, job_id)
        failed = http.get(f"/v1/jobs/{job_id}/instances", params={"status": "failed"}).json()["items"]
    assert job["counts"]["total"] == 2 and job["counts"]["queued"] == 1
    assert [f["file_name"] for f in failed] == [str(root / "escape.dcm")]
    assert "outside the allowed roots" in failed[0]["reason"] and str(outside) in failed[0]["reason"]
    assert job["registration"]["errors"] == [f"{empty}: no files found"]


def test_a_damaged_archive_is_refused_with_its_reason_and_none_of_its_members_kept(
    settings: Settings,
) -> None:
    archive = settings.allowed_roots[0] / "scans.zip"
    archive.write_bytes(damaged_zip(REAL_CT.read_bytes(), REAL_CT.read_bytes()[::-1]))
    with serve(settings) as http:
        job_id = http.post("/v1/jobs", json={"paths": [str(archive)]}).json()["id"]
        job = wait_registered(http, job_id)
        failed = http.get(f"/v1/jobs/{job_id}/instances", params={"status": "failed"}).json()["items"]
    assert job["counts"]["total"] == 1 and [f["file_name"] for f in failed] == [str(archive)]
    reason = failed[0]["reason"]
    assert reason.startswith(f"{archive}: not a readable zip archive") and "damaged.dcm" in reason, reason
    blobs = settings.resolved_blob_dir
    assert not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()], "good.dcm is not kept"


def test_cancel_during_registration_stops_it_and_leaves_nothing_waiting(settings: Settings) -> None:
    root = make_tree(settings.allowed_roots[0] / "archive-c", 20_000)
    with serve(settings) as http:
        job_id = http.post("/v1/jobs", json={"paths": [str(root)]}).json()["id"]
        cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        job = wait_registered(http, job_id)
    assert job["status"] == "cancelled"
    assert job["registration"]["status"] == "cancelled"
    assert job["registration"]["files_seen"] < 20_000
    counts = job["counts"]
    assert counts["pending"] == counts["queued"] == counts["processing"] == 0
    assert counts["skipped"] == counts["total"]


def test_registration_resumes_after_the_api_is_killed(settings: Settings, database_url: str) -> None:
    settings = settings.model_copy(update={"registration_lease_seconds": 3, "maintenance_seconds": 0.5,
                                           "requeue_after_seconds": 1.0})  # fmt: skip
    root = make_tree(settings.allowed_roots[0] / "archive-k", 30_000)
    env = settings.to_env()

    def start_api() -> tuple[Any, str]:
        port = free_port()
        process = spawn(["api", "--port", str(port)], env=env, log_file=settings.home / f"api-{port}.log")
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        return process, f"http://127.0.0.1:{port}"

    auth = bearer(database_url)
    first, url = start_api()
    try:
        job_id = httpx.post(f"{url}/v1/jobs", json={"paths": [str(root)]}, headers=auth).json()["id"]
        deadline = time.monotonic() + 60
        job_url = f"{url}/v1/jobs/{job_id}"
        while (seen := httpx.get(job_url, headers=auth).json()["registration"]["files_seen"]) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert seen < 30_000
        first.send_signal(signal.SIGKILL)  # mid-walk: no chance to release its lease
        first.wait(10)
    finally:
        stop(first)
    second, url = start_api()
    try:
        with httpx.Client(base_url=url, timeout=30, headers=auth) as http:
            job = wait_registered(http, job_id, timeout=180)
            deadline = time.monotonic() + 30
            while job["counts"]["pending"] and time.monotonic() < deadline:
                time.sleep(0.5)  # a batch recorded but not yet published is re-published
                job = http.get(f"/v1/jobs/{job_id}").json()
    finally:
        stop(second)
    assert job["registration"]["status"] == "done"
    assert job["counts"]["total"] == job["counts"]["queued"] == 30_000
    engine = make_engine(database_url)
    with engine.connect() as conn:
        distinct = conn.scalar(
            select(func.count(func.distinct(Instance.location))).where(Instance.job_id == job_id)
        )
    engine.dispose()
    assert distinct == 30_000  # no file registered twice
    carried = set(queued_instance_ids(settings.broker_url, model_queue(settings, "radq-smoke"), job_id))
    assert len(carried) == 30_000  # every instance is in some message (a re-published one may repeat)
