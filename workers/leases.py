"""Keeping the leases of the instances a worker process holds alive while it processes them.

A lease much shorter than a chunk's work, renewed by a background thread, lets the
reaper notice a dead or hung worker within one lease, while a message redelivered by
the broker (a visibility timeout shorter than the work) finds the instances still held
and does nothing: no double inference.

One thread per process renews every instance its messages hold, in one transaction per
period. A thread per message cost a one-file message a thread start and join (0.15 ms of
CPU), and 16 small messages in hand ran 16 threads, each with a transaction of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.session import transaction
from db.work import renew_leases

log = logging.getLogger(__name__)

RENEW_BATCH = 1000
"""Instances per UPDATE (a bound parameter each; SQLite allows 32,766 per statement)."""


class Leases:
    """Renews the leases of the instances held (:meth:`holding`) every third of ``lease_seconds``."""

    def __init__(self, sessions: sessionmaker[Session], lease_seconds: int) -> None:
        self._sessions = sessions
        self._lease_seconds = lease_seconds
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, instance_ids: Sequence[int]) -> Iterator[None]:
        """Keep the leases of ``instance_ids`` (claimed by this process) alive while inside."""
        ids = set(instance_ids)
        with self._lock:
            if self._thread is None:  # started on first use: after any fork
                self._thread = threading.Thread(target=self._run, name="radq-lease", daemon=True)
                self._thread.start()
            self._held |= ids
        try:
            yield
        finally:
            with self._lock:
                self._held -= ids

    def close(self) -> None:
        """Stop renewing (tests and orderly shutdown); leases held lapse on their own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_seconds / 3):
            with self._lock:
                ids = sorted(self._held)
            if ids:
                self._renew(ids)

    def _renew(self, ids: list[int]) -> None:
        try:
            with transaction(self._sessions) as session:
                for start in range(0, len(ids), RENEW_BATCH):
                    renew_leases(session, ids[start : start + RENEW_BATCH], lease_seconds=self._lease_seconds)
        except OperationalError as exc:
            log.warning("could not renew %d lease(s) (database unreachable): %s", len(ids), exc.orig)
