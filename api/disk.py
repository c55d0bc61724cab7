"""The free space uploads leave on the disk they are spooled to (``RADQ_MIN_FREE_BYTES``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from radq.errors import StorageFull

_MIB = 1024 * 1024


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / _MIB:.0f} MiB"


@dataclass(frozen=True)
class DiskReserve:
    """Keeps ``min_free`` bytes free on ``directory``'s disk while uploads arrive.

    The database, the logs and a file blob store often share that disk, and PostgreSQL
    stops when its disk fills; so an upload is refused while room is left, rather than
    when a write fails. A check is one ``statvfs``: a few microseconds a megabyte.
    """

    directory: Path
    min_free: int

    def check(self, what: str, incoming: int = 0) -> None:
        """Raises: StorageFull: ``incoming`` more bytes for ``what`` would leave less than
        ``min_free`` (with ``incoming`` 0: less is left already)."""
        if self.min_free <= 0:
            return
        free = self.free()
        if free - incoming >= self.min_free:
            return
        if incoming:
            raise StorageFull(
                f"this server's upload disk has {_size(free)} free and {what} takes {_size(incoming)}, "
                f"but {_size(self.min_free)} is kept free (RADQ_MIN_FREE_BYTES)"
            )
        raise StorageFull(
            f"this server's upload disk is down to {_size(free)} free while storing {what}, under the "
            f"{_size(self.min_free)} kept free (RADQ_MIN_FREE_BYTES)"
        )

    def free(self) -> int:
        """Bytes free on the disk (for an unprivileged writer)."""
        return shutil.disk_usage(self._existing()).free

    def _existing(self) -> Path:
        """The directory, or its nearest existing parent (the spool is made on first use)."""
        path = self.directory
        while not path.exists() and path != path.parent:
            path = path.parent
        return path
