"""A worker process keeps the leases of the instances its messages hold, and only those."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from db.work import claim
from workers.leases import Leases

LEASE_S = 1  # renewed every third of a second


def _expiries(sessions: sessionmaker[Session], ids: list[int]) -> list[datetime]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Instance.lease_expires_at).where(Instance.id.in_(ids)).order_by(Instance.id)
            )
        )


def test_held_instances_keep_their_leases_and_released_ones_lapse(own_database_url: str) -> None:
    sessions = make_sessionmaker(make_engine(own_database_url))
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session, job_id=job.id, files=[NewInstance(f"{i}.dcm", StorageKind.PATH, "/x") for i in range(4)]
        )
        claim(session, job.id, ids, lease_seconds=LEASE_S, worker="w")
    first, second, finished = ids[:2], ids[2:3], ids[3:]
    claimed = _expiries(sessions, ids)
    leases = Leases(sessions, LEASE_S)
    try:
        with leases.holding(first), leases.holding(second):
            with transaction(sessions) as session:  # this one ends while held: no longer renewed
                session.execute(
                    update(Instance).where(Instance.id.in_(finished)).values(status=InstanceStatus.DONE)
                )
            with leases.holding(finished):
                time.sleep(3 * LEASE_S)  # long past the leases claimed
                renewed = _expiries(sessions, ids)
        released = _expiries(sessions, ids)
        time.sleep(LEASE_S)
        later = _expiries(sessions, ids)
    finally:
        leases.close()
    # Held for 3 s, renewed every 1/3 s: each lease now ends about 2.7 s after the claimed one.
    assert all(
        after - before > timedelta(seconds=2) for before, after in zip(claimed[:3], renewed[:3], strict=True)
    )
    assert renewed[3] == claimed[3]  # final while held: renewing leaves it alone
    assert later == released  # released: nothing renews them any more
