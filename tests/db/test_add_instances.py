"""Registering instances in bulk: the ids handed back are the pending ones, in file order."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind


@pytest.mark.parametrize("count", [3, 2500])  # one short INSERT ... RETURNING; batches of 1,000
def test_ids_are_the_pending_instances_in_the_order_of_the_files(database_url: str, count: int) -> None:
    # Every seventh file is refused at registration.
    files = [
        NewInstance(
            f"f{n:04d}.dcm",
            StorageKind.PATH,
            f"/data/f{n:04d}.dcm",
            100 + n,
            failure="not DICOM" if n % 7 == 0 else None,
        )  # fmt: skip
        for n in range(count)
    ]
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            job = create_job(session, models=["radq-smoke"])
            ids = add_instances(session, job_id=job.id, files=files)
        with make_sessionmaker(engine)() as session:
            rows = session.execute(
                select(Instance.id, Instance.file_name, Instance.status, Instance.reason, Instance.size_bytes)
                .where(Instance.job_id == job.id)
                .order_by(Instance.id)
            ).all()
    finally:
        engine.dispose()

    assert [r.file_name for r in rows] == [f.file_name for f in files]  # ids follow the files
    assert ids == [r.id for r in rows if r.status == InstanceStatus.PENDING]
    assert len(ids) == count - len(range(0, count, 7))
    refused = [r for r in rows if r.status == InstanceStatus.FAILED]
    assert {r.reason for r in refused} == {"not DICOM"}
    assert rows[1].size_bytes == 101
