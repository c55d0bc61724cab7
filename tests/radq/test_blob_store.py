"""The blob stores: S3 against moto's server over real HTTP, and the file store beside it."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from db.status import StorageKind
from db.work import Claimed
from radq.blobs import BlobStore, open_blob_store
from radq.blobs.file import FileBlobStore
from radq.errors import BlobMissing, LimitExceeded
from radq.model_card import read_card
from radq.settings import BUNDLED_MODEL_DIR, Settings
from tests.conftest import SAMPLES, S3Server
from workers.prepare import ContentKey, StoredBlob, content_keys, load

MR = SAMPLES / "real" / "MR_small.dcm"


@pytest.fixture
def s3_store(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BlobStore]:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    settings = Settings(home=tmp_path, blob_url=f"s3://{bucket}/uploads/v1")
    yield open_blob_store(settings)


KEY = b"test-pseudonym-key"
"""HMAC key for the PatientID pseudonym load() computes."""


def _spooled(store: BlobStore) -> list[Path]:
    return [p for p in store.spool_dir.rglob("*") if p.is_file()] if store.spool_dir.exists() else []


def test_s3_put_stores_under_prefix_and_sha_and_reads_back(s3_store: BlobStore, s3_server: S3Server) -> None:
    data = MR.read_bytes()
    sha, size = s3_store.put(io.BytesIO(data), what="MR_small.dcm")
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    assert s3_server.keys(bucket) == [f"uploads/v1/{sha}"]
    assert s3_store.read(sha) == data
    with s3_store.fetch(sha) as local:
        assert local.read_bytes() == data
    assert not local.exists(), "the downloaded copy is removed after use"
    assert s3_store.local_file(sha) is None
    assert _spooled(s3_store) == [], "nothing of an upload stays on the local disk"


def test_s3_same_bytes_twice_keep_one_object(s3_store: BlobStore, s3_server: S3Server) -> None:
    data = b"radq" * 1000
    first = s3_store.put(io.BytesIO(data))
    second = s3_store.put(io.BytesIO(data))
    assert first == second
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    assert s3_server.keys(bucket) == [f"uploads/v1/{first[0]}"]
    assert s3_store.read(first[0]) == data


@pytest.mark.parametrize("size", [10_000, 2 * 1024 * 1024], ids=["small: one PUT", "large: HEAD, then copy"])
def test_s3_putting_bytes_again_renews_their_write_time(s3_store: BlobStore, size: int) -> None:
    """The retention sweep keeps an object written after a job's end: one uploaded again
    (its job not yet recorded) must read as just written, whichever way it was sent."""
    data = bytes(range(256)) * (size // 256)
    sha, _ = s3_store.put(io.BytesIO(data))
    time.sleep(1.2)
    # S3's LastModified drops the fraction of a second: the second put reads as written
    # after this, the first as before.
    again = datetime.now(UTC) - timedelta(seconds=1.05)
    assert s3_store.put(io.BytesIO(data)) == (sha, len(data))
    assert s3_store.delete(sha, unless_written_after=again) is False
    assert s3_store.read(sha) == data


def test_s3_put_over_the_limit_stores_nothing(s3_store: BlobStore, s3_server: S3Server) -> None:
    with pytest.raises(LimitExceeded, match="RADQ_MAX_UPLOAD_BYTES"):
        s3_store.put(io.BytesIO(b"x" * 5000), max_bytes=4096, what="big.dcm")
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    assert s3_server.keys(bucket) == []
    assert _spooled(s3_store) == []


def test_s3_missing_object_is_a_clear_instance_failure(s3_store: BlobStore) -> None:
    sha = "ab" * 32
    with pytest.raises(BlobMissing, match=f"{sha} is no longer in the blob store"), s3_store.fetch(sha):
        pass
    with pytest.raises(BlobMissing):
        s3_store.read(sha)
    # What a decode process does with it: the instance fails with the reason, nothing raises.
    card = read_card(BUNDLED_MODEL_DIR / "radq-smoke")
    claimed = Claimed(1, "job", "gone.dcm", StorageKind.BLOB, sha, 1)
    out = load(claimed, StoredBlob(s3_store, sha), KEY, [card], 10**8)
    assert out.status == "failed"
    assert (
        out.reason
        and "no longer in the blob store" in out.reason
        and "RADQ_BLOB_RETENTION_DAYS" in out.reason
    )
    assert _spooled(s3_store) == []


_LOAD_WITH_NO_ROOM = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from db.status import StorageKind
from db.work import Claimed
from radq.blobs import open_blob_store
from radq.model_card import read_card
from radq.settings import BUNDLED_MODEL_DIR, Settings
from workers.prepare import StoredBlob, load
home, url, sha = sys.argv[1:]
store = open_blob_store(Settings(home=Path(home), blob_url=url))
card = read_card(BUNDLED_MODEL_DIR / "radq-smoke")
out = load(Claimed(1, "job", "mr.dcm", StorageKind.BLOB, sha, 1), StoredBlob(store, sha), b"k", [card], 10**8)
print(json.dumps([out.status, out.reason]))
"""


