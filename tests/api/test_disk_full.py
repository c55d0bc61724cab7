"""A server with no room to store an upload answers 507, says what it could not store, keeps
nothing of the request, and takes the next one that fits; and it keeps RADQ_MIN_FREE_BYTES
free on that disk rather than fill it.

The API runs in a process of its own whose files may not grow past :data:`ROOM` bytes
(RLIMIT_FSIZE, SIGXFSZ ignored): a write past it fails with EFBIG as one on a full disk
fails with ENOSPC, without filling a disk. Real HTTP, SQLite and Redis.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Job
from db.session import make_engine
from radq.services import free_port, stop, wait_for_http
from radq.settings import Settings
from tests.apiserver import bearer, serve
from tests.archives import tar_of
from tests.conftest import SAMPLES, make_settings

ROOM = 8 * 1024 * 1024
"""The most bytes any file of the API process may hold (its SQLite database and WAL included)."""

TOO_BIG = os.urandom(ROOM + 1024 * 1024)  # random: a tar of it cannot shrink below ROOM


LIMITED = f"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({ROOM}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
os.execv(sys.executable, [sys.executable, "-m", "radq.cli", *sys.argv[1:]])
"""
"""Runs ``radq <args>`` with the file-size limit (a wrapper, not preexec_fn: the test process has threads)."""


@pytest.fixture
def cramped(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, Settings]]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    limits = {"max_upload_bytes": 64 * ROOM, "max_compression_ratio": 10**6}
    settings = make_settings(tmp_path, url, redis_url, **limits)
    port = free_port()
    with (tmp_path / "api.log").open("ab") as log:
        api = subprocess.Popen(
            [sys.executable, "-c", LIMITED, "api", "--port", str(port)],
            env={**os.environ, **settings.to_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
        headers = bearer(url)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers) as http:
            yield http, settings
    finally:
        stop(api)


def _jobs(settings: Settings) -> int:
    engine = make_engine(settings.resolved_database_url)
    with engine.connect() as conn:
        n = conn.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return int(n or 0)


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("upload", "stored_as"),
    [
        (("big.dcm", TOO_BIG), "big.dcm"),
        # Expanded as it arrives: a full disk there is not "not a readable tar archive".
        (("scans.tar", tar_of({"ct/big.dcm": TOO_BIG})), "scans.tar!ct/big.dcm"),
        # The zip itself fits; its member, written out of it, does not.
        (("scans.zip", _zip("big.dcm", bytes(ROOM + 1))), "scans.zip!big.dcm"),
    ],
    ids=["file", "tar-member", "zip-member"],
)
def test_no_room_is_a_507_naming_the_file_and_nothing_is_kept(
    cramped: tuple[httpx.Client, Settings], upload: tuple[str, bytes], stored_as: str
) -> None:
    http, settings = cramped
    ct = (SAMPLES / "real" / "CT_small.dcm").read_bytes()
    response = http.post("/v1/jobs", files=[("files", ("first.dcm", ct)), ("files", upload)])
    assert response.status_code == 507, response.text
    assert response.headers["retry-after"] == "300"
    detail = response.json()["detail"]
    assert detail.startswith(f"this server has no room left to store {stored_as} (File too large); "), detail
    assert "nothing from this request was kept" in detail
    assert _jobs(settings) == 0
    blobs = settings.resolved_blob_dir
    assert [p for p in blobs.rglob("*") if p.is_file()] == [], "neither the spool nor first.dcm is left"
    # The server carries on: what fits is taken.
    response = http.post("/v1/jobs", files=[("files", ("first.dcm", ct))])
    assert response.status_code == 202, response.text
    assert _jobs(settings) == 1


def test_stow_rs_with_no_room_for_its_body_is_a_507(cramped: tuple[httpx.Client, Settings]) -> None:
    http, settings = cramped
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + TOO_BIG + b"\r\n--b--\r\n"
    content_type = 'multipart/related; type="application/dicom"; boundary=b'
    response = http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
    assert response.status_code == 507, response.text
    assert response.json()["detail"].startswith("this server has no room left to store part 1 of the request")
    assert _jobs(settings) == 0


