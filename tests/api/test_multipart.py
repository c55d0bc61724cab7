"""Form uploads spooled as they arrive (api.multipart.FormSpool): files to disk, one at a time."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import httpx
import pytest

from api.ingest import Ingest
from api.multipart import (
    MAX_FIELD_BYTES,
    FormSpool,
    MalformedMultipart,
    PartSpool,
    form_boundary,
    remove_stale_spools,
)
from radq.blobs.file import FileBlobStore
from radq.errors import LimitExceeded, SubmissionError
from tests.conftest import SAMPLES

CT = (SAMPLES / "real" / "CT_small.dcm").read_bytes()
MR = (SAMPLES / "real" / "MR_small.dcm").read_bytes()


def _form(files: list[tuple[str, bytes]], data: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """A multipart/form-data body as httpx sends it, and its boundary."""
    request = httpx.Request(
        "POST", "http://radq/v1/jobs", files=[("files", (n, b)) for n, b in files], data=data
    )
    return request.read(), form_boundary(request.headers["content-type"])


def _spool(tmp_path: Path, boundary: bytes, *, max_parts: int = 10, max_bytes: int = 10**8) -> FormSpool:
    return FormSpool(boundary, tmp_path, max_bytes=max_bytes, max_parts=max_parts)


def test_files_land_in_files_of_their_own_and_fields_in_memory(tmp_path: Path) -> None:
    files = [("a.dcm", CT), ("b.dcm", MR), ("empty.dcm", b"")]
    body, boundary = _form(files, {"models": "x,y", "priority": "bulk"})
    spool = _spool(tmp_path, boundary)
    try:
        for i in range(0, len(body), 4093):  # boundaries fall inside chunks and across them
            spool.feed(body[i : i + 4093])
            if i == 8 * 4093:  # the first file's bytes are on disk while it arrives, not held
                (first,) = spool.directory.iterdir()
                assert first.stat().st_size > 4 * 4093
        spool.finish()
        assert [(f.name, f.filename) for f in spool.files] == [("files", name) for name, _ in files]
        assert [f.path.read_bytes() for f in spool.files if f.path] == [CT, MR, b""]
        assert [f.sha256 for f in spool.files] == [hashlib.sha256(b).hexdigest() for _, b in files]
        assert sorted(spool.fields) == [("models", "x,y"), ("priority", "bulk")]
    finally:
        spool.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_a_body_cut_short_gives_no_parts(tmp_path: Path) -> None:
    body, boundary = _form([("a.dcm", CT)])
    spool = _spool(tmp_path, boundary)
    spool.feed(body[: len(body) // 2])
    with pytest.raises(MalformedMultipart, match="without its closing boundary"):
        spool.finish()
    spool.cleanup()


def test_limits_are_enforced_as_the_body_arrives(tmp_path: Path) -> None:
    body, boundary = _form([(f"{i}.dcm", MR) for i in range(4)])
    over_files = _spool(tmp_path, boundary, max_parts=3)
    with pytest.raises(SubmissionError, match=r"more than 3 files \(RADQ_MAX_ARCHIVE_MEMBERS\)"):
        over_files.feed(body)
    over_files.cleanup()
    over_bytes = _spool(tmp_path, boundary, max_bytes=len(body) - 1)
    with pytest.raises(LimitExceeded, match="RADQ_MAX_UPLOAD_BYTES"):
        over_bytes.feed(body)
    over_bytes.cleanup()
    long_field, boundary = _form([("a.dcm", MR)], {"webhook_url": "x" * (MAX_FIELD_BYTES + 1)})
    over_field = _spool(tmp_path, boundary)
    with pytest.raises(LimitExceeded, match="form field 'webhook_url' is longer than"):
        over_field.feed(long_field)
    over_field.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_a_part_without_a_name_is_refused(tmp_path: Path) -> None:
    body = b'--b\r\nContent-Disposition: form-data; filename="a.dcm"\r\n\r\nxx\r\n--b--\r\n'
    spool = _spool(tmp_path, b"b")
    with pytest.raises(MalformedMultipart, match="part 1 .* has no name"):
        spool.feed(body)
    spool.cleanup()


def test_a_content_type_without_a_boundary_is_refused() -> None:
    with pytest.raises(MalformedMultipart, match="no boundary"):
        form_boundary("multipart/form-data")


def test_a_utf8_file_name_is_kept(tmp_path: Path) -> None:
    body, boundary = _form([("Thorax_Röntgen.dcm", CT)])
    spool = _spool(tmp_path, boundary)
    spool.feed(body)
    spool.finish()
    assert [f.filename for f in spool.files] == ["Thorax_Röntgen.dcm"]
    spool.cleanup()


def test_spools_a_dead_api_process_left_are_removed_once_old(tmp_path: Path) -> None:
    """A request removes its spool as it ends; one killed mid-upload leaves it behind."""
    old_form, old_stow, live = (
        _spool(tmp_path, b"b"),
        PartSpool(b"b", tmp_path, max_bytes=10, max_parts=1),
        _spool(tmp_path, b"b"),
    )
    (old_form.directory / "000001").write_bytes(MR)
    old_ingest = Ingest(FileBlobStore(tmp_path), max_bytes=10**6, max_members=10)  # a zip's members, staged
    old_ingest.add_upload("scan.dcm", io.BytesIO(MR))
    (staged,) = tmp_path.glob(".ingest-*")
    day_ago = time.time() - 25 * 3600
    for directory in (old_form.directory, old_stow.directory, staged):
        os.utime(directory, (day_ago, day_ago))
    blob = tmp_path / "ab"  # the blob store's own directories are never touched
    blob.mkdir()
    os.utime(blob, (day_ago, day_ago))
    assert remove_stale_spools(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ab", live.directory.name])
    live.cleanup()
