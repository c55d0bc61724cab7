"""Submission limits answer 413 with the limit named, and record nothing."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from api.app import create_app
from db.migrate import upgrade
from db.models import Job
from db.session import make_engine
from radq.services import free_port
from radq.settings import Settings
from tests.conftest import SAMPLES, make_settings


@contextmanager
def serve(settings: Settings) -> Iterator[httpx.Client]:
    """The real app under uvicorn in a thread, on a free port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, str]]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, redis_url, max_upload_bytes=20_000, max_archive_members=3)
    with serve(settings) as http:
        yield http, url


def _jobs(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return int(n or 0)


def test_request_over_the_size_limit(client: tuple[httpx.Client, str]) -> None:
    test_client, url = client
    big = (SAMPLES / "real" / "examples_rgb_color.dcm").read_bytes()  # 231 kB
    response = test_client.post("/v1/jobs", files=[("files", ("big.dcm", big))])
    assert response.status_code == 413
    assert "RADQ_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert _jobs(url) == 0


def test_archive_with_too_many_members(client: tuple[httpx.Client, str]) -> None:
    test_client, url = client
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(4):
            zf.writestr(f"{i}.dcm", b"x")
    response = test_client.post("/v1/jobs", files=[("files", ("many.zip", buf.getvalue()))])
    assert response.status_code == 413
    assert "more than 3 members" in response.json()["detail"]
    assert _jobs(url) == 0


def test_zip_that_expands_past_the_limit(client: tuple[httpx.Client, str]) -> None:
    test_client, url = client
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.dcm", b"\0" * 1_000_000)  # ~1 kB compressed, 1 MB expanded
    response = test_client.post("/v1/jobs", files=[("files", ("bomb.zip", buf.getvalue()))])
    assert response.status_code == 413
    assert "expands to 1000000 bytes" in response.json()["detail"]
    assert _jobs(url) == 0


def test_path_submission_disabled_without_roots(tmp_path: Path, redis_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, redis_url, allowed_roots=[])
    with serve(settings) as test_client:
        response = test_client.post("/v1/jobs", json={"paths": [str(SAMPLES)]})
    assert response.status_code == 403
    assert "set RADQ_ALLOWED_ROOTS" in response.json()["detail"]


def test_zip_slip_member_is_stored_by_hash_not_by_name(
    client: tuple[httpx.Client, str], tmp_path: Path
) -> None:
    test_client, url = client
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escaped.dcm", (SAMPLES / "real" / "CT5N_2062.dcm").read_bytes())
        zf.writestr("/abs/escaped2.dcm", b"not dicom")
    response = test_client.post("/v1/jobs", files=[("files", ("slip.zip", buf.getvalue()))])
    # The broker is real, so the job is queued: what matters is where the bytes went.
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["counts"]["total"] == 2
    assert not (tmp_path.parent / "escaped.dcm").exists() and not Path("/abs/escaped2.dcm").exists()
    names = {i["file_name"] for i in test_client.get(f"/v1/jobs/{job['id']}/instances").json()["items"]}
    assert names == {"slip.zip!../../escaped.dcm", "slip.zip!/abs/escaped2.dcm"}


def test_truncated_multipart_body_is_refused_and_records_nothing(client: tuple[httpx.Client, str]) -> None:
    test_client, url = client
    body = (
        b"--cut\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.dcm\"\r\n"
        b"Content-Type: application/dicom\r\n\r\n" + b"\0" * 500
    )  # no closing boundary: the client died mid-upload
    response = test_client.post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=cut"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]
    assert _jobs(url) == 0
