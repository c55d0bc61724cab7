"""The SCP's spool: received files stay on disk until the job that holds them is recorded.

Layout under the spool root (one SCP process per root, held by a lock file)::

    incoming/<tmp>.dcm                      being written, not yet part of a group
    groups/<group id>/<AE>/<SOPInstanceUID>.dcm   files of a group waiting for its job
    failed/<group id>/...                   groups whose submission was refused

A file is acknowledged to the sender only once it sits in a group directory, so a
process that dies finds every acknowledged file under ``groups/`` when it starts again.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

from radq.errors import ConfigurationError

PREAMBLE = b"\x00" * 128 + b"DICM"
"""The DICOM Part-10 preamble and prefix that open every file."""
_AE_PREFIX = "ae_"  # keeps an AE title such as ".." from naming a special directory
_MAX_NAME = 200  # file names stay under the usual 255-byte limit after quoting


def instance_name(calling_ae: str, sop_instance_uid: str) -> str:
    """The file name radq records for an instance received over DICOM."""
    return f"scp:{calling_ae}/{sop_instance_uid}.dcm"


@dataclass(frozen=True)
class Received:
    """One C-STORE dataset written to ``incoming/`` as a Part-10 file."""

    path: Path
    size: int
    calling_ae: str
    sop_instance_uid: str

    @property
    def name(self) -> str:
        return instance_name(self.calling_ae, self.sop_instance_uid)


class Spool:
    """Directories of received files; :meth:`open` takes the spool's lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.groups = root / "groups"
        self.failed = root / "failed"
        self._lock: IO[bytes] | None = None

    def open(self) -> None:
        """Create the directories, take the lock, and drop unacknowledged partial files.

        Raises:
            ConfigurationError: the spool cannot be created, or another process holds it.
        """
        try:
            for path in (self.incoming, self.groups, self.failed):
                path.mkdir(parents=True, exist_ok=True)
            lock = (self.root / ".lock").open("ab")
        except OSError as exc:
            raise ConfigurationError(f"cannot use {self.root} as the SCP spool: {exc}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ConfigurationError(
                f"the SCP spool {self.root} is in use by another process; give each `radq scp` "
                "its own RADQ_SCP_SPOOL_DIR"
            ) from None
        self._lock = lock
        for partial in self.incoming.iterdir():
            # Never acknowledged to a sender (it is only acknowledged once in a group).
            partial.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def receive(
        self, file_meta: FileMetaDataset, dataset: IO[bytes], *, calling_ae: str, sop_instance_uid: str
    ) -> Received:
        """Write a C-STORE dataset, as received, behind a preamble and file meta.

        The dataset's bytes are copied without being decoded, so compressed pixel data
        and the sender's encoding reach the worker unchanged.

        Raises:
            OSError: the file cannot be written (disk full, permissions).
        """
        fd, tmp = tempfile.mkstemp(dir=self.incoming, suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(PREAMBLE)
                write_file_meta_info(DicomFileLike(out), file_meta, enforce_standard=True)
                if isinstance(dataset, io.BytesIO):
                    with dataset.getbuffer() as view:  # no copy of a large dataset in memory
                        out.write(view)
                else:
                    dataset.seek(0)
                    shutil.copyfileobj(dataset, out)
                size = out.tell()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Received(Path(tmp), size, calling_ae, sop_instance_uid)

    def new_group_dir(self) -> Path:
        """A fresh group directory; names sort in creation order."""
        path = self.groups / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def adopt(self, received: Received, group_dir: Path) -> int | None:
        """Move a received file into a group.

        Returns:
            None for a new instance; for a resend of an instance the group already
            holds from that AE, the size of the file the new one replaced.
        """
        ae_dir = group_dir / (_AE_PREFIX + _encode(received.calling_ae))
        ae_dir.mkdir(exist_ok=True)
        target = ae_dir / (_encode(received.sop_instance_uid) + ".dcm")
        previous = target.stat().st_size if target.exists() else None
        os.replace(received.path, target)
        return previous

    def files(self, group_dir: Path) -> list[tuple[str, Path]]:
        """A group's files as (radq file name, path), in a stable order."""
        found = []
        for ae_dir in sorted(p for p in group_dir.iterdir() if p.is_dir()):
            calling_ae = unquote(ae_dir.name.removeprefix(_AE_PREFIX))
            for path in sorted(ae_dir.glob("*.dcm")):
                found.append((instance_name(calling_ae, unquote(path.name[: -len(".dcm")])), path))
        return found

    def leftover_groups(self) -> list[Path]:
        """Group directories a previous process left unsubmitted, oldest first."""
        return sorted(p for p in self.groups.iterdir() if p.is_dir())

    def discard(self, group_dir: Path) -> None:
        """Delete a group whose files are now in the blob store."""
        shutil.rmtree(group_dir, ignore_errors=True)

    def set_aside(self, group_dir: Path) -> Path:
        """Move a refused group to ``failed/`` for an operator to look at."""
        target = self.failed / group_dir.name
        os.replace(group_dir, target)
        return target


def _encode(text: str) -> str:
    """``text`` as one safe path component (reversible with ``unquote`` up to the cap)."""
    return quote(text, safe="")[:_MAX_NAME] or "_"
