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


def _member(name: str, path: Path) -> tarfile.TarInfo:
    """The header of ``path`` as member ``name``: its size, mode and whole-second mtime (a
    float mtime would add a PAX record of varying length); a linked file is sent as the file
    it points to, as a part would be.

    Raises:
        OSError: the file cannot be read.
    """
    st = path.stat()
    info = tarfile.TarInfo(name)
    info.size = st.st_size
    info.mtime = int(st.st_mtime)
    info.mode = st.st_mode & 0o7777
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)


class TarReader(io.RawIOBase):
    """A read-only stream of the tar archive of ``files`` (``(name in the archive, path)``).

    Its length is known before the first byte (every file is looked at once), so an HTTP
    client sends a Content-Length and the API refuses an archive over its limit at once.
    It reads forward only: :meth:`seek` may move only where nothing is read (httpx asks
    for the length by seeking to the end and back).

    Raises:
        OSError: a file cannot be read (when made, or from :meth:`read`).
        FileChanged: from :meth:`read`: a file's size is not what it was when looked at.
    """

    def __init__(self, files: Sequence[tuple[str, Path]]) -> None:
        super().__init__()
        self._files = list(files)
        sizes = []
        length = len(END_OF_ARCHIVE)
        for name, path in self._files:
            info = _member(name, path)
            sizes.append(info.size)
            length += len(_header(info)) + info.size + len(_padding(info.size))
        self._sizes = sizes
        self.length = length
        self._chunks = self._archive()
        self._pending = memoryview(b"")
        self._sent = 0
        self._position = 0

    def _archive(self) -> Iterator[bytes]:
        for (name, path), size in zip(self._files, self._sizes, strict=True):
            info = _member(name, path)
            if info.size != size:
                raise FileChanged(f"{path} changed size while it was being uploaded; submit it again")
            yield _header(info)
            sent = 0
            with path.open("rb") as f:
                while sent < size and (chunk := f.read(min(READ_BYTES, size - sent))):
                    sent += len(chunk)
                    yield chunk
                if sent != size or f.read(1):
                    raise FileChanged(f"{path} changed size while it was being uploaded; submit it again")
            yield _padding(size)
        yield END_OF_ARCHIVE

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # only to learn the length: see seek()

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.length}[whence]
        self._position = base + offset
        return self._position

    def read(self, size: int | None = -1, /) -> bytes:
        """Up to ``size`` bytes (fewer at a file's end); ``b""`` once the archive has ended.

        Raises:
            io.UnsupportedOperation: the position was moved away from where reading stopped.
        """
        if self._position != self._sent:
            raise io.UnsupportedOperation(
                f"the tar is read forward only (at {self._sent}, asked {self._position})"
            )
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = memoryview(chunk)
        n = len(self._pending) if size is None or size < 0 else min(size, len(self._pending))
        out, self._pending = self._pending[:n], self._pending[n:]
        self._sent += n
        self._position = self._sent
        return bytes(out)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
