"""A large tree of real DICOM files for path-submission figures, made in seconds.

Every file is a hard link to a copy of one real CT slice (pydicom's ``CT_small.dcm``):
registration reads names and sizes, not content, so a link costs what a file costs
there, and 100,000 of them take no disk space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REAL_CT = Path(__file__).resolve().parent.parent / "radq" / "samples" / "real" / "CT_small.dcm"
"""The file every link points at (a copy of it, so the repository's file is never linked)."""
LINKS_PER_COPY = 10_000
"""Links per copy: far below any filesystem's per-inode link limit (ext4: 65,000)."""


def make_tree(root: Path, files: int, per_folder: int = 400) -> Path:
    """``files`` DICOM files under ``root``, ``per_folder`` per series folder; returns ``root``.

    The copies the links point at sit beside ``root`` as hidden files, outside the tree.
    """
    root.mkdir(parents=True)
    source = root
    for i in range(files):
        folder = root / f"series-{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir()
        if i % LINKS_PER_COPY == 0:
            source = root.parent / f".{root.name}-source-{i}.dcm"
            shutil.copy(REAL_CT, source)
        os.link(source, folder / f"{i:06d}.dcm")
    return root
