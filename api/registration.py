"""Enumerating path submissions in the background, and keeping recorded work queued.

``POST /v1/jobs`` with paths records the job and its sources and returns; a
:class:`Registrar` thread then walks each source, inserts its files in batches and
publishes their chunks as it goes, so the first chunks are being inferred while the
walk is still running and memory stays flat whatever the archive's size.

Sources whose API process died are handed back to a registrar by the maintenance
loop (:mod:`api.maintenance`) once their lease expires.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.exc import OperationalError

from api.ingest import Ingest, is_archive_name
from api.paths import inside_roots, walk_files
from api.state import AppState
from api.submit import enqueue, notify_ended
from db.jobs import NewInstance
from db.session import transaction
from db.sources import SourceRef, finish_source, record_batch, release_sources
from db.status import SourceStatus, StorageKind
from radq.errors import SubmissionError, TransientError

log = logging.getLogger(__name__)

BATCH_FILES = 1000
"""Files registered per transaction (and published right after it)."""


class Registrar:
    """Background enumeration of path submissions for one API process."""

    def __init__(self, state: AppState, *, threads: int = 2) -> None:
        self.state = state
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="radq-register")
        self._stop = threading.Event()
        self._active: set[int] = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Stop walking; unfinished sources are released for the next process to resume."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = sorted(self._active)
        if left:
            try:
                with transaction(self.state.sessions) as session:
                    release_sources(session, left)
            except OperationalError:
                log.warning("could not release sources %s; they resume when their lease expires", left)

    def register(self, sources: Sequence[SourceRef]) -> None:
        """Start walking these sources (their leases are already held by this process).

        The sources of one job are walked one after the other by one thread, which
        publishes their instances in full chunks: a job of 10,000 single-file paths
        becomes 157 messages of 64, not 10,000 messages of one.
        """
        by_job: dict[str, list[SourceRef]] = {}
        for source in sources:
            by_job.setdefault(source.job_id, []).append(source)
            with self._lock:
                self._active.add(source.id)
        for group in by_job.values():
            self._pool.submit(self._run, group)

    # -- the walk -------------------------------------------------------------------

    def _run(self, sources: list[SourceRef]) -> None:
        unpublished: list[int] = []
        try:
            for n, source in enumerate(sources, 1):
                self._run_one(source, unpublished, last=n == len(sources))
        finally:
            self._publish(sources[0], unpublished, everything=True)

    def _run_one(self, source: SourceRef, unpublished: list[int], *, last: bool) -> None:
        try:
            self._walk(source, unpublished, last=last)
        except TransientError as exc:
            log.warning("registration of %s paused (%s); it resumes when its lease expires", source.path, exc)
        except OperationalError as exc:
            log.warning("registration of %s paused: database unreachable (%s)", source.path, exc.orig)
        except Exception:  # a bug must not kill the pool thread silently
            log.exception("registration of %s (job %s) failed", source.path, source.job_id)
        finally:
            with self._lock:
                self._active.discard(source.id)

    def _walk(self, source: SourceRef, unpublished: list[int], *, last: bool) -> None:
        settings = self.state.settings
        roots = [r.resolve() for r in settings.allowed_roots]
        seen = source.files_seen
        lease = settings.registration_lease_seconds
        log.info("registering %s for job %s (from file %d)", source.path, source.job_id, seen)
        try:
            files = itertools.islice(walk_files(Path(source.path)), source.files_seen, None)
            for batch in _batches(files, BATCH_FILES):
                if self._stop.is_set():
                    return  # released in stop(); the next process resumes after `seen`
                rows = [row for item in batch for row in self._instances(item, roots)]
                seen += len(batch)
                with transaction(self.state.sessions) as session:
                    ids = record_batch(session, source, rows, files_seen=seen, lease_seconds=lease)
                if ids is None:
                    self._finish(source, SourceStatus.CANCELLED, "job cancelled during enumeration")
                    return
                unpublished.extend(ids)
                self._publish(source, unpublished)
        except OSError as exc:
            self._finish(source, SourceStatus.FAILED, f"enumeration stopped after {seen} files: {exc}")
            return
        # The job's last source: every instance queued before the job reads as registered.
        self._publish(source, unpublished, everything=last)
        self._finish(source, SourceStatus.DONE, None if seen else "no files found")

    def _publish(self, source: SourceRef, unpublished: list[int], *, everything: bool = False) -> None:
        """Publish the whole chunks among ``unpublished`` (all of it when ``everything``)."""
        chunk = self.state.settings.chunk_size
        count = len(unpublished) if everything else len(unpublished) - len(unpublished) % chunk
        if not count:
            return
        ids = unpublished[:count]
        del unpublished[:count]
        try:
            enqueue(self.state, source.job_id, ids, source.priority, queue=source.queue)
        except TransientError as exc:
            # Recorded as pending: the maintenance loop publishes them once the broker is back.
            log.warning("%s", exc)

    def _finish(self, source: SourceRef, status: SourceStatus, note: str | None) -> None:
        with transaction(self.state.sessions) as session:
            notify = finish_source(session, source.id, status, note)
        log.info("registration of %s for job %s: %s", source.path, source.job_id, status)
        if notify:
            try:
                notify_ended(self.state, notify)
            except TransientError as exc:
                log.warning("%s", exc)

    def _instances(self, item: os.DirEntry[str] | Path, roots: list[Path]) -> list[NewInstance]:
        """The instances one walked file becomes: one, an archive's members, or a recorded refusal."""
        path = Path(item) if isinstance(item, Path) else Path(item.path)
        try:
            resolved = path
            if isinstance(item, Path) or item.is_symlink():
                resolved = inside_roots(path, roots)
                if resolved.is_dir():
                    return []  # symlinked folders are not followed
            if is_archive_name(resolved.name):
                return self._archive_members(resolved)
            size = (resolved.stat() if isinstance(item, Path) else item.stat()).st_size
            return [NewInstance(str(resolved), StorageKind.PATH, str(resolved), size)]
        except SubmissionError as exc:
            return [_refused(path, str(exc))]
        except OSError as exc:
            return [_refused(path, f"cannot read {path}: {exc.strerror or exc}")]

    def _archive_members(self, path: Path) -> list[NewInstance]:
        settings = self.state.settings
        ingest = Ingest(
            self.state.blobs,
            max_bytes=settings.max_upload_bytes,
            max_members=settings.max_archive_members,
            max_ratio=settings.max_compression_ratio,
        )
        with path.open("rb") as stream:
            ingest.add_archive(str(path), stream)
        return ingest.files


def _refused(path: Path, reason: str) -> NewInstance:
    return NewInstance(str(path), StorageKind.PATH, str(path), None, failure=reason)


def _batches(items: Iterator[os.DirEntry[str] | Path], size: int) -> Iterator[list[os.DirEntry[str] | Path]]:
    while batch := list(itertools.islice(items, size)):
        yield batch
