"""Blobs as files under ``root/ab/cd/<sha256>`` on a disk API and workers share."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

from radq.blobs import copy_hashing, missing


class FileBlobStore:
    """A directory; writes are atomic (temp file + rename), reads happen in place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def url(self) -> str:
        return self.root.as_uri() if self.root.is_absolute() else str(self.root)

    @property
    def spool_dir(self) -> Path:
        return self.root  # the parts of a STOW-RS body land on the disk that will keep them

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, stream: IO[bytes], *, max_bytes: int | None = None, what: str = "file") -> tuple[str, int]:
        """Copy ``stream`` into the store, hashing as it goes (see :class:`radq.blobs.BlobStore`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                sha, size = copy_hashing(stream, out, max_bytes=max_bytes, what=what)
            final = self.path_for(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Same content, same name: a re-upload is a no-op, except that the fresh file's
            # mtime tells the retention sweep an upload of it may not be recorded yet.
            os.replace(tmp_name, final)
            return sha, size
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _adopt(self, path: Path, sha256: str) -> None:
        final = self.path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)  # the spool is in the store's own directory: a rename, fresh mtime

    def adopt_all(self, files: Sequence[tuple[Path, str]]) -> None:
        for path, sha256 in files:  # renames: nothing to gain from threads
            self._adopt(path, sha256)

    def local_file(self, sha256: str) -> Path | None:
        return self.path_for(sha256)

    @contextmanager
    def fetch(self, sha256: str) -> Iterator[Path]:
        path = self.path_for(sha256)
        if not path.is_file():
            raise missing(sha256, self)
        yield path

    def read(self, sha256: str) -> bytes:
        try:
            return self.path_for(sha256).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise missing(sha256, self) from None

    def read_head(self, sha256: str, size: int) -> bytes:
        try:
            with self.path_for(sha256).open("rb") as f:
                return f.read(size)
        except (FileNotFoundError, IsADirectoryError):
            raise missing(sha256, self) from None

    def delete(self, sha256: str, *, unless_written_after: datetime) -> bool:
        path = self.path_for(sha256)
        try:
            if path.stat().st_mtime > unless_written_after.timestamp():
                return False
            path.unlink()
        except FileNotFoundError:
            pass
        return True
