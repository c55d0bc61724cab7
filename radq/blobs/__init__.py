"""The blob store: uploads kept once, named by their SHA-256, on a local disk or in S3.

``RADQ_BLOB_URL`` picks the store (:func:`open_blob_store`): ``file:///abs/dir`` or
nothing (the directory ``RADQ_BLOB_DIR``) for :class:`radq.blobs.file.FileBlobStore`,
``s3://bucket/prefix`` for :class:`radq.blobs.s3.S3BlobStore`. Both are picklable, so a
worker hands its store to its decode processes, which fetch what they read themselves.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit

from radq.errors import BlobMissing, ConfigurationError, LimitExceeded, StorageFull
from radq.settings import Settings

CHUNK = 1024 * 1024
"""Bytes read and written at a time: memory stays flat whatever the file's size."""


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def over_limit(what: str, max_bytes: int) -> LimitExceeded:
    """The refusal of ``what`` for being longer than ``max_bytes`` (what is left of RADQ_MAX_UPLOAD_BYTES)."""
    return LimitExceeded(f"{what} is larger than the limit of {max_bytes} bytes (RADQ_MAX_UPLOAD_BYTES)")


NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that mean the disk, a quota or the file-size limit has no room: not the
file's fault, so never reported as a bad upload."""


@contextmanager
def room_for(what: str) -> Iterator[None]:
    """Turn a write error of :data:`NO_ROOM` in the block into a :class:`StorageFull` about ``what``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            raise
        raise StorageFull(f"this server has no room left to store {what} ({exc.strerror})") from None


def copy_hashing(stream: IO[bytes], out: IO[bytes], *, max_bytes: int | None, what: str) -> tuple[str, int]:
    """Copy ``stream`` to ``out`` in chunks, hashing as it goes.

    Returns:
        The SHA-256 hex digest and the number of bytes copied.

    Raises:
        LimitExceeded: the stream is longer than ``max_bytes`` (checked before writing past it).
    """
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise over_limit(what, max_bytes)
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest(), size


def missing(sha256: str, store: BlobStore) -> BlobMissing:
    """The failure of an instance whose uploaded file is gone from ``store``."""
    return BlobMissing(
        f"its uploaded file {sha256} is no longer in the blob store ({store.url}); uploads are deleted "
        "once their jobs have finished (RADQ_BLOB_RETENTION_DAYS): submit the file again"
    )


class BlobStore(Protocol):
    """What API, workers and ``radq scp`` need of a content-addressed store."""

    @property
    def url(self) -> str:
        """Where the store is, for messages and logs (``file:///…`` or ``s3://…``)."""
        ...

    @property
    def spool_dir(self) -> Path:
        """A local directory for temporary files (a STOW-RS body's parts, S3 uploads in transit)."""
        ...

    def put(self, stream: IO[bytes], *, max_bytes: int | None = None, what: str = "file") -> tuple[str, int]:
        """Store ``stream`` under its SHA-256; storing the same bytes again keeps one copy.

        Returns:
            The SHA-256 hex digest and the number of bytes stored.

        Raises:
            LimitExceeded: the stream is longer than ``max_bytes``; nothing is stored.
            BlobStoreUnavailable: the store cannot be reached.
        """
        ...

    def adopt_all(self, files: Sequence[tuple[Path, str]]) -> None:
        """Store each file at ``path``, whose SHA-256 the caller computed as it wrote it (a
        staged upload); the files are gone afterwards. A file store moves them into place
        instead of copying them; S3, which pays a round trip per object, sends several at once.

        Raises:
            BlobStoreUnavailable: the store cannot be reached.
        """
        ...

    def local_file(self, sha256: str) -> Path | None:
        """The file on this host that holds the blob, if the store keeps blobs as local files.

        Not checked for existence (a read that finds nothing says so).
        """
        ...

    def fetch(self, sha256: str) -> AbstractContextManager[Path]:
        """A local file holding the blob for the duration of the block (a download, for S3).

        Raises:
            BlobMissing: the store has no such blob.
            BlobStoreUnavailable: the store cannot be reached.
        """
        ...

    def read(self, sha256: str) -> bytes:
        """The bytes of a small blob (a saliency PNG).

        Raises:
            BlobMissing: the store has no such blob.
        """
        ...

    def read_head(self, sha256: str, size: int) -> bytes:
        """The first ``size`` bytes of a blob (all of a shorter one): a ranged read on S3.

        Raises:
            BlobMissing: the store has no such blob.
            BlobStoreUnavailable: the store cannot be reached.
        """
        ...

    def delete(self, sha256: str, *, unless_written_after: datetime) -> bool:
        """Remove a blob unless it was stored (again) after ``unless_written_after``.

        An upload of the same bytes may be under way and not yet recorded: it stored
        them again, so a blob written after its last job finished is kept.

        Returns:
            Whether the blob is gone now (deleted, or already absent).
        """
        ...


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ConfigurationError(f"RADQ_BLOB_URL {url!r}: a file URL names an absolute path, file:///abs/dir")
    return Path(unquote(parts.path))


def check_blob_url(url: str) -> str:
    """``url`` if it names a store radq can open, else a ConfigurationError saying what is expected."""
    if not url or url.startswith("file:"):
        if url:
            _file_url_path(url)
        return url
    if url.startswith("s3://"):
        if not urlsplit(url).netloc:
            raise ConfigurationError(f"RADQ_BLOB_URL {url!r} names no bucket: s3://bucket/prefix")
        return url
    raise ConfigurationError(f"RADQ_BLOB_URL {url!r}: expected file:///abs/dir or s3://bucket/prefix")


def open_blob_store(settings: Settings) -> BlobStore:
    """The store ``RADQ_BLOB_URL`` names; default: the directory ``settings.resolved_blob_dir``.

    Raises:
        ConfigurationError: the URL is not understood, or boto3 is missing for ``s3://``.
    """
    url = check_blob_url(settings.blob_url)
    spool = (settings.home / "spool").resolve()
    if url.startswith("s3://"):
        try:
            from radq.blobs.s3 import S3BlobStore  # boto3 is an optional extra
        except ImportError as exc:
            raise ConfigurationError(
                f"RADQ_BLOB_URL {url!r} needs boto3: pip install 'radq[s3]' ({exc})"
            ) from None

        parts = urlsplit(url)
        return S3BlobStore(parts.netloc, parts.path.strip("/"), spool_dir=spool)
    from radq.blobs.file import FileBlobStore

    return FileBlobStore(_file_url_path(url) if url else settings.resolved_blob_dir)