def test_a_worker_with_no_room_to_download_says_so(s3_store: BlobStore, tmp_path: Path) -> None:
    """Not "file not readable": the worker's disk is at fault, and retrying once it has room works."""
    sha, _ = s3_store.put(io.BytesIO(MR.read_bytes()))
    child = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_NO_ROOM, str(tmp_path), s3_store.url, sha],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    status, reason = json.loads(child.stdout.splitlines()[-1])
    assert status == "failed"
    assert reason == (
        f"this worker has no room left to fetch uploaded file {sha} in {s3_store.url} (File too large); "
        "retry the job once it has"
    )
    assert _spooled(s3_store) == [], "the partial download is removed"


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_read_head_gives_the_start_of_a_blob(kind: str, s3_store: BlobStore, tmp_path: Path) -> None:
    store = s3_store if kind == "s3" else FileBlobStore(tmp_path / "blobs")
    data = MR.read_bytes()
    sha, _ = store.put(io.BytesIO(data))
    assert store.read_head(sha, 1000) == data[:1000]
    assert store.read_head(sha, len(data) + 5000) == data, "a shorter blob comes whole"
    empty, _ = store.put(io.BytesIO(b""))
    assert store.read_head(empty, 1000) == b""
    with pytest.raises(BlobMissing, match="no longer in the blob store"):
        store.read_head("cd" * 32, 1000)
    if kind == "s3":
        assert _spooled(store) == [], "a ranged read leaves no file behind"


