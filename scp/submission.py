"""Recording each complete group of received files as a radq job, on one background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import InterfaceError, OperationalError

from api.ingest import Ingest
from api.state import AppState
from api.submit import submit
from radq.errors import BrokerUnavailable, SubmissionError, TransientError
from scp.batching import Batcher, Group
from scp.spool import Spool

log = logging.getLogger(__name__)

MAX_RETRY_SECONDS = 60.0
"""Longest wait between two attempts to record a group while the database is down."""


@dataclass
class Pending:
    """A group waiting for its job to be recorded."""

    path: Path
    label: str
    attempts: int = 0
    next_try: float = 0.0


class Submitter:
    """Takes complete groups from the :class:`Batcher` and submits each as one job.

    Jobs are recorded by ``api.submit.submit`` exactly as an HTTP upload would be: files
    into the blob store, instances into SQL, chunks onto the broker. A group's spool
    directory is deleted only once its job is recorded, so a group that cannot be
    recorded (database down) is retried, and one left by a crash is found by
    :meth:`recover`.
    """

    def __init__(
        self,
        state: AppState,
        spool: Spool,
        batcher: Batcher,
        *,
        models: Sequence[str],
        poll_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.spool = spool
        self.batcher = batcher
        self.models = list(models)
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._pending: list[Pending] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self) -> int:
        """Queue the groups an earlier process left in the spool; returns how many."""
        leftovers = self.spool.leftover_groups()
        for path in leftovers:
            self._pending.append(Pending(path, f"spool group {path.name} (left by an earlier run)"))
        return len(leftovers)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="radq-scp-submitter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (after the submission it may be doing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def flush(self) -> list[Path]:
        """Submit every group now, complete or not (call after :meth:`stop`).

        Returns:
            The spool directories that could not be recorded; the next start recovers them.
        """
        self._take(self.batcher.take_all())
        left = [item.path for item in self._pending if not self._submit(item)]
        self._pending = []
        return left

    def _take(self, groups: list[Group]) -> None:
        for group in groups:
            label = group.label
            if group.finished is None:  # a study may come from several senders
                label += f" (from {', '.join(sorted(group.calling_aes))})"
            self._pending.append(Pending(group.path, label))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(self.batcher.take_ready())
            now = self.clock()
            for item in [i for i in self._pending if i.next_try <= now]:
                if self._stop.is_set():
                    break
                if self._submit(item):
                    self._pending.remove(item)
                else:
                    item.attempts += 1
                    item.next_try = self.clock() + min(MAX_RETRY_SECONDS, 2.0**item.attempts)
            self._stop.wait(self.poll_seconds)

    def _submit(self, item: Pending) -> bool:
        """Record one group as a job. Returns False when it should be tried again later."""
        files = self.spool.files(item.path)
        if not files:
            self.spool.discard(item.path)
            return True

        def collect(ingest: Ingest) -> None:
            for name, path in files:
                with path.open("rb") as stream:
                    ingest.add_upload(name, stream)

        try:
            job_id = submit(self.state, collect, self.models)
        except BrokerUnavailable as exc:
            # The job, its instances and their files are recorded; only its messages are missing.
            log.error("%s: %s; its %d instances stay pending until re-queued", item.label, exc, len(files))
            self.spool.discard(item.path)
            return True
        except SubmissionError as exc:
            aside = self.spool.set_aside(item.path)
            log.error("%s: job refused (%s); its %d files are kept in %s", item.label, exc, len(files), aside)
            return True
        except (TransientError, OperationalError, InterfaceError, OSError) as exc:
            log.warning("%s: cannot record its job yet (%s); will retry", item.label, exc)
            return False
        except Exception:
            aside = self.spool.set_aside(item.path)
            log.exception("%s: unexpected error recording its job; its files are in %s", item.label, aside)
            return True
        log.info("job %s: %d instance(s) from %s", job_id, len(files), item.label)
        self.spool.discard(item.path)
        return True
