"""A server with no room to store an upload answers 507, says what it could not store, keeps
nothing of the request, and takes the next one that fits.

The API runs in a process of its own whose files may not grow past :data:`ROOM` bytes
(RLIMIT_FSIZE, SIGXFSZ ignored): a write past it fails with EFBIG as one on a full disk
fails with ENOSPC, without filling a disk. Real HTTP, SQLite and Redis.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Job
from db.session import make_engine
from radq.services import free_port, stop, wait_for_http
from radq.settings import Settings
from tests.apiserver import bearer
from tests.archives import tar_of
from tests.conftest import SAMPLES, make_settings

ROOM = 8 * 1024 * 1024
"""The most bytes any file of the API process may hold (its SQLite database and WAL included)."""

TOO_BIG = os.urandom(ROOM + 1024 * 1024)  # random: a tar of it cannot shrink below ROOM


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (ROOM, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture
def cramped(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, Settings]]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    limits = {"max_upload_bytes": 64 * ROOM, "max_compression_ratio": 10**6}
    settings = make_settings(tmp_path, url, redis_url, **limits)
    port = free_port()
    with (tmp_path / "api.log").open("ab") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "radq.cli", "api", "--port", str(port)],
            env={**os.environ, **settings.to_env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_file_size,
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
