"""Turning uploaded files and archives into files to register.

Uploaded bytes, and the members of archives (uploaded or found on a submitted path),
are staged on this host's disk, checked against the size, member-count and
compression-ratio limits, and go into the blob store together once all are read
(:class:`Ingest`). Paths are walked by :mod:`api.paths` and :mod:`api.registration`.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, NamedTuple, Protocol, Self, cast

from api.disk import DiskReserve
from db.jobs import NewInstance
from db.status import StorageKind
from radq.blobs import BlobStore, copy_hashing, over_limit, room_for
from radq.errors import LimitExceeded, SubmissionError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ARCHIVE_SUFFIXES = (".zip", *TAR_SUFFIXES)


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _skipped_member(name: str) -> bool:
    """Archive clutter that is never a submitted image (macOS resource forks, dotfiles)."""
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith(".") or not base


RATIO_FLOOR = 64 * 1024
"""Expanded size below which no compression ratio is refused: small blank files compress absurdly well."""

_ZIP_ENCRYPTED = 0x1
"""General-purpose flag bit 0 of a zip entry: the member is encrypted."""

_READ_CHUNK = 1024 * 1024

UNZIP_THREADS = 4
"""Zip members expanded side by side: inflating, CRC-32, SHA-256 and writing all release the GIL."""


class Readable(Protocol):
    """All an archive is read through when it streams (a file, or a pipe from the upload)."""

    def read(self, size: int = -1, /) -> bytes: ...


class _CountingReader(io.BufferedIOBase):
    """A read-only view of a stream that counts the bytes read through it.

    ``on_read`` is called with each read's length, after counting; it may raise to stop
    the reading (the tar compression-ratio check).
    """

    def __init__(self, raw: Readable, on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.raw.read(-1 if size is None else size)
        self.count += len(data)
        if self.on_read is not None:
            self.on_read(len(data))
        return data


@dataclass(frozen=True)
class ArchiveLimits:
    """The limits an archive is expanded within (``RADQ_MAX_ARCHIVE_MEMBERS``,
    ``RADQ_MAX_COMPRESSION_RATIO``)."""

    max_members: int
    max_ratio: float = 200.0

    def check_members(self, name: str, count: int) -> None:
        if count > self.max_members:
            raise LimitExceeded(f"{name} has more than {self.max_members} members (RADQ_MAX_ARCHIVE_MEMBERS)")

    def check_ratio(self, what: str, expanded: int, compressed: int) -> None:
        """Refuse ``expanded`` bytes from ``compressed`` past ``max_ratio`` (zip bombs)."""
        if expanded < RATIO_FLOOR:
            return
        ratio = expanded / max(compressed, 1)
        if ratio > self.max_ratio:
            raise LimitExceeded(
                f"{what} expands {ratio:.1f}:1 ({expanded} bytes from {compressed} compressed), "
                f"over the limit of {self.max_ratio:g}:1 (RADQ_MAX_COMPRESSION_RATIO)"
            )


@contextmanager
def readable_archive(name: str) -> Iterator[None]:
    """Turn the errors of reading archive ``name`` into a :class:`SubmissionError` that names it."""
    try:
        yield
    # NotImplementedError: a zip compression method Python cannot decode.
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError) as exc:
        kind = "zip" if name.lower().endswith(".zip") else "tar"
        raise SubmissionError(f"{name}: not a readable {kind} archive ({exc})") from None


_END_OF_ARCHIVE: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
"""tarfile's error for a zero block: the archive's proper end (typeshed does not list it)."""
_NOTHING_LEFT: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
"""tarfile's error for no bytes at all where a header should be."""


