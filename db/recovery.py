"""Recovering work the broker or a worker lost: expired leases and vanished messages.

The database says what must still happen; these queries find what nothing is doing.
Each one claims what it returns with a conditional UPDATE, so two API processes
running them at once never hand out the same instance twice.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Instance, Job, utcnow
from db.status import OPEN_JOB_STATUSES, InstanceStatus

BATCH = 10_000
"""Instances handled per call; the next maintenance round takes the rest."""


@dataclass
class Reaped:
    """What :func:`reap_expired_leases` did."""

    requeue: dict[str, list[int]] = field(default_factory=dict)
    """Instances to publish again, one per message, per job id (now ``pending``)."""
    failed: dict[str, list[int]] = field(default_factory=dict)
    """Instances given up on, per job id: their lease ran out ``max_lost`` times."""


def reap_expired_leases(session: Session, *, max_lost: int, limit: int = BATCH) -> Reaped:
    """Take back instances whose worker stopped renewing their lease (it died or hung).

    Each goes back to ``pending`` to be published on its own, or, once its lease has
    run out ``max_lost`` times, ends ``failed`` with that cause.
    """
    now = utcnow()
    expired = session.execute(
        select(Instance.id, Instance.job_id, Instance.lost_leases)
        .where(Instance.status == InstanceStatus.PROCESSING, Instance.lease_expires_at < now)
        .order_by(Instance.id)
        .limit(limit)
    ).all()
    reaped = Reaped()
    for instance_id, job_id, lost in expired:
        lost += 1
        give_up = lost >= max_lost
        reason = (
            f"gave up after its worker died or timed out {lost} times while processing this file "
            "(RADQ_MAX_LOST_LEASES); the file itself is the likely cause"
        )
        taken = session.execute(
            update(Instance)
            .where(
                Instance.id == instance_id,
                Instance.status == InstanceStatus.PROCESSING,
                Instance.lease_expires_at < now,
            )
            .values(
                status=InstanceStatus.FAILED if give_up else InstanceStatus.PENDING,
                reason=reason if give_up else None,
                lost_leases=lost,
                lease_expires_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if not getattr(taken, "rowcount", 0):
            continue  # finished or renewed meanwhile
        (reaped.failed if give_up else reaped.requeue).setdefault(job_id, []).append(instance_id)
    return reaped


def queued_before(session: Session, *, older_than_seconds: float, limit: int = 100_000) -> dict[int, str]:
    """Instances the database says are ``queued`` (a message carries them) for a while.

    Returns:
        instance id -> job id.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    live = select(Job.id).where(Job.status.in_(OPEN_JOB_STATUSES))
    rows = session.execute(
        select(Instance.id, Instance.job_id)
        .where(
            Instance.status == InstanceStatus.QUEUED, Instance.updated_at < cutoff, Instance.job_id.in_(live)
        )
        .order_by(Instance.id)
        .limit(limit)
    ).all()
    return {instance_id: job_id for instance_id, job_id in rows}


def take_back_unqueued(
    session: Session, instance_ids: Collection[int], *, older_than_seconds: float
) -> list[int]:
    """Move ``queued`` instances that no message carries back to ``pending``; returns those moved.

    Conditional on the state :func:`queued_before` saw, so an instance a worker claimed
    in between is left alone.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    moved: list[int] = []
    ids = sorted(instance_ids)
    for start in range(0, len(ids), 1000):
        rows = session.execute(
            update(Instance)
            .where(
                Instance.id.in_(ids[start : start + 1000]),
                Instance.status == InstanceStatus.QUEUED,
                Instance.updated_at < cutoff,
            )
            .values(status=InstanceStatus.PENDING)
            .returning(Instance.id)
            .execution_options(synchronize_session=False)
        ).scalars()
        moved.extend(rows)
    return sorted(moved)
