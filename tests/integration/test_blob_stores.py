"""Uploads through the real stack with each blob store, then their deletion after the job.

API and worker are real processes; for ``s3`` both reach moto's S3 server over HTTP with
the AWS_* variables only (no shared directory is used for uploads). Retention is 0, so
each job's uploads are deleted by the API's maintenance loop once the job is done, while
its results and Grad-CAM maps stay readable.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from db.models import Instance
from radq.blobs.file import FileBlobStore
from tests.conftest import SAMPLES, S3Server, Stack, make_settings, running_stack
from tests.jobwait import wait_done

pytestmark = pytest.mark.integration

CT = SAMPLES / "real" / "CT_small.dcm"
MR = SAMPLES / "real" / "MR_small.dcm"
BROKEN = SAMPLES / "broken" / "random_bytes.bin"


@dataclass
class BlobStack:
    stack: Stack
    kind: str
    s3: S3Server | None = None
    bucket: str | None = None

    def has_blob(self, sha: str) -> bool:
        if self.s3 is not None and self.bucket is not None:
            return f"uploads/{sha}" in self.s3.keys(self.bucket)
        return FileBlobStore(self.stack.settings.resolved_blob_dir).path_for(sha).is_file()


@pytest.fixture(scope="module", params=["file", "s3"])
def blob_stack(
    request: pytest.FixtureRequest,
    own_database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BlobStack]:
    home = tmp_path_factory.mktemp(f"radq-{request.param}")
    overrides: dict[str, Any] = {"blob_retention_days": 0.0, "maintenance_seconds": 0.5}
    s3: S3Server | None = None
    bucket = None
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        overrides["blob_url"] = f"s3://{bucket}/uploads"
    # Its own database: a sweep with retention 0 would mark other tests' finished uploads.
    settings = make_settings(home, own_database_url, redis_url, **overrides)
    with running_stack(settings, s3.env if s3 else None) as stack:
        yield BlobStack(stack, request.param, s3, bucket)


def _saliency_urls(results: dict[str, Any]) -> list[str]:
    return [
        url
        for series in results["series"]
        for instance in series["instances"]
        for result in instance["results"]
        for url in (result["saliency"] or {}).values()
    ]


def _uploads(stack: Stack, job_id: str) -> list[Instance]:
    with stack.sessions() as session:
        return list(session.scalars(select(Instance).where(Instance.job_id == job_id).order_by(Instance.id)))


def _wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.25)


def test_upload_runs_then_its_files_leave_the_store_and_results_stay(blob_stack: BlobStack) -> None:
    stack = blob_stack.stack
    job = stack.client.upload([CT, MR, BROKEN], models=["radq-smoke"], explain_threshold=0.0)
    job = wait_done(stack.client, str(job["id"]))
    assert job["counts"]["done"] == 2 and job["counts"]["failed"] == 1, job["counts"]
    (broken,) = stack.client.instances(str(job["id"]), "failed")
    assert "not a DICOM file" in broken["reason"]

    ct_uid = next(i["study_instance_uid"] for i in stack.client.instances(str(job["id"]), "done")
                  if i["modality"] == "CT")  # fmt: skip
    results = stack.client.study_results(ct_uid)
    maps = _saliency_urls(results)
    assert len(maps) == 4, results  # radq-smoke's four labels, threshold 0

    # Retention 0: every uploaded file of the job goes once the job is done...
    shas = {i.location for i in _uploads(stack, str(job["id"]))}
    assert len(shas) == 3
    _wait_until(lambda: not any(blob_stack.has_blob(sha) for sha in shas), "uploads deleted")
    _wait_until(
        lambda: {i.storage for i in _uploads(stack, str(job["id"]))} == {"deleted"}, "instances marked"
    )
    # ...and what a user reads stays: results, and the Grad-CAM maps (never deleted).
    assert stack.client.study_results(ct_uid) == results
    for url in maps:
        png = stack.http.get(url)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), url

    if blob_stack.kind == "s3":
        local = stack.settings.resolved_blob_dir
        assert not local.exists() or not [p for p in local.rglob("*") if p.is_file()], "uploads on local disk"
        spool = stack.settings.home / "spool"
        assert not spool.exists() or not [p for p in spool.rglob("*") if p.is_file()], "temp files left"
        assert blob_stack.s3 is not None and blob_stack.bucket is not None
        pngs = [k for k in blob_stack.s3.keys(blob_stack.bucket) if k.split("/")[-1] in
                {u.rsplit("/", 1)[-1].removesuffix(".png") for u in maps}]  # fmt: skip
        assert len(pngs) == 4, "saliency maps are kept in the bucket"

    # A retry cannot bring the deleted upload back: it says why, naming the setting.
    retry = stack.http.post(f"/v1/jobs/{job['id']}/retry")
    assert retry.status_code == 409, retry.text
    assert "RADQ_BLOB_RETENTION_DAYS=0" in retry.json()["detail"]
    (still,) = stack.client.instances(str(job["id"]), "failed")
    assert "was deleted from the blob store" in still["reason"]
    assert "RADQ_BLOB_RETENTION_DAYS=0" in still["reason"]
    assert stack.client.job(str(job["id"]))["status"] == "done"


def test_stow_rs_parts_go_to_the_store_and_run(blob_stack: BlobStack) -> None:
    stack = blob_stack.stack
    boundary = f"radq-{uuid.uuid4().hex}"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
            for path in (CT, MR)
        )
        + f"--{boundary}--\r\n".encode()
    )
    response = stack.http.post(
        "/dicomweb/studies?models=radq-smoke",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    assert response.status_code == 200, response.text
    job = wait_done(stack.client, response.headers["X-Radq-Job-Id"])
    assert job["counts"]["done"] == 2, job["counts"]
    spool = blob_stack.stack.settings.home / "spool"
    assert not spool.exists() or not list(spool.iterdir()), "the STOW spool is removed"
    if blob_stack.kind == "s3":
        local = stack.settings.resolved_blob_dir
        assert not local.exists() or not [p for p in local.rglob("*") if p.is_file()], "uploads on local disk"
