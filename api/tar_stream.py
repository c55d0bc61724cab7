"""A tar (or tar.gz) upload expanded into member files while its bytes still arrive.

A form upload's parser pushes each part's bytes as they come; :mod:`tarfile` pulls them.
:class:`TarExpansion` joins the two with a bounded in-memory pipe and a thread of its own
that reads the tar from it, writing each member to a file in the request's spool, hashed
as it is written. So an archive's bytes reach the disk once (its members, which the file
store then takes by a rename), not twice (the archive, then each member read back out of
it), and expanding overlaps the upload instead of following it. A zip cannot be read this
way: its directory is at its end.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from api.disk import DiskReserve
from api.ingest import ArchiveLimits, SpooledFile, readable_archive, tar_members
from radq.blobs import CHUNK, copy_hashing, room_for
from radq.errors import RadqError

PIPE_BYTES = 4 * 1024 * 1024
"""Upload bytes held in memory ahead of the expanding thread; the parser waits beyond it."""


class _Aborted(RadqError):
    """Raised in the expanding thread when the request ends before its archive does."""


class _Pipe:
    """Bytes written by one thread and read by another; ``write`` waits while
    :data:`PIPE_BYTES` are unread, ``read`` while none are."""

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._unread = 0
        self._closed = False
        self._aborted = False
        self._ready = threading.Condition()

    def write(self, data: bytes | memoryview) -> None:
        """Raises: _Aborted: the reader stopped (see :meth:`abort`)."""
        with self._ready:
            while self._unread >= PIPE_BYTES and not self._aborted:
                self._ready.wait()
            if self._aborted:
                raise _Aborted("the archive is no longer being read")
            self._chunks.append(memoryview(data))
            self._unread += len(data)
            self._ready.notify_all()

    def close(self) -> None:
        """No more bytes will come: reads past the last return ``b""``."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def abort(self) -> None:
        """Stop both sides: waiting and later reads and writes raise :class:`_Aborted`."""
        with self._ready:
            self._aborted = True
            self._ready.notify_all()

    def read(self, size: int | None = -1) -> bytes:
        with self._ready:
            while not self._chunks and not self._closed and not self._aborted:
                self._ready.wait()
            if self._aborted:
                raise _Aborted("the upload ended before the archive did")
            if not self._chunks:
                return b""
            head = self._chunks[0]
            if size is None or size < 0 or size >= len(head):
                self._chunks.popleft()
                out = bytes(head)
            else:
                self._chunks[0] = head[size:]
                out = bytes(head[:size])
            self._unread -= len(out)
            self._ready.notify_all()
            return out


class TarExpansion:
    """Expands one tar part into ``directory`` as it is written, in a thread of its own.

    Feed it with :meth:`write`; :meth:`close` once the part has ended returns the members.
    An error of the archive (unreadable, over a limit) is raised by the next
    :meth:`write` or by :meth:`close`, in the thread that feeds it.

    Args:
        name: the archive's file name, which prefixes its members' names.
        directory: where the member files go (made here, in the request's spool).
        limits: members and compression ratio allowed.
        max_bytes: the most its members may hold together (what is left of
            ``RADQ_MAX_UPLOAD_BYTES`` for the submission).
        reserve: the free space to leave on the spool's disk, checked before each member.
    """

    def __init__(
        self,
        name: str,
        directory: Path,
        limits: ArchiveLimits,
        *,
        max_bytes: int,
        reserve: DiskReserve | None = None,
    ) -> None:
        self.name = name
        self.reserve = reserve
        self.directory = directory
        with room_for(name):
            directory.mkdir()
        self.limits = limits
        self.max_bytes = max_bytes
        self.members: list[SpooledFile] = []
        self.stored = 0
        self._pipe = _Pipe()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._expand, name="radq-tar-expand", daemon=True)
        self._thread.start()

    def _expand(self) -> None:
        try:
            with readable_archive(self.name):
                members = tar_members(self.name, self._pipe, self.limits)
                for number, (member_name, reader) in enumerate(members):
                    if self.reserve is not None:
                        self.reserve.check(member_name)
                    path = self.directory / f"{number:07d}"
                    with room_for(member_name), path.open("wb") as out:  # a full disk is not a bad archive
                        sha, size = copy_hashing(
                            reader, out, max_bytes=self.max_bytes - self.stored,
                            what=f"{member_name} (submission total)",
                        )  # fmt: skip
                    self.stored += size
                    self.members.append(SpooledFile(member_name, path, sha, size))
            # tarfile stops at the end-of-archive blocks; the padding after them still
            # comes, and the parser must not wait on a pipe nobody reads.
            while self._pipe.read(CHUNK):
                pass
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the feeding thread, which answers the request
            self._error = exc
            self._pipe.abort()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview) -> None:
        """The archive's next bytes.

        Raises:
            SubmissionError: the archive cannot be read.
            LimitExceeded: it breaks a limit.
        """
        self._raise_error()
        try:
            self._pipe.write(data)
        except _Aborted:
            self._raise_error()
            raise

    def close(self) -> list[SpooledFile]:
        """The members, once every one is on disk (the part has ended).

        Raises:
            SubmissionError, LimitExceeded: as :meth:`write`.
        """
        self._pipe.close()
        self._thread.join()
        self._raise_error()
        return self.members

    def abort(self) -> None:
        """Stop expanding (the request failed); returns once the thread has."""
        self._pipe.abort()
        self._thread.join()
