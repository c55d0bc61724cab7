"""A content-addressed file store: uploads are kept once, named by their SHA-256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from radq.errors import LimitExceeded

_CHUNK = 1024 * 1024


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    """Files under ``root/ab/cd/<sha256>``; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, stream: IO[bytes], *, max_bytes: int | None = None, what: str = "file") -> tuple[str, int]:
        """Copy ``stream`` into the store, hashing as it goes.

        Returns:
            The SHA-256 hex digest and the number of bytes stored.

        Raises:
            LimitExceeded: the stream is longer than ``max_bytes``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise LimitExceeded(
                            f"{what} is larger than the limit of {max_bytes} bytes "
                            "(RADQ_MAX_UPLOAD_BYTES)"
                        )
                    digest.update(chunk)
                    out.write(chunk)
            sha = digest.hexdigest()
            final = self.path_for(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, final)  # same content, same name: a re-upload is a no-op
            return sha, size
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