class _StrictTarInfo(tarfile.TarInfo):
    """Refuses an archive that stops, or turns to garbage, between two members.

    ``tarfile`` ends its member list silently at a missing, short or damaged header after
    the first, as if the archive had ended there: an upload cut at a member boundary would
    lose its last files without a word. Only the end-of-archive blocks end it here.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            at = tarfile_.offset
            if at == 0 or isinstance(exc, _END_OF_ARCHIVE):
                raise  # tarfile's own answers: not a tar, or the proper end
            if isinstance(exc, _NOTHING_LEFT):
                raise tarfile.ReadError(
                    f"it stops at byte {at} without its end-of-archive blocks: the archive was cut short"
                ) from None
            raise tarfile.ReadError(
                f"the member header at byte {at} is damaged or cut short ({exc})"
            ) from None


def tar_members(name: str, stream: Readable, limits: ArchiveLimits) -> Iterator[tuple[str, IO[bytes]]]:
    """The regular members of the tar(.gz) ``stream``, in order, each as ``(name, reader)``
    to be read before the next is asked for; read with :func:`readable_archive` around it.

    Raises:
        LimitExceeded: more than ``max_members`` members, or the stream expands past
            ``max_ratio`` (checked as each read returns, so a bomb stops within one read).
    """
    count = 0
    compressed = _CountingReader(stream)
    expanded = 0  # headers and member data read out of the decompressed tar stream

    def expand(where: str, size: int) -> None:
        nonlocal expanded
        expanded += size
        limits.check_ratio(f"{name} (the tar stream, at member {where})", expanded, compressed.count)

    # Streaming mode ("r|*") reads members in order without seeking or listing first,
    # and reads the upload in small blocks, so compressed.count follows the
    # decompression closely. A plain tar reads about as many bytes as it yields.
    try:
        opened = tarfile.open(fileobj=compressed, mode="r|*", tarinfo=_StrictTarInfo)  # noqa: SIM115
    except TypeError:  # CPython reads a gzip header cut short with ord(b""): found by fuzzing
        raise tarfile.ReadError("its gzip header is cut short") from None
    with opened as archive:
        for info in archive:
            expand(info.name, tarfile.BLOCKSIZE)  # its header
            if not info.isfile():
                continue  # directories, links and devices carry no image
            member = archive.extractfile(info)
            if member is None:
                continue
            guarded = _CountingReader(member, on_read=partial(expand, info.name))
            if _skipped_member(info.name):
                # Skipping would decompress it anyway: read it through the check unstored.
                while guarded.read(_READ_CHUNK):
                    pass
                continue
            count += 1
            limits.check_members(name, count)
            yield f"{name}!{info.name}", cast(IO[bytes], guarded)  # read-only; readers only call read()


class SpooledFile(NamedTuple):
    """A file on local disk whose SHA-256 was computed as it was written."""

    name: str  # as the instance is named
    path: Path
    sha256: str
    size: int


INGEST_PREFIX = ".ingest-"
"""Name prefix of the directory a submission's files are staged in (see :class:`Ingest`)."""


