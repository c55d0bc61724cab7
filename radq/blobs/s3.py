"""Blobs as objects ``<prefix>/<sha256>`` in an S3-compatible bucket (AWS, MinIO, Ceph…).

For workers on hosts that share no filesystem with the API. Endpoint, credentials and
region come from the variables boto3 reads itself (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, or an
instance role). Uploads are spooled to a local temporary file while they are hashed (an
object's key is its hash, known only at the end), then uploaded unless the bucket has
them already (up to :data:`SMALL_OBJECT`, held in memory and sent in one PUT either
way). boto3 clients do not survive a fork: each process makes its own, lazily.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from radq.blobs import copy_hashing, missing
from radq.errors import BlobStoreUnavailable

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_EMPTY_RANGE = {"416", "InvalidRange"}
"""A ranged GET of an empty object: there is no first byte to send."""
SMALL_OBJECT = 256 * 1024
"""Objects up to this size (Grad-CAM maps, ~10 KB) go in one PUT whether the bucket has
them or not, spooled in memory: a HEAD first, then s3transfer's machinery, cost the worker
more than sending them again."""
UPLOAD_THREADS = 16
"""Objects one :meth:`S3BlobStore.adopt_all` sends at once (the client's connection pool holds as many)."""
_CLIENT_CONFIG = Config(
    retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
    max_pool_connections=UPLOAD_THREADS,
)  # fmt: skip


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code"))


def _not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND


class S3BlobStore:
    """A bucket and a key prefix; picklable (the client is made again in each process)."""

    def __init__(self, bucket: str, prefix: str, *, spool_dir: Path) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._spool_dir = spool_dir
        self._client: Any = None
        self._client_pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "spool_dir": self._spool_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bucket"], state["prefix"], spool_dir=state["spool_dir"])  # type: ignore[misc]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def spool_dir(self) -> Path:
        return self._spool_dir

    def key_for(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    def client(self) -> Any:
        """This process's boto3 client (threads share it: boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = boto3.session.Session().client("s3", config=_CLIENT_CONFIG)
                self._client_pid = os.getpid()
            return self._client

    def _unavailable(self, doing: str, exc: Exception) -> BlobStoreUnavailable:
        return BlobStoreUnavailable(f"the blob store {self.url} failed while {doing}: {exc}")

    def _last_modified(self, sha256: str) -> datetime | None:
        """When the object was last written, or None when there is none."""
        try:
            head = self.client().head_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise self._unavailable(f"looking for {sha256}", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable(f"looking for {sha256}", exc) from None
        modified: datetime = head["LastModified"]
        return modified

    def put(self, stream: IO[bytes], *, max_bytes: int | None = None, what: str = "file") -> tuple[str, int]:
        """Spool ``stream`` (to a temporary file past :data:`SMALL_OBJECT`) while hashing
        it, then upload it (see :meth:`_upload`)."""
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.SpooledTemporaryFile(
            SMALL_OBJECT, dir=str(self._spool_dir), prefix=".upload-"
        ) as spool:
            sha, size = copy_hashing(stream, spool, max_bytes=max_bytes, what=what)
            spool.seek(0)
            self._upload(spool, sha, size, what)
        return sha, size

    def _upload(self, data: IO[bytes], sha256: str, size: int, what: str) -> None:
        """``data``, whose hash is ``sha256``: a small object in one PUT, a larger one unless
        present."""
        key = self.key_for(sha256)
        try:
            if size <= SMALL_OBJECT:  # present or not: a rewrite renews LastModified too
                self.client().put_object(Bucket=self.bucket, Key=key, Body=data.read())
            elif self._last_modified(sha256) is None:
                self.client().upload_fileobj(data, self.bucket, key)
            else:
                # Rewritten in place (no bytes move) so that its LastModified tells the
                # retention sweep that an upload of it may not be recorded yet.
                self.client().copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="REPLACE",
                )
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(f"storing {what}", exc) from None

    def _adopt(self, path: Path, sha256: str) -> None:
        with path.open("rb") as data:  # hashed as it was spooled: uploaded as is
            self._upload(data, sha256, path.stat().st_size, path.name)
        path.unlink(missing_ok=True)

    def adopt_all(self, files: Sequence[tuple[Path, str]]) -> None:
        if len(files) < 2:
            for path, sha256 in files:
                self._adopt(path, sha256)
            return
        # Each object is a round trip: one after the other, a 1 GiB tar's 2,048 members took
        # an upload from ~5 s (file store) to 24-27 s against moto on localhost; 18-21 s so.
        with ThreadPoolExecutor(min(UPLOAD_THREADS, len(files)), thread_name_prefix="radq-s3-put") as pool:
            for _ in pool.map(lambda item: self._adopt(*item), files):
                pass  # the first error is raised here, once the pool has stopped

    def local_file(self, sha256: str) -> Path | None:
        return None

    @contextmanager
    def fetch(self, sha256: str) -> Iterator[Path]:
        """Download the object to a temporary file, removed when the block ends."""
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._spool_dir, prefix=f".fetch-{sha256[:12]}-")
        path = Path(name)
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    self.client().download_fileobj(self.bucket, self.key_for(sha256), out)
            except ClientError as exc:
                if _not_found(exc):
                    raise missing(sha256, self) from None
                raise self._unavailable(f"fetching {sha256}", exc) from None
            except BotoCoreError as exc:
                raise self._unavailable(f"fetching {sha256}", exc) from None
            yield path
        finally:
            path.unlink(missing_ok=True)

    def read(self, sha256: str) -> bytes:
        return self._get(sha256, f"reading {sha256}")

    def read_head(self, sha256: str, size: int) -> bytes:
        body = self._get(sha256, f"reading the head of {sha256}", byte_range=f"bytes=0-{size - 1}")
        return body[:size]  # a server that ignores Range sends it all

    def _get(self, sha256: str, doing: str, *, byte_range: str | None = None) -> bytes:
        """The object's body, or the ``byte_range`` of it (an HTTP Range) that it holds."""
        options = {"Range": byte_range} if byte_range else {}
        try:
            answer = self.client().get_object(Bucket=self.bucket, Key=self.key_for(sha256), **options)
            body: bytes = answer["Body"].read()
        except ClientError as exc:
            if _not_found(exc):
                raise missing(sha256, self) from None
            if byte_range and _error_code(exc) in _EMPTY_RANGE:
                return b""
            raise self._unavailable(doing, exc) from None
        except BotoCoreError as exc:
            raise self._unavailable(doing, exc) from None
        return body

    def delete(self, sha256: str, *, unless_written_after: datetime) -> bool:
        modified = self._last_modified(sha256)
        if modified is None:
            return True
        if modified > unless_written_after:
            return False
        try:
            self.client().delete_object(Bucket=self.bucket, Key=self.key_for(sha256))
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(f"deleting {sha256}", exc) from None
        return True