def test_an_s3_upload_keys_for_deduplication_without_a_download(
    s3_store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With deduplication on, each upload's content key is read before it is decoded: a
    # ranged read of its first bytes, not a download that decoding would then repeat.
    sha, _ = s3_store.put(io.BytesIO(MR.read_bytes()))
    copy = pickle.loads(pickle.dumps(s3_store))

    def no_download(sha256: str) -> None:
        raise AssertionError(f"downloaded {sha256} whole to read its content key")

    monkeypatch.setattr(copy, "fetch", no_download)
    claimed = Claimed(1, "job", "mr.dcm", StorageKind.BLOB, sha, 1)
    (key,) = content_keys([(claimed, StoredBlob(copy, sha))])
    assert key == ContentKey(str(pydicom.dcmread(MR).SOPInstanceUID), sha)


def test_s3_store_travels_to_another_process_and_reads_there(s3_store: BlobStore) -> None:
    sha, _ = s3_store.put(io.BytesIO(MR.read_bytes()))
    card = read_card(BUNDLED_MODEL_DIR / "radq-smoke")
    copy = pickle.loads(pickle.dumps(s3_store))  # what a decode process receives
    claimed = Claimed(1, "job", "mr.dcm", StorageKind.BLOB, sha, 1)
    out = load(claimed, StoredBlob(copy, sha), KEY, [card], 10**8)
    assert out.status is None, out.reason
    assert out.metadata["modality"] == "MR" and out.inputs["radq-smoke"]


def test_delete_keeps_a_blob_written_after_its_last_job(s3_store: BlobStore, tmp_path: Path) -> None:
    for store in (s3_store, FileBlobStore(tmp_path / "blobs")):
        sha, _ = store.put(io.BytesIO(b"some upload " + store.url.encode()))
        past = datetime.now(UTC) - timedelta(hours=1)
        assert store.delete(sha, unless_written_after=past) is False, store.url
        assert store.read(sha)
        assert store.delete(sha, unless_written_after=datetime.now(UTC) + timedelta(seconds=2)) is True
        with pytest.raises(BlobMissing):
            store.read(sha)
        assert store.delete(sha, unless_written_after=past) is True, "already gone is gone"


def test_blob_url_selects_the_store(tmp_path: Path) -> None:
    default = open_blob_store(Settings(home=tmp_path))
    assert isinstance(default, FileBlobStore) and default.root == (tmp_path / "blobs").resolve()
    chosen = open_blob_store(Settings(home=tmp_path, blob_url=f"file://{tmp_path}/elsewhere"))
    assert isinstance(chosen, FileBlobStore) and chosen.root == tmp_path / "elsewhere"
    s3 = open_blob_store(Settings(home=tmp_path, blob_url="s3://bucket/a/b/"))
    assert s3.url == "s3://bucket/a/b"
    for bad in ("s3:///nobucket", "http://example.org/x", "file://relative/dir"):
        with pytest.raises(ValidationError, match="blob_url"):
            Settings(home=tmp_path, blob_url=bad)


def test_a_spooled_file_is_moved_into_a_file_store_not_copied(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    data = (SAMPLES / "real" / "CT_small.dcm").read_bytes()
    spooled = store.spool_dir / ".upload-x" / "000001"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(data)
    inode = spooled.stat().st_ino
    sha = hashlib.sha256(data).hexdigest()
    store.adopt_all([(spooled, sha)])
    assert not spooled.exists()
    assert store.path_for(sha).read_bytes() == data and store.path_for(sha).stat().st_ino == inode


@pytest.mark.parametrize("size", [10_000, 2 * 1024 * 1024], ids=["small: PUT", "large: HEAD, upload"])
def test_a_spooled_file_is_uploaded_to_s3_under_its_given_hash(s3_store: BlobStore, size: int) -> None:
    data = bytes(range(256)) * (size // 256)
    sha = hashlib.sha256(data).hexdigest()
    for _ in range(2):  # the second time the object is there already
        spooled = s3_store.spool_dir / "000001"
        spooled.parent.mkdir(parents=True, exist_ok=True)
        spooled.write_bytes(data)
        written_after = datetime.now(UTC) - timedelta(seconds=1.05)
        s3_store.adopt_all([(spooled, sha)])
        assert not spooled.exists()
        assert s3_store.read(sha) == data
        # Written again, the object reads as new to the retention sweep (see the put test).
        assert s3_store.delete(sha, unless_written_after=written_after) is False
        time.sleep(1.2)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_many_spooled_files_are_stored_together(kind: str, s3_store: BlobStore, tmp_path: Path) -> None:
    store = s3_store if kind == "s3" else FileBlobStore(tmp_path / "blobs")
    store.spool_dir.mkdir(parents=True, exist_ok=True)
    sizes = [10_000, 300_000] * 20  # small objects (one PUT) and large ones (HEAD, then upload)
    files = []
    for i, size in enumerate(sizes):
        data = i.to_bytes(4, "big") * (size // 4)
        path = store.spool_dir / f"part-{i:03d}"
        path.write_bytes(data)
        files.append((path, hashlib.sha256(data).hexdigest(), data))
    files.append((store.spool_dir / "again", files[0][1], files[0][2]))  # the same bytes twice
    files[-1][0].write_bytes(files[0][2])
    store.adopt_all([(path, sha) for path, sha, _ in files])
    assert all(not path.exists() for path, _, _ in files)
    assert all(store.read(sha) == data for _, sha, data in files)


def test_a_failure_among_many_s3_uploads_is_raised(s3_store: BlobStore) -> None:
    s3_store.spool_dir.mkdir(parents=True, exist_ok=True)
    data = b"x" * 1000
    present = s3_store.spool_dir / "present"
    present.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        s3_store.adopt_all([(present, sha), (s3_store.spool_dir / "gone", "0" * 64)])
    assert s3_store.read(sha) == data, "the others are stored all the same"
