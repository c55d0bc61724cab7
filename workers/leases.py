"""Keeping the leases of a chunk's instances alive while the worker processes it.

A lease much shorter than a chunk's work, renewed by a background thread, lets the
reaper notice a dead or hung worker within one lease, while a message redelivered by
the broker (a visibility timeout shorter than the work) finds the instances still held
and does nothing: no double inference.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import TracebackType

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.session import transaction
from db.work import renew_leases

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renew the leases of ``instance_ids`` every third of ``lease_seconds`` until closed."""

    def __init__(
        self, sessions: sessionmaker[Session], instance_ids: Sequence[int], lease_seconds: int
    ) -> None:
        self._sessions = sessions
        self._ids = list(instance_ids)
        self._lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radq-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_seconds / 3):
            try:
                with transaction(self._sessions) as session:
                    held = renew_leases(session, self._ids, lease_seconds=self._lease_seconds)
            except OperationalError as exc:
                log.warning("could not renew leases (database unreachable): %s", exc.orig)
                continue
            if held == 0:
                return  # every instance is final
