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
import stat
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.exc import OperationalError

from api.ingest import Ingest, is_archive_name
from api.paths import inside_roots, walk_files
from api.state import AppState
from api.submit import notify_ended, publish
from db.jobs import NewInstance, mark_queued
from db.session import transaction
from db.sources import (
    SourceRef,
    cancel_sources,
    finish_source,
    leave_registering,
    record_batch,
    record_files,
    release_sources,
)
from db.status import SourceStatus, StorageKind
from radq.errors import SubmissionError, TransientError

log = logging.getLogger(__name__)

BATCH_FILES = 1000
"""Files registered per transaction (and published right after it)."""
CANCELLED_NOTE = "job cancelled during enumeration"


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
        files: list[SourceRef] = []
        walks: list[SourceRef] = []
        for source in sources:  # one stat each: 4,000 listed files, 4,000 stats
            (files if _listed_file(source) else walks).append(source)
        try:
            for start in range(0, len(files), BATCH_FILES):
                last = not walks and start + BATCH_FILES >= len(files)
                if not self._run_files(files[start : start + BATCH_FILES], unpublished, last=last):
                    self._cancel(files[start:])
                    break
            for n, source in enumerate(walks, 1):
                self._run_one(source, unpublished, last=n == len(walks))
        finally:
            self._queue(sources[0], unpublished, everything=True)

    def _run_files(self, sources: list[SourceRef], unpublished: list[int], *, last: bool) -> bool:
        """Register listed files (sources that are one plain file each) in one transaction.

        Returns:
            False when the job was cancelled (nothing registered), else True.
        """
        job_id = sources[0].job_id
        try:
            if self._stop.is_set():
                return True  # released in stop(); the next process registers them
            roots = [r.resolve() for r in self.state.settings.allowed_roots]
            rows = [(source, self._instances(Path(source.path), roots)) for source in sources]
            with transaction(self.state.sessions) as session:
                ids = record_files(session, job_id, rows)
            if ids is None:
                return False
            unpublished.extend(ids)
            published = self._publish(sources[0], unpublished, everything=last)
            with transaction(self.state.sessions) as session:
                mark_queued(session, published)
                notify = leave_registering(session, job_id)
            log.info("registered %d listed file(s) for job %s", len(sources), job_id)
            if notify:
                self._notify(notify)
        except TransientError as exc:
            log.warning("registration of %d files of job %s paused (%s); it resumes when their lease "
                        "expires", len(sources), job_id, exc)  # fmt: skip
        except OperationalError as exc:
            log.warning("registration of %d files of job %s paused: database unreachable (%s)",
                        len(sources), job_id, exc.orig)  # fmt: skip
        except Exception:  # a bug must not kill the pool thread silently
            log.exception("registration of %d files of job %s failed", len(sources), job_id)
        finally:
            with self._lock:
                self._active.difference_update(source.id for source in sources)
        return True

    def _cancel(self, sources: list[SourceRef]) -> None:
        """Close the listed files of a job cancelled before they were registered."""
        job_id = sources[0].job_id
        try:
            with transaction(self.state.sessions) as session:
                notify = cancel_sources(session, job_id, [source.id for source in sources])
            log.info("registration of job %s cancelled with %d listed file(s) left", job_id, len(sources))
            if notify:
                self._notify(notify)
        except (TransientError, OperationalError) as exc:
            log.warning("closing the cancelled registration of job %s failed (%s); retried when "
                        "the lease expires", job_id, exc)  # fmt: skip
        finally:
            with self._lock:
                self._active.difference_update(source.id for source in sources)

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
                    self._finish(source, SourceStatus.CANCELLED, CANCELLED_NOTE)
                    return
                unpublished.extend(ids)
                self._queue(source, unpublished)
        except OSError as exc:
            self._finish(source, SourceStatus.FAILED, f"enumeration stopped after {seen} files: {exc}")
            return
        # The job's last source: every instance queued before the job reads as registered.
        self._queue(source, unpublished, everything=last)
        self._finish(source, SourceStatus.DONE, None if seen else "no files found")

    def _queue(self, source: SourceRef, unpublished: list[int], *, everything: bool = False) -> None:
        """Publish the whole chunks among ``unpublished`` (all of it when ``everything``) and
        mark them queued."""
        published = self._publish(source, unpublished, everything=everything)
        if published:
            with transaction(self.state.sessions) as session:
                mark_queued(session, published)

    def _publish(self, source: SourceRef, unpublished: list[int], *, everything: bool = False) -> list[int]:
        """Publish the whole chunks among ``unpublished`` (all of it when ``everything``);
        returns the ids published, for the caller to mark queued in its next transaction."""
        chunk = self.state.settings.chunk_size
        count = len(unpublished) if everything else len(unpublished) - len(unpublished) % chunk
        if not count:
            return []
        ids = unpublished[:count]
        try:
            publish(self.state, source.job_id, ids, source.priority, queue=source.queue)
        except TransientError as exc:
            # Left pending: the maintenance loop publishes them once the broker is back.
            log.warning("%s", exc)
            return []
        finally:
            del unpublished[:count]
        return ids

    def _finish(self, source: SourceRef, status: SourceStatus, note: str | None) -> None:
        with transaction(self.state.sessions) as session:
            notify = finish_source(session, source.id, status, note)
        log.info("registration of %s for job %s: %s", source.path, source.job_id, status)
        if notify:
            self._notify(notify)

    def _notify(self, job_id: str) -> None:
        """Send the webhook of a job that ended at registration (everything failed or skipped)."""
        try:
            notify_ended(self.state, job_id)
        except TransientError as exc:
            log.warning("%s", exc)

    def _instances(self, item: os.DirEntry[str] | Path, roots: list[Path]) -> list[NewInstance]:
        """The instances one walked file becomes: one, an archive's members, or a recorded refusal."""
        path = Path(item) if isinstance(item, Path) else Path(item.path)
        try:
            resolved, info = path, None
            if isinstance(item, Path) or item.is_symlink():
                resolved = inside_roots(path, roots)
                info = resolved.stat()
                if stat.S_ISDIR(info.st_mode):
                    return []  # symlinked folders are not followed
            if is_archive_name(resolved.name):
                return self._archive_members(resolved)
            size = (info or item.stat()).st_size
            return [NewInstance(str(resolved), StorageKind.PATH, str(resolved), size)]
        except SubmissionError as exc:
            return [_refused(path, str(exc))]
        except OSError as exc:
            return [_refused(path, f"cannot read {path}: {exc.strerror or exc}")]

    def _archive_members(self, path: Path) -> list[NewInstance]:
        settings = self.state.settings
        with Ingest(
            self.state.blobs,
            max_bytes=settings.max_upload_bytes,
            max_members=settings.max_archive_members,
            max_ratio=settings.max_compression_ratio,
            reserve=self.state.reserve,
        ) as ingest:
            with path.open("rb") as stream:
                ingest.add_archive(str(path), stream)
            ingest.commit()
        return ingest.files


def _listed_file(source: SourceRef) -> bool:
    """A source that is one plain file, not yet started: registered with others in bulk."""
    return source.files_seen == 0 and not is_archive_name(source.path) and Path(source.path).is_file()


def _refused(path: Path, reason: str) -> NewInstance:
    return NewInstance(str(path), StorageKind.PATH, str(path), None, failure=reason)


def _batches(items: Iterator[os.DirEntry[str] | Path], size: int) -> Iterator[list[os.DirEntry[str] | Path]]:
    while batch := list(itertools.islice(items, size)):
        yield batch
