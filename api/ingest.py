"""Turning a submission (uploads, archives, paths) into files to register.

Uploaded bytes go into the blob store; files named by path are read in place, and
only from under the allowed roots.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from db.jobs import NewInstance
from db.status import StorageKind
from radq.blobs import BlobStore
from radq.errors import LimitExceeded, PathNotAllowed, SubmissionError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _skipped_member(name: str) -> bool:
    """Archive clutter that is never a submitted image (macOS resource forks, dotfiles)."""
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith(".") or not base


class Ingest:
    """Collects the files of one submission, enforcing the configured limits."""

    def __init__(self, blobs: BlobStore, *, max_bytes: int, max_members: int) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.files: list[NewInstance] = []
        self.stored_bytes = 0

    def _store(self, stream: IO[bytes], file_name: str) -> None:
        sha, size = self.blobs.put(
            stream, max_bytes=self.max_bytes - self.stored_bytes, what=f"{file_name} (submission total)"
        )
        self.stored_bytes += size
        self.files.append(NewInstance(file_name, StorageKind.BLOB, sha, size))

    def add_upload(self, name: str, stream: IO[bytes]) -> None:
        """An uploaded file: an archive is expanded, anything else stored as one instance."""
        if is_archive_name(name):
            self.add_archive(name, stream)
        else:
            self._store(stream, name)

    def add_archive(self, name: str, stream: IO[bytes]) -> None:
        """Store every regular member of a zip or tar(.gz) archive as its own instance.

        Members are stored by content hash, never extracted by name, so member names
        cannot escape anywhere (zip-slip).

        Raises:
            SubmissionError: the archive cannot be read.
            LimitExceeded: it has more members than ``RADQ_MAX_ARCHIVE_MEMBERS`` or
                expands past ``RADQ_MAX_UPLOAD_BYTES``.
        """
        try:
            if name.lower().endswith(".zip"):
                self._add_zip(name, stream)
            else:
                self._add_tar(name, stream)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            kind = "zip" if name.lower().endswith(".zip") else "tar"
            raise SubmissionError(f"{name}: not a readable {kind} archive ({exc})") from None

    def _check_members(self, name: str, count: int) -> None:
        if count > self.max_members:
            raise LimitExceeded(
                f"{name} has more than {self.max_members} members (RADQ_MAX_ARCHIVE_MEMBERS)"
            )

    def _add_zip(self, name: str, stream: IO[bytes]) -> None:
        with zipfile.ZipFile(stream) as archive:
            members = [i for i in archive.infolist() if not i.is_dir() and not _skipped_member(i.filename)]
            self._check_members(name, len(members))
            declared = sum(i.file_size for i in members)
            if declared > self.max_bytes - self.stored_bytes:
                raise LimitExceeded(
                    f"{name} expands to {declared} bytes, over the limit of {self.max_bytes} "
                    "(RADQ_MAX_UPLOAD_BYTES)"
                )
            for info in members:
                with archive.open(info) as member:
                    self._store(member, f"{name}!{info.filename}")

    def _add_tar(self, name: str, stream: IO[bytes]) -> None:
        count = 0
        # Streaming mode ("r|*") reads members in order without seeking or listing first.
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if not info.isfile() or _skipped_member(info.name):
                    continue  # directories, links and devices carry no image
                count += 1
                self._check_members(name, count)
                member = archive.extractfile(info)
                if member is not None:
                    self._store(member, f"{name}!{info.name}")

    def add_path(self, raw: str, roots: list[Path]) -> None:
        """A file or folder (recursively) on storage this server can read.

        Raises:
            PathNotAllowed: path submissions are disabled, or the path (after
                resolving symlinks) is outside every allowed root.
            SubmissionError: the path is relative or does not exist.
        """
        if not roots:
            raise PathNotAllowed(
                "path submissions are disabled on this server: set RADQ_ALLOWED_ROOTS "
                "to the directories radq may read"
            )
        if "\x00" in raw:
            raise SubmissionError(f"{raw!r}: paths cannot contain NUL bytes")
        path = Path(raw)
        if not path.is_absolute():
            raise SubmissionError(f"{raw}: paths must be absolute")
        resolved_roots = [r.resolve() for r in roots]
        resolved = _inside(path, resolved_roots)
        if not resolved.exists():
            raise SubmissionError(f"{raw}: no such file or directory")
        if resolved.is_dir():
            for dirpath, dirnames, filenames in os.walk(resolved):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for file_name in sorted(filenames):
                    if not file_name.startswith("."):
                        self._add_file(_inside(Path(dirpath) / file_name, resolved_roots))
        else:
            self._add_file(resolved)

    def _add_file(self, path: Path) -> None:
        if is_archive_name(path.name):
            with path.open("rb") as stream:
                self.add_archive(str(path), stream)
            return
        self.files.append(NewInstance(str(path), StorageKind.PATH, str(path), path.stat().st_size))


def _inside(path: Path, roots: list[Path]) -> Path:
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = os.pathsep.join(str(r) for r in roots)
        where = f"{path} (resolves to {resolved})" if resolved != path else str(path)
        raise PathNotAllowed(f"{where} is outside the allowed roots {shown} (RADQ_ALLOWED_ROOTS)")
    return resolved
