"""Folders of many files upload as one tar made while it is sent (radq.tar_reader)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.migrate import upgrade
from radq.client import MAX_PARTS, ApiError, Client, expand_paths
from radq.tar_reader import FileChanged, TarReader
from tests.apiserver import serve
from tests.conftest import SAMPLES, make_settings

REAL = SAMPLES / "real"


def _folder(root: Path, copies: int) -> Path:
    """``copies`` real DICOM files (CT, MR, a colour image in turn) under nested folders."""
    folder = root / "night"
    sources = [REAL / "CT_small.dcm", REAL / "MR_small.dcm", REAL / "examples_rgb_color.dcm"]
    for i in range(copies):
        target = folder / f"study-{i % 7}" / f"{i:04d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], target)
    return folder


def _read_all(reader: TarReader, size: int) -> bytes:
    out = bytearray()
    while chunk := reader.read(size):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("read_size", [1, 511, 65536, -1])
def test_the_stream_is_a_tar_of_the_files(tmp_path: Path, read_size: int) -> None:
    folder = _folder(tmp_path, 9)
    long_name = folder / ("Thorax_Röntgen_" + "x" * 120 + ".dcm")  # past ustar's 100 bytes: PAX
    shutil.copyfile(REAL / "CT_small.dcm", long_name)
    os.symlink(REAL / "MR_small.dcm", folder / "linked.dcm")  # sent as the file it points to
    files = expand_paths([folder])
    data = _read_all(TarReader(files), read_size if read_size > 0 else 10**9)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        got = {}
        for info in archive:
            assert info.isfile()
            member = archive.extractfile(info)
            assert member is not None
            got[info.name] = member.read()
    assert got == {name: path.read_bytes() for name, path in files}


def test_its_length_is_known_before_it_is_read_so_it_goes_with_a_content_length(tmp_path: Path) -> None:
    files = expand_paths([_folder(tmp_path, 5)])
    reader = TarReader(files)
    request = httpx.Request(
        "POST", "http://radq/v1/jobs", files=[("files", ("s.tar", reader, "application/x-tar"))]
    )
    assert "transfer-encoding" not in request.headers
    declared = int(request.headers["content-length"])
    assert len(request.read()) == declared  # httpx sought to the end and back, then read it all
    assert reader.tell() == reader.length == len(_read_all(TarReader(files), 65536))


def test_it_reads_forward_only(tmp_path: Path) -> None:
    reader = TarReader(expand_paths([_folder(tmp_path, 1)]))
    reader.read(100)
    reader.seek(0)
    with pytest.raises(io.UnsupportedOperation, match="read forward only"):
        reader.read(100)


def test_a_file_that_changes_size_while_sent_is_an_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 2)
    files = expand_paths([folder])
    reader = TarReader(files)
    reader.read(512)  # the first header is out, with the size read then
    with files[0][1].open("ab") as f:
        f.write(b"more")
    with pytest.raises(FileChanged, match=r"0000.dcm changed size while it was being uploaded"):
        _read_all(reader, 65536)


@pytest.fixture
def api(tmp_path: Path, redis_url: str) -> Iterator[Client]:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    with serve(make_settings(tmp_path, url, redis_url)) as http:
        token = http.headers.get("Authorization", "").removeprefix("Bearer ") or None
        client = Client(str(http.base_url), token=token)
        yield client
        client.close()


def test_a_folder_of_many_files_uploads_as_one_job_with_every_file(tmp_path: Path, api: Client) -> None:
    copies = MAX_PARTS + 44
    folder = _folder(tmp_path / "local", copies)
    job = api.upload([folder])
    assert job["counts"]["total"] == copies
    names = {i["file_name"] for i in api.instances(job["id"])}
    expected = {f"submission.tar!{name}" for name, _ in expand_paths([folder])}
    assert names == expected and len(expected) == copies
    assert not list(tmp_path.rglob("*.tar")), "no temporary archive on either side"


def test_a_folder_over_the_upload_limit_is_refused_from_its_declared_length(
    tmp_path: Path, redis_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    folder = _folder(tmp_path / "local", MAX_PARTS + 1)
    with serve(make_settings(tmp_path, url, redis_url, max_upload_bytes=1_000_000)) as http:
        token = http.headers.get("Authorization", "").removeprefix("Bearer ") or None
        client = Client(str(http.base_url), token=token)
        try:
            with pytest.raises(
                ApiError, match=r"413: request body of \d+ bytes is over the limit of 1000000 "
            ):
                client.upload([folder])
        finally:
            client.close()
    blobs = tmp_path / "blobs"
    assert not blobs.exists() or not any(blobs.rglob("*")), "refused before anything was parsed or stored"
