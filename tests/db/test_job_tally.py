"""A job's counts per status and per study, as every job view reads them."""

from __future__ import annotations

from sqlalchemy import update

from db.jobs import NewInstance, add_instances, create_job, job_counts, job_tally
from db.models import Instance
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind

STUDY_A = "1.2.826.0.1.3680043.8.498.2"
STUDY_B = "1.2.826.0.1.3680043.8.498.10"


def test_counts_every_instance_and_studies_only_those_whose_header_was_read(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            job = create_job(session, models=["radq-smoke"])
            files = [NewInstance(f"f{n}.dcm", StorageKind.PATH, f"/data/f{n}.dcm") for n in range(6)]
            files.append(NewInstance("bad.dcm", StorageKind.PATH, "/data/bad.dcm", failure="not DICOM"))
            ids = add_instances(session, job_id=job.id, files=files)
            # Two done and one failed in study B, one done in study A, two not read yet.
            for instance_id, study, status in (
                (ids[0], STUDY_B, InstanceStatus.DONE),
                (ids[1], STUDY_B, InstanceStatus.DONE),
                (ids[2], STUDY_B, InstanceStatus.FAILED),
                (ids[3], STUDY_A, InstanceStatus.DONE),
            ):
                session.execute(
                    update(Instance)
                    .where(Instance.id == instance_id)
                    .values(study_instance_uid=study, status=status)
                )
        with make_sessionmaker(engine)() as session:
            tally = job_tally(session, job.id)
            counts = job_counts(session, job.id)
    finally:
        engine.dispose()

    assert len(ids) == 6  # the refused file is recorded failed, not queued
    assert tally.counts == counts
    assert counts["total"] == 7
    assert (counts["done"], counts["failed"], counts["pending"]) == (3, 2, 2)
    # Sorted by UID as text, the same on both databases.
    assert tally.studies == [
        {"study_instance_uid": STUDY_B, "instances": 3, "done": 2, "failed": 1, "skipped": 0},
        {"study_instance_uid": STUDY_A, "instances": 1, "done": 1, "failed": 0, "skipped": 0},
    ]