def test_an_archive_on_a_path_that_meets_a_full_disk_waits_rather_than_fails(
    cramped: tuple[httpx.Client, Settings],
) -> None:
    """The archive is not at fault: its registration pauses (and resumes when its lease
    expires) instead of recording it as an unreadable archive."""
    http, settings = cramped
    archive = settings.allowed_roots[0] / "scans.zip"
    archive.write_bytes(_zip("big.dcm", bytes(ROOM + 1)))
    response = http.post("/v1/jobs", json={"paths": [str(archive)]})
    assert response.status_code == 202, response.text
    log = settings.home / "api.log"
    deadline = time.monotonic() + 30
    while "paused (this server has no room left to store" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.1)
    job = http.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "registering" and job["counts"]["total"] == 0, job
    assert f"{archive}!big.dcm" in log.read_text(errors="replace")


# RADQ_MIN_FREE_BYTES: the API leaves room on its disk rather than filling it.


def _reserved(tmp_path: Path, redis_url: str, *, below_free: int) -> Settings:
    """Settings whose reserve leaves ``below_free`` bytes of the disk's free space to uploads
    (negative: none)."""
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    free = shutil.disk_usage(tmp_path).free
    limits = {"max_upload_bytes": 10**12, "max_compression_ratio": 10**6}
    return make_settings(tmp_path, url, redis_url, min_free_bytes=free - below_free, **limits)


def test_a_body_declared_past_the_reserve_is_refused_before_it_is_read(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _reserved(tmp_path, redis_url, below_free=-(1 << 40))
    with serve(settings) as http:
        response = http.post("/v1/jobs", files=[("files", ("ct.dcm", bytes(2 * 1024 * 1024)))])
    assert response.status_code == 507, response.text
    detail = response.json()["detail"]
    assert detail.startswith("this server's upload disk has ")
    assert "and the request's body takes 2 MiB" in detail
    assert "kept free (RADQ_MIN_FREE_BYTES); nothing from this request was kept" in detail
    assert _jobs(settings) == 0


def test_a_body_of_unknown_length_stops_at_the_reserve(tmp_path: Path, redis_url: str) -> None:
    settings = _reserved(tmp_path, redis_url, below_free=64 * 1024 * 1024)
    boundary = "radq-reserve"
    chunk = os.urandom(1024 * 1024)

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to check first
        disposition = 'Content-Disposition: form-data; name="files"; filename="big.dcm"'
        yield f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
        for _ in range(512):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    with serve(settings) as http:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        try:
            response = http.post("/v1/jobs", content=body(), headers=headers)
        except httpx.TransportError:  # answered and closed while the body was still going
            pytest.fail("the 507 did not reach the client")
    assert response.status_code == 507, response.text
    assert response.json()["detail"].startswith("this server's upload disk is down to ")
    assert "while storing the request's body, under the" in response.json()["detail"]
    assert _jobs(settings) == 0
    assert [p for p in settings.resolved_blob_dir.rglob("*") if p.is_file()] == []


def test_a_zip_that_would_expand_past_the_reserve_is_refused_from_its_declared_sizes(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _reserved(tmp_path, redis_url, below_free=256 * 1024 * 1024)
    with serve(settings) as http:
        blank = _zip("blank.dcm", bytes(512 * 1024**2))
        response = http.post("/v1/jobs", files=[("files", ("scans.zip", blank))])
    assert response.status_code == 507, response.text
    assert "and scans.zip expanded takes 512 MiB, but " in response.json()["detail"]
    assert _jobs(settings) == 0


def test_a_tar_gz_expanding_past_the_reserve_stops_at_the_member_that_would_pass_it(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _reserved(tmp_path, redis_url, below_free=192 * 1024 * 1024)
    blank = bytes(128 * 1024 * 1024)
    archive = tar_of({"a.dcm": blank, "b.dcm": blank, "c.dcm": blank}, "w:gz")  # ~0.4 MB: one feed
    with serve(settings) as http:
        response = http.post("/v1/jobs", files=[("files", ("blank.tar.gz", archive))])
    assert response.status_code == 507, response.text
    assert response.json()["detail"].startswith("this server's upload disk is down to ")
    assert "while storing blank.tar.gz!c.dcm, under the" in response.json()["detail"]
    assert _jobs(settings) == 0
    assert [p for p in settings.resolved_blob_dir.rglob("*") if p.is_file()] == []


def test_metrics_show_the_upload_disk_free_space_and_its_reserve(tmp_path: Path, redis_url: str) -> None:
    settings = _reserved(tmp_path, redis_url, below_free=1 << 30)
    with serve(settings) as http:
        text = http.get("/metrics").text
        free = shutil.disk_usage(tmp_path).free
    gauges = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert abs(gauges["radq_upload_disk_free_bytes"] - free) < 256 * 1024 * 1024  # others write meanwhile
    assert gauges["radq_upload_disk_reserve_bytes"] == settings.min_free_bytes
