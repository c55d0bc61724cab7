"""Submission limits answer 413 with the limit named, and record nothing."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from api.ingest import RATIO_FLOOR, Ingest
from db.migrate import upgrade
from db.models import Job
from db.session import make_engine
from radq.blobs.file import FileBlobStore
from radq.errors import LimitExceeded, SubmissionError
from tests.apiserver import serve
from tests.archives import damaged_zip, tar_of
from tests.conftest import SAMPLES, make_settings


@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, str]]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, redis_url, max_upload_bytes=20_000, max_archive_members=3)
    with serve(settings) as http:
        yield http, url


@contextmanager
def roomy_server(tmp_path: Path, redis_url: str, **overrides: object) -> Iterator[tuple[httpx.Client, str]]:
    """A server whose size limit (10 MB) is far above the archives sent, so only the ratio can trip."""
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    settings = make_settings(tmp_path, url, redis_url, max_upload_bytes=10_000_000, **overrides)
    with serve(settings) as http:
        yield http, url


@pytest.fixture
def roomy(tmp_path: Path, redis_url: str) -> Iterator[tuple[httpx.Client, str]]:
    with roomy_server(tmp_path, redis_url) as served:
        yield served


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
        b'--cut\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n'
        b"Content-Type: application/dicom\r\n\r\n" + b"\0" * 500
    )  # no closing boundary: the client died mid-upload
    response = test_client.post(
        "/v1/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=cut"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]
    assert _jobs(url) == 0


BLANK = b"\0" * 2_000_000
"""2 MB of zeros: deflates about 1000:1, gzips about 500:1 (the default limit is 200:1)."""
REAL = SAMPLES / "real"


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_member_over_the_compression_ratio(roomy: tuple[httpx.Client, str], tmp_path: Path) -> None:
    test_client, url = roomy
    response = test_client.post("/v1/jobs", files=[("files", ("bomb.zip", _zip({"bomb.dcm": BLANK})))])
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "bomb.zip: member bomb.dcm expands" in detail and "RADQ_MAX_COMPRESSION_RATIO" in detail
    assert _jobs(url) == 0
    blobs = tmp_path / "blobs"
    assert not blobs.exists() or not any(blobs.rglob("*")), "refused from the declared sizes: nothing written"


def test_tar_gz_over_the_compression_ratio(roomy: tuple[httpx.Client, str], tmp_path: Path) -> None:
    test_client, url = roomy
    # The ratio is the stream's so far: a real member first must not hide the bomb.
    archive = tar_of({"mr.dcm": (REAL / "MR_small.dcm").read_bytes(), "bomb.dcm": b"\0" * 5_000_000}, "w:gz")
    response = test_client.post("/v1/jobs", files=[("files", ("bomb.tar.gz", archive))])
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "bomb.tar.gz (the tar stream, at member bomb.dcm)" in detail
    assert "RADQ_MAX_COMPRESSION_RATIO" in detail
    assert _jobs(url) == 0
    assert _files_in(tmp_path / "blobs") == [], "the real member before the bomb is not kept either"


def _files_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def test_an_upload_refused_part_way_leaves_nothing_in_the_blob_store(
    roomy: tuple[httpx.Client, str], tmp_path: Path
) -> None:
    """A plain file and a zip's first member are read before its second turns out damaged:
    the 400 keeps none of them (they would sit in the store with no instance to point at)."""
    test_client, url = roomy
    ct, mr = (REAL / "CT_small.dcm").read_bytes(), (REAL / "MR_small.dcm").read_bytes()
    files = [("files", ("ct.dcm", ct)), ("files", ("scans.zip", damaged_zip(mr, ct)))]
    response = test_client.post("/v1/jobs", files=files)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("scans.zip: not a readable zip archive") and "damaged.dcm" in detail, detail
    assert _jobs(url) == 0
    assert _files_in(tmp_path / "blobs") == []
    # The same files without the damage are stored, each once.
    files[1] = ("files", ("scans.zip", _zip({"good.dcm": mr, "damaged.dcm": ct})))
    response = test_client.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    assert response.json()["counts"]["total"] == 3
    assert len(_files_in(tmp_path / "blobs")) == 2


def test_archives_of_real_dicom_and_plain_tars_are_accepted(roomy: tuple[httpx.Client, str]) -> None:
    test_client, url = roomy
    real = {n: (REAL / n).read_bytes() for n in ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm")}
    files = [
        # examples_rgb_color.dcm (232 kB, deflates about 4:1) is over the floor, so the ratio is checked.
        ("files", ("real.zip", _zip(real))),
        ("files", ("real.tar.gz", tar_of(real, "w:gz"))),
        # An uncompressed tar expands about 1:1 however blank its members are.
        ("files", ("blank.tar", tar_of({"blank.dcm": BLANK}))),
    ]
    response = test_client.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    assert response.json()["counts"]["total"] == 7
    assert _jobs(url) == 1


def test_compression_ratio_is_configurable(tmp_path: Path, redis_url: str) -> None:
    with roomy_server(tmp_path, redis_url, max_compression_ratio=5000) as (test_client, url):
        response = test_client.post("/v1/jobs", files=[("files", ("bomb.zip", _zip({"bomb.dcm": BLANK})))])
    assert response.status_code == 202, response.text
    assert _jobs(url) == 1


# Without a server: cases the HTTP tests above do not reach.


def _ingest(tmp_path: Path) -> Ingest:
    return Ingest(FileBlobStore(tmp_path / "blobs"), max_bytes=10**8, max_members=100, max_ratio=200)


def test_zip_members_expanded_side_by_side_keep_their_order_and_bytes(tmp_path: Path) -> None:
    # Sizes from 0 to 128 kB, so that small members finish while large ones still expand.
    members = {f"s/{i:02d}.dcm": random.Random(i).randbytes(i * 997 % 4096 * 32) for i in range(60)}
    with _ingest(tmp_path) as ingest:
        ingest.add_archive("series.zip", io.BytesIO(_zip(members)))
        ingest.commit()
    assert [f.file_name for f in ingest.files] == [f"series.zip!{name}" for name in members]
    digests = [hashlib.sha256(data).hexdigest() for data in members.values()]
    assert [f.location for f in ingest.files] == digests
    store = FileBlobStore(tmp_path / "blobs")
    assert all(store.read(f.location) == data for f, data in zip(ingest.files, members.values(), strict=True))


def test_small_blank_members_are_never_refused_for_ratio(tmp_path: Path) -> None:
    ingest = _ingest(tmp_path)
    blank = b"\0" * (RATIO_FLOOR - 1)
    ingest.add_archive("blank.zip", io.BytesIO(_zip({"a.dcm": blank, "b.dcm": blank})))
    assert [f.size_bytes for f in ingest.files] == [RATIO_FLOOR - 1] * 2


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
def test_other_compressed_tars_are_checked_too(tmp_path: Path, mode: str) -> None:
    with pytest.raises(LimitExceeded, match="RADQ_MAX_COMPRESSION_RATIO"):
        _ingest(tmp_path).add_archive("bomb.tar", io.BytesIO(tar_of({"bomb.dcm": BLANK}, mode)))


def test_a_bomb_in_skipped_clutter_is_refused(tmp_path: Path) -> None:
    # Skipping a member of a compressed stream still decompresses it.
    archive = tar_of({"ok.dcm": b"x", "__MACOSX/._ok.dcm": BLANK}, "w:gz")
    with pytest.raises(LimitExceeded, match=r"at member __MACOSX/\._ok\.dcm"):
        _ingest(tmp_path).add_archive("clutter.tar.gz", io.BytesIO(archive))


def test_zip_member_longer_than_declared_is_refused(tmp_path: Path) -> None:
    data = bytearray(_zip({"liar.dcm": b"\1" * 2_000_000}))
    central, local = data.find(b"PK\x01\x02"), data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, central + 24, 100_000)  # uncompressed size, central directory
    struct.pack_into("<I", data, local + 22, 100_000)  # and local header
    with _ingest(tmp_path) as ingest:
        with pytest.raises(SubmissionError, match="not a readable zip archive.*CRC"):
            ingest.add_archive("liar.zip", io.BytesIO(bytes(data)))
        assert ingest.files == [] and ingest.stored_bytes == 0
    assert _files_in(tmp_path / "blobs") == []


def test_zip_member_overstating_its_compressed_size_is_refused(tmp_path: Path) -> None:
    # 2 MB from a declared 20 kB passes the member's ratio (100:1); the archive is 2 kB.
    data = bytearray(_zip({"wide.dcm": BLANK}))
    central, local = data.find(b"PK\x01\x02"), data.find(b"PK\x03\x04")
    struct.pack_into("<I", data, central + 20, 20_000)  # compressed size, central directory
    struct.pack_into("<I", data, local + 18, 20_000)  # and local header
    with pytest.raises(LimitExceeded, match=r"wide\.zip \(its members together\) expands"):
        _ingest(tmp_path).add_archive("wide.zip", io.BytesIO(bytes(data)))


def test_encrypted_zip_member_is_a_submission_error(tmp_path: Path) -> None:
    data = bytearray(_zip({"secret.dcm": b"x"}))
    for header, flags in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):
        data[data.find(header) + flags] |= 0x1  # general-purpose bit 0: encrypted
    with pytest.raises(SubmissionError, match="secret.dcm is encrypted"):
        _ingest(tmp_path).add_archive("secret.zip", io.BytesIO(bytes(data)))
