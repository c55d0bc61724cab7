"""A tar of local files, produced as it is read: folders upload without a temporary copy.

``radq submit`` sends a folder of more than :data:`radq.client.MAX_PARTS` files as one
tar part. Written to a temporary file first, a 2 GiB folder cost the client 2 GiB of disk
and the time to write it before the first byte left; :class:`TarReader` instead yields
the archive's bytes (headers from :mod:`tarfile`, then each file's bytes, read as the
upload asks for them), so the upload starts at once and the API, which expands a tar as
it arrives, stores the first files while the client still reads the last.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from radq.errors import RadqError

READ_BYTES = 1024 * 1024
"""Bytes of a file read at a time."""


class FileChanged(RadqError):
    """Raised when a file's size changes while it is being sent (the archive would be corrupt)."""


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


class TarReader(io.RawIOBase):
    """A read-only stream of the tar archive of ``files`` (``(name in the archive, path)``).

    Not seekable and of no known length: an HTTP client sends it chunked.

    Raises (from :meth:`read`):
        OSError: a file cannot be read.
        FileChanged: a file is shorter or longer than when its header was written.
    """

    def __init__(self, files: Sequence[tuple[str, Path]]) -> None:
        super().__init__()
        self._chunks = self._archive(files)
        self._pending = memoryview(b"")

    def _archive(self, files: Sequence[tuple[str, Path]]) -> Iterator[bytes]:
        # Only for gettarinfo; dereference: a linked file is sent as the file, as a part would be.
        builder = tarfile.TarFile(fileobj=io.BytesIO(), mode="w", dereference=True)
        for name, path in files:
            info = builder.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            sent = 0
            with path.open("rb") as f:
                while sent < info.size and (chunk := f.read(min(READ_BYTES, info.size - sent))):
                    sent += len(chunk)
                    yield chunk
                if sent != info.size or f.read(1):
                    raise FileChanged(f"{path} changed size while it was being uploaded; submit it again")
            yield _padding(info.size)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (fewer at a file's end); ``b""`` once the archive has ended."""
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = memoryview(chunk)
        n = len(self._pending) if size is None or size < 0 else min(size, len(self._pending))
        out, self._pending = self._pending[:n], self._pending[n:]
        return bytes(out)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