class Ingest:
    """Collects the files of one submission, enforcing the configured limits.

    Nothing reaches the blob store before :meth:`commit`: each file is staged (spooled to
    this host's disk and hashed as it is written, or, already so spooled, noted), so a
    submission refused part-way (a damaged zip member, a limit passed at its last file)
    leaves nothing in the store. Use it as a context manager: leaving the block deletes
    whatever was staged and not committed. Staging costs no extra write: a file store takes
    staged files by a rename, and S3 sends them several at once.
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        max_bytes: int,
        max_members: int,
        max_ratio: float = 200.0,
        reserve: DiskReserve | None = None,
    ) -> None:
        self.blobs = blobs
        self.reserve = reserve
        self.max_bytes = max_bytes
        self.limits = ArchiveLimits(max_members, max_ratio)
        self.files: list[NewInstance] = []
        self.stored_bytes = 0  # staged or stored: what RADQ_MAX_UPLOAD_BYTES is checked against
        self._staged: list[SpooledFile] = []
        self._spool: Path | None = None  # made when a file is first written here
        self._written = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.discard()

    def _spool_path(self) -> Path:
        if self._spool is None:
            parent = self.blobs.spool_dir
            parent.mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix=INGEST_PREFIX, dir=parent))
        self._written += 1
        return self._spool / f"{self._written:07d}"

    def _stage(self, stream: IO[bytes], file_name: str) -> None:
        """Stage ``stream`` as the file ``file_name``, within what is left of the budget."""
        if self.reserve is not None:
            self.reserve.check(file_name)
        with room_for(file_name):
            path = self._spool_path()
            with path.open("wb") as out:
                left = self.max_bytes - self.stored_bytes
                sha, size = copy_hashing(stream, out, max_bytes=left, what=f"{file_name} (submission total)")
        staged = SpooledFile(file_name, path, sha, size)
        self._record([staged])
        self._staged.append(staged)

    def _check_budget(self, files: Sequence[SpooledFile]) -> None:
        total = self.stored_bytes
        for f in files:
            total += f.size
            if total > self.max_bytes:
                raise over_limit(f"{f.name} (submission total)", self.max_bytes - (total - f.size))

    def _record(self, files: Sequence[SpooledFile]) -> None:
        self.stored_bytes += sum(f.size for f in files)
        self.files.extend(NewInstance(f.name, StorageKind.BLOB, f.sha256, f.size) for f in files)

    def add_spooled(self, name: str, path: Path, sha256: str, size: int) -> None:
        """A file already spooled to disk and hashed, staged as it is; an archive (by its
        name) is expanded."""
        if is_archive_name(name):
            with path.open("rb") as stream:
                self.add_archive(name, stream)
            return
        self.add_spooled_files([SpooledFile(name, path, sha256, size)])

    def add_spooled_files(self, files: Sequence[SpooledFile]) -> None:
        """Files already spooled to disk and hashed (none an archive to expand), staged as
        they are: :meth:`commit` moves them into the store.

        Raises:
            LimitExceeded: they pass ``RADQ_MAX_UPLOAD_BYTES``.
        """
        self._check_budget(files)
        self._record(files)
        self._staged.extend(files)

    def commit(self) -> None:
        """Move every staged file into the blob store (S3: several at once).

        Raises:
            StorageFull: the store's disk has no room.
            BlobStoreUnavailable: S3 cannot be reached.
        """
        staged, self._staged = self._staged, []
        with room_for(f"the submission's {len(staged)} file(s)"):
            self.blobs.adopt_all([(f.path, f.sha256) for f in staged])

    def discard(self) -> None:
        """Forget what is staged and delete the files this ingest wrote and did not commit."""
        self._staged = []
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def add_upload(self, name: str, stream: IO[bytes]) -> None:
        """An uploaded file: an archive is expanded, anything else stored as one instance."""
        if is_archive_name(name):
            self.add_archive(name, stream)
        else:
            self._stage(stream, name)

    def add_archive(self, name: str, stream: IO[bytes]) -> None:
        """Store every regular member of a zip or tar(.gz) archive as its own instance.

        Members are stored by content hash, never extracted by name, so member names
        cannot escape anywhere (zip-slip).

        Raises:
            SubmissionError: the archive cannot be read, or a zip member is encrypted.
            LimitExceeded: it has more members than ``RADQ_MAX_ARCHIVE_MEMBERS``, expands
                past ``RADQ_MAX_UPLOAD_BYTES``, or expands more than
                ``RADQ_MAX_COMPRESSION_RATIO`` times its compressed size.
        """
        with readable_archive(name):
            if name.lower().endswith(".zip"):
                self._add_zip(name, stream)
            else:
                for member_name, member in tar_members(name, stream, self.limits):
                    self._stage(member, member_name)

    def _add_zip(self, name: str, stream: IO[bytes]) -> None:
        archive_size = stream.seek(0, io.SEEK_END)  # ZipFile seeks anyway: it starts at the end
        stream.seek(0)
        with zipfile.ZipFile(stream) as archive:
            members = [i for i in archive.infolist() if not i.is_dir() and not _skipped_member(i.filename)]
            self.limits.check_members(name, len(members))
            declared = sum(i.file_size for i in members)
            if declared > self.max_bytes - self.stored_bytes:
                raise LimitExceeded(
                    f"{name} expands to {declared} bytes, over the limit of {self.max_bytes} "
                    "(RADQ_MAX_UPLOAD_BYTES)"
                )
            if self.reserve is not None:
                self.reserve.check(f"{name} expanded", declared)
            for info in members:
                if info.flag_bits & _ZIP_ENCRYPTED:
                    raise SubmissionError(
                        f"{name}: member {info.filename} is encrypted; radq cannot read "
                        "password-protected archives"
                    )
                self.limits.check_ratio(f"{name}: member {info.filename}", info.file_size, info.compress_size)
            # Members can share compressed bytes (overlapping entries) or overstate them, so
            # the large members together must also keep to the ratio against the whole
            # archive. Honest archives always do: their compressed sizes add up to less.
            large = sum(i.file_size for i in members if i.file_size >= RATIO_FLOOR)
            self.limits.check_ratio(f"{name} (its members together)", large, archive_size)
            # The declared sizes checked above bound what is read, even when they lie:
            # CPython's ZipExtFile (Lib/zipfile.py, _read2 and _read1) reads at most
            # compress_size bytes of the archive and cuts its output at file_size, and
            # _update_crc raises BadZipFile (refused as unreadable) when the CRC-32 of
            # what it yielded does not match, as it won't for data cut short.
            self._unzip(archive, name, members)

    def _unzip(self, archive: zipfile.ZipFile, name: str, members: list[zipfile.ZipInfo]) -> None:
        """Stage ``members`` of ``archive``, :data:`UNZIP_THREADS` at a time, in their order.

        zipfile's open members read the archive under its lock (each its own position), so
        they may be read side by side; only ZipFile's count of open members is not guarded.
        """
        if not members:
            return
        counting = threading.Lock()

        def unzip(info: zipfile.ZipInfo, path: Path) -> SpooledFile:
            member_name = f"{name}!{info.filename}"
            with counting:
                member = archive.open(info)
            try:
                with room_for(member_name), path.open("wb") as out:
                    sha, size = copy_hashing(member, out, max_bytes=info.file_size, what=member_name)
            finally:
                with counting:
                    member.close()
            return SpooledFile(member_name, path, sha, size)

        with room_for(name):
            paths = [self._spool_path() for _ in members]
        with ThreadPoolExecutor(min(UNZIP_THREADS, len(members)), thread_name_prefix="radq-unzip") as pool:
            futures = [pool.submit(unzip, info, path) for info, path in zip(members, paths, strict=True)]
            try:
                staged = [future.result() for future in futures]
            except BaseException:
                for future in futures:  # the first error stands for the archive: stop the rest
                    future.cancel()
                raise
        self.add_spooled_files(staged)
