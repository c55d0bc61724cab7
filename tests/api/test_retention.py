"""The retention sweep: which uploaded files leave the blob store, and when.

The database is shared by this module's tests, each with a blob store of its own, so
assertions name the files of the test, not counts.

Jobs are recorded and finished with the functions API and workers use (claim, finish,
close), in a database of each kind of the test's own; the sweep is the one the API's
maintenance loop runs. The end-to-end run (real API and worker, file store and S3) is in
tests/integration/test_blob_stores.py.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from api.retention import BlobSweeper
from api.state import AppState
from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance, Job, utcnow
from db.session import transaction
from db.status import InstanceStatus
from db.work import ResultRow, claim, close_finished_jobs, finish, write_results
from radq.blobs.file import FileBlobStore
from radq.settings import Settings
from tests.apiserver import serve
from tests.conftest import SAMPLES, make_settings

MR = SAMPLES / "real" / "MR_small.dcm"


@pytest.fixture
def settings(own_database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    settings = make_settings(tmp_path, own_database_url, redis_url, blob_retention_days=0.0)
    yield settings
    redis.Redis.from_url(redis_url).delete(settings.queue)


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    state = AppState.build(settings)
    yield state
    state.engine.dispose()


def _store(state: AppState) -> FileBlobStore:
    assert isinstance(state.blobs, FileBlobStore)
    return state.blobs


def _upload(state: AppState, content: bytes) -> str:
    return state.blobs.put(io.BytesIO(content))[0]


def _job(state: AppState, files: list[NewInstance], outcome: str | None = InstanceStatus.DONE) -> str:
    """A job of ``files``; with an ``outcome``, processed to it and closed as workers do."""
    with transaction(state.sessions) as session:
        job_id = create_job(session, models=["radq-smoke"]).id
        ids = add_instances(session, job_id=job_id, files=files)
    if outcome is not None:
        _finish(state, job_id, ids, outcome)
    return job_id


def _finish(state: AppState, job_id: str, ids: list[int], outcome: str) -> None:
    with transaction(state.sessions) as session:
        claim(session, job_id, ids, lease_seconds=60)
        finish(session, [(i, outcome, "not a DICOM file" if outcome == "failed" else None) for i in ids])
        close_finished_jobs(session, [job_id])


def _storage(state: AppState, job_id: str) -> list[str]:
    with state.sessions() as session:
        return list(session.scalars(select(Instance.storage).where(Instance.job_id == job_id)))


def test_retention_zero_deletes_finished_uploads_but_never_maps_or_paths(
    state: AppState, tmp_path: Path
) -> None:
    sha = _upload(state, MR.read_bytes())
    path_file = tmp_path / "archive" / "kept.dcm"
    path_file.write_bytes(MR.read_bytes())
    job_id = _job(
        state, [NewInstance("mr.dcm", "blob", sha), NewInstance("kept.dcm", "path", str(path_file))]
    )
    png = _upload(state, b"\x89PNG a saliency map")
    with transaction(state.sessions) as session:
        (instance_id,) = session.scalars(
            select(Instance.id).where(Instance.job_id == job_id, Instance.storage == "blob")
        )
        row = ResultRow(instance_id, "radq-smoke", "1.0.0", "w", "0", "{}", "fp32", {"a": 0.5}, {"a": png})
        write_results(session, [row])

    BlobSweeper(state).run_once()

    assert not _store(state).path_for(sha).exists(), "the upload is gone"
    assert _store(state).path_for(png).is_file(), "saliency maps are never deleted"
    assert path_file.is_file(), "path submissions are never deleted"
    assert sorted(_storage(state, job_id)) == ["deleted", "path"]


def test_a_blob_shared_with_an_unfinished_job_stays_until_that_job_ends(state: AppState) -> None:
    sha = _upload(state, b"shared upload " + os.urandom(8))
    done = _job(state, [NewInstance("a.dcm", "blob", sha)])
    running = _job(state, [NewInstance("b.dcm", "blob", sha)], outcome=None)
    sweeper = BlobSweeper(state)

    sweeper.run_once()
    assert _store(state).path_for(sha).is_file(), "the running job still needs it"
    assert _storage(state, done) == ["blob"]

    with state.sessions() as session:
        ids = list(session.scalars(select(Instance.id).where(Instance.job_id == running)))
    _finish(state, running, ids, InstanceStatus.DONE)
    sweeper.run_once()
    assert not _store(state).path_for(sha).exists(), "looked at again once the last job ended"
    assert _storage(state, done) == _storage(state, running) == ["deleted"]


def test_retention_days_keep_uploads_that_long(state: AppState) -> None:
    state.settings.blob_retention_days = 1.0
    recent, old = _upload(state, b"recent " + os.urandom(8)), _upload(state, b"old " + os.urandom(8))
    _job(state, [NewInstance("recent.dcm", "blob", recent)])
    old_job = _job(state, [NewInstance("old.dcm", "blob", old)])
    with transaction(state.sessions) as session:
        session.execute(update(Job).where(Job.id == old_job).values(finished_at=utcnow() - timedelta(days=2)))
    os.utime(_store(state).path_for(old), (time.time() - 3 * 86400,) * 2)  # stored before its job ended

    BlobSweeper(state).run_once()
    assert _store(state).path_for(recent).is_file(), "finished less than a day ago: kept"
    assert not _store(state).path_for(old).exists(), "finished two days ago: deleted"


def test_an_upload_stored_again_after_its_job_ended_is_kept(state: AppState) -> None:
    content = b"uploaded twice " + os.urandom(8)
    sha = _upload(state, content)
    job_id = _job(state, [NewInstance("first.dcm", "blob", sha)])
    time.sleep(0.05)
    assert _upload(state, content) == sha  # a second upload, not recorded yet
    BlobSweeper(state).run_once()
    assert _store(state).path_for(sha).is_file(), "the second upload's job will need it"
    assert _storage(state, job_id) == ["blob"]


def test_retry_after_the_upload_was_deleted_names_the_setting(state: AppState, settings: Settings) -> None:
    gone = _upload(state, b"not dicom " + os.urandom(8))
    path_file = settings.allowed_roots[0] / "fixed-later.dcm"
    path_file.write_bytes(b"")
    job_id = _job(
        state,
        [NewInstance("upload.bin", "blob", gone), NewInstance("fixed-later.dcm", "path", str(path_file))],
        outcome=InstanceStatus.FAILED,
    )
    BlobSweeper(state).run_once()
    assert not _store(state).path_for(gone).exists()

    with serve(settings) as http:
        retried = http.post(f"/v1/jobs/{job_id}/retry")
        assert retried.status_code == 202, retried.text  # the path-submitted file runs again
        instances = {i["file_name"]: i for i in http.get(f"/v1/jobs/{job_id}/instances").json()["items"]}
        again = http.post(f"/v1/jobs/{job_id}/retry")
    upload = instances["upload.bin"]
    assert upload["status"] == "failed"
    assert f"its uploaded file {gone} was deleted from the blob store" in upload["reason"]
    assert "RADQ_BLOB_RETENTION_DAYS=0" in upload["reason"]
    assert instances["fixed-later.dcm"]["status"] in ("pending", "queued")
    assert again.status_code == 409
    assert "were deleted from the blob store" in again.json()["detail"]
    assert "RADQ_BLOB_RETENTION_DAYS=0" in again.json()["detail"]
