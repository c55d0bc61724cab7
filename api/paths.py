"""Paths on shared storage: which ones a submission may name, and walking them.

Only paths under ``RADQ_ALLOWED_ROOTS`` (after resolving symlinks) are read. A walk
holds one directory listing per level, never the whole tree, and always visits files
in the same order, which is what lets an interrupted registration resume by count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from radq.errors import PathNotAllowed, SubmissionError


def resolve_submitted(
    raw: str, roots: Sequence[Path], *, resolved_roots: Sequence[Path] | None = None
) -> Path:
    """Check one submitted path and return it resolved.

    ``resolved_roots``: ``roots`` already resolved, by a caller that checks many paths.

    Raises:
        PathNotAllowed: path submissions are disabled, or the path (after resolving
            symlinks) is outside every allowed root.
        SubmissionError: the path is relative, contains NUL, does not exist, or cannot be
            looked up (its name is too long, a folder above it may not be searched).
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
    resolved = inside_roots(path, resolved_roots or [r.resolve() for r in roots])
    try:
        found = resolved.exists()
    except OSError as exc:  # a name too long, a folder radq may not search: not "missing"
        raise SubmissionError(f"{raw}: cannot be read ({exc.strerror})") from None
    if not found:
        raise SubmissionError(f"{raw}: no such file or directory")
    return resolved


def inside_roots(path: Path, resolved_roots: Sequence[Path]) -> Path:
    """``path`` resolved, if that is under one of the (already resolved) roots.

    Raises:
        PathNotAllowed: it resolves outside every root; the message names both paths.
    """
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in resolved_roots):
        shown = os.pathsep.join(str(r) for r in resolved_roots)
        where = f"{path} (resolves to {resolved})" if resolved != path else str(path)
        raise PathNotAllowed(f"{where} is outside the allowed roots {shown} (RADQ_ALLOWED_ROOTS)")
    return resolved


def walk_files(top: Path) -> Iterator[os.DirEntry[str] | Path]:
    """Every file under ``top`` (or ``top`` itself), depth first, names sorted.

    Hidden files and folders are left out; symlinked folders are not descended
    (a link loop cannot trap the walk), symlinked files are yielded for the caller
    to check against the allowed roots.

    Raises:
        OSError: a folder cannot be listed (permissions, removed mid-walk).
    """
    if not top.is_dir():
        yield top
        return
    with os.scandir(top) as listing:
        entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk_files(Path(entry.path))
        else:
            yield entry
