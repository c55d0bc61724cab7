"""Keeping recorded work moving: the API's maintenance loop and ``radq reconcile``.

The database is the source of truth; every round compares it with what is happening:

- path walks whose API process died are resumed (their lease expired);
- instances recorded but never published (the broker was down) are published;
- instances whose worker died or hung (their lease expired) are published again, one
  per message, so a file that kills workers cannot take its chunk-mates with it; after
  ``RADQ_MAX_LOST_LEASES`` such losses the file is failed with that cause;
- uploaded files that every job using them is done with are deleted from the blob store
  once ``RADQ_BLOB_RETENTION_DAYS`` have passed (:mod:`api.retention`);
- every ``RADQ_RECONCILE_SECONDS``, instances the database says are queued but that no
  message in Redis carries (Redis restarted without its data, a flushed queue), or only
  a message delivered more than a lease ago and never claimed (its worker died between
  taking the message and claiming it), are published again.

Every step claims its rows with a conditional UPDATE, so any number of API processes
can run the loop side by side.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis
from sqlalchemy.exc import OperationalError

from api.registration import Registrar
from api.retention import BlobSweeper
from api.state import AppState
from api.submit import enqueue, notify_ended
from db.recovery import queued_before, reap_expired_leases, take_back_unqueued
from db.session import transaction
from db.sources import claim_stale_sources, job_routes, stale_pending
from db.work import close_finished_jobs, open_jobs_with_nothing_left
from radq.errors import BrokerUnavailable, RadqError
from radq.queue import instance_ids_in_broker

log = logging.getLogger(__name__)

RECONCILE_GRACE_SECONDS = 10.0
"""Only instances queued at least this long are compared with the broker (publishing lag)."""


@dataclass
class RoundReport:
    """What one maintenance round did (counts of instances, or of sources)."""

    published_pending: int = 0
    reaped: int = 0
    failed_after_lost_leases: int = 0
    closed: int = 0
    blobs_deleted: int = 0
    reconciled: int | None = None  # None: not compared with the broker this round
    errors: list[str] = field(default_factory=list)


def reap(state: AppState) -> tuple[int, int]:
    """Send again, one per message, instances whose lease expired; fail the repeat offenders.

    Returns:
        (instances re-published, instances failed).
    """
    with transaction(state.sessions) as session:
        reaped = reap_expired_leases(session, max_lost=state.settings.max_lost_leases)
    # Jobs these failures finish are closed by close_forgotten in the same round.
    _publish(state, reaped.requeue, "lost their worker; sending each on its own", chunk_size=1)
    return sum(map(len, reaped.requeue.values())), sum(map(len, reaped.failed.values()))


def reconcile(state: AppState, *, grace_seconds: float = RECONCILE_GRACE_SECONDS) -> int:
    """Publish again the queued instances that no message in the broker carries.

    Returns:
        How many instances were published again.
    """
    settings = state.settings
    with state.sessions() as session:
        queued = queued_before(session, older_than_seconds=grace_seconds)
        routes = job_routes(session, list(set(queued.values())))
    if not queued:
        return 0
    # Every queue these jobs use (model.<name>, gpu, RADQ_QUEUE...), not only RADQ_QUEUE.
    queues = {q or settings.queue for _, q in routes.values()}
    try:
        # A delivery older than a lease whose instances are still queued lost its worker
        # before the claim (killed right after taking the message): send them again now
        # rather than after kombu's visibility timeout (an hour by default).
        carried = instance_ids_in_broker(settings.broker_url, queues, delivered_within=settings.lease_seconds)
    except (redis.RedisError, OSError) as exc:
        names = ", ".join(sorted(queues))
        raise BrokerUnavailable(f"cannot read the queues {names} from the broker: {exc}") from None
    missing = [i for i in queued if i not in carried]
    if not missing:
        return 0
    with transaction(state.sessions) as session:
        moved = take_back_unqueued(session, missing, older_than_seconds=grace_seconds)
    by_job: dict[str, list[int]] = {}
    for instance_id in moved:
        by_job.setdefault(queued[instance_id], []).append(instance_id)
    _publish(state, by_job, "were queued in no live message; publishing them again")
    return len(moved)


def close_forgotten(state: AppState) -> int:
    """Close jobs whose instances are all final but that are still open; returns how many."""
    with transaction(state.sessions) as session:
        ids = open_jobs_with_nothing_left(session)
        notify = close_finished_jobs(session, ids) if ids else []
    for job_id in notify:
        notify_ended(state, job_id)
    return len(ids)


def publish_pending(state: AppState) -> int:
    """Publish instances recorded but never published (the broker was down)."""
    with transaction(state.sessions) as session:
        waiting = stale_pending(session, older_than_seconds=state.settings.requeue_after_seconds)
    _publish(state, waiting, "were never queued; publishing them")
    return sum(map(len, waiting.values()))


def _publish(
    state: AppState, by_job: dict[str, list[int]], why: str, *, chunk_size: int | None = None
) -> None:
    """Publish each job's instances to that job's queue at its priority."""
    if not by_job:
        return
    with state.sessions() as session:
        routes = job_routes(session, list(by_job))
    for job_id, ids in by_job.items():
        log.warning("job %s: %d instance(s) %s", job_id, len(ids), why)
        priority, queue = routes[job_id]
        enqueue(state, job_id, ids, priority, queue=queue, chunk_size=chunk_size)


class Maintenance:
    """The loop every API process runs beside its requests."""

    def __init__(self, state: AppState, registrar: Registrar) -> None:
        self.state = state
        self.registrar = registrar
        self.sweeper = BlobSweeper(state)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="radq-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            due = time.monotonic() - self._last_reconcile >= self.state.settings.reconcile_seconds
            report = self.run_once(reconcile_broker=due)
            if report.reconciled is not None:
                self._last_reconcile = time.monotonic()
            for error in report.errors:
                log.warning("maintenance: %s", error)
            self._stop.wait(self.state.settings.maintenance_seconds)

    def run_once(self, *, reconcile_broker: bool = True) -> RoundReport:
        """One round; each step runs even when another failed (a service down is reported)."""
        report = RoundReport()

        def published() -> None:
            report.published_pending = publish_pending(self.state)

        def reaped() -> None:
            report.reaped, report.failed_after_lost_leases = reap(self.state)

        def closed() -> None:
            report.closed = close_forgotten(self.state)

        def swept() -> None:
            report.blobs_deleted = self.sweeper.run_once().blobs_deleted

        def reconciled() -> None:
            report.reconciled = reconcile(self.state)

        steps = [self._resume_sources, published, reaped, closed, swept]
        for step in [*steps, reconciled] if reconcile_broker else steps:
            try:
                step()
            except OperationalError as exc:
                report.errors.append(f"database unreachable: {exc.orig}")
            except RadqError as exc:
                report.errors.append(str(exc))
            except Exception as exc:  # the loop must outlive a bug in one step
                log.exception("maintenance step failed")
                report.errors.append(f"{type(exc).__name__}: {exc}")
        return report

    def _resume_sources(self) -> None:
        with transaction(self.state.sessions) as session:
            stale = claim_stale_sources(session, lease_seconds=self.state.settings.registration_lease_seconds)
        if stale:
            log.info("resuming %d abandoned registration(s)", len(stale))
            self.registrar.register(stale)
