"""workers.prepare.content_keys: the light read deduplication matches instances on.

A key is a pre-filter: a wrong or missing one costs only work (a full inspection, or
inference done again), never a wrong reuse; but it must never raise, never inflate a
deflated data set, and agree with the full header read on real files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from db.status import StorageKind
from db.work import Claimed
from radq.blobs import sha256_of
from radq.blobs.file import FileBlobStore
from tests.conftest import SAMPLES
from tests.workers import hostile_files as hostile
from workers.prepare import KEY_HEAD_BYTES, ContentKey, StoredBlob, content_keys

WITH_PREAMBLE = sorted((SAMPLES / "real").glob("*.dcm"))


def _claimed(path: Path, storage: str = StorageKind.PATH, location: str | None = None) -> Claimed:
    return Claimed(1, "job", path.name, storage, location or str(path), 0)


def _key(path: Path) -> ContentKey:
    (key,) = content_keys([(_claimed(path), path)])
    return key


@pytest.mark.parametrize("path", WITH_PREAMBLE, ids=lambda p: p.name)
def test_real_files_give_the_uid_and_hash_of_a_full_read(path: Path) -> None:
    assert _key(path) == ContentKey(str(pydicom.dcmread(path).SOPInstanceUID), sha256_of(path))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bare dataset", (SAMPLES / "tolerant" / "no_meta_no_preamble.dcm").read_bytes()),
        ("deflate bomb", hostile.deflate_bomb(1 << 31)),  # 2 GiB once inflated: never inflated here
        ("cut in the file meta", hostile.truncate((SAMPLES / "real" / "CT_small.dcm").read_bytes(), 150)),
        ("random bytes", (SAMPLES / "broken" / "random_bytes.bin").read_bytes()),
        ("empty", b""),
        ("gzip", hostile.gzipped((SAMPLES / "real" / "CT_small.dcm").read_bytes())),
    ],
)
def test_files_without_a_cheap_uid_keep_their_hash(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "file.dcm"
    path.write_bytes(data)
    assert _key(path) == ContentKey(None, sha256_of(path)), name


def test_a_file_cut_after_its_uid_still_has_its_key(tmp_path: Path) -> None:
    real = SAMPLES / "real" / "CT_small.dcm"
    path = tmp_path / "cut.dcm"
    path.write_bytes(hostile.truncate(real.read_bytes(), 2000))  # inside the header, past the UIDs
    assert _key(path).sop_instance_uid == str(pydicom.dcmread(real).SOPInstanceUID)


def test_a_missing_file_has_no_key(tmp_path: Path) -> None:
    assert _key(tmp_path / "gone.dcm") == ContentKey(None, None)


def test_an_upload_keys_on_its_blob_name_without_hashing_again(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    real = SAMPLES / "real" / "MR_small.dcm"
    sha, _ = store.put(io.BytesIO(real.read_bytes()))
    claimed = _claimed(real, StorageKind.BLOB, sha)
    (key,) = content_keys([(claimed, StoredBlob(store, sha))])
    assert key == ContentKey(str(pydicom.dcmread(real).SOPInstanceUID), sha)


def test_an_upload_whose_uid_lies_past_the_light_read_has_no_uid(tmp_path: Path) -> None:
    # A large file meta element before SOPInstanceUID puts it past the ranged read of an
    # upload's start: no key (a prefix of the UID would be a wrong one), then a full read.
    ds = pydicom.dcmread(SAMPLES / "real" / "MR_small.dcm")
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\0" * (KEY_HEAD_BYTES + 10)
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    store = FileBlobStore(tmp_path / "blobs")
    sha, _ = store.put(io.BytesIO(data.getvalue()))
    (key,) = content_keys([(_claimed(Path("mr.dcm"), StorageKind.BLOB, sha), StoredBlob(store, sha))])
    assert key == ContentKey(None, sha)
    path = tmp_path / "mr.dcm"  # the same file read in place: the whole file is there
    path.write_bytes(data.getvalue())
    assert _key(path).sop_instance_uid == str(ds.SOPInstanceUID)
