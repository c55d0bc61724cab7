"""A job view reads one state of the database: a commit landing between its SELECTs is not half-seen."""

from __future__ import annotations

from sqlalchemy import func, select, update

from db.jobs import NewInstance, add_instances, create_job, job_tally
from db.models import Instance, Job
from db.session import make_engine, make_sessionmaker, snapshot, transaction
from db.status import InstanceStatus, JobStatus, StorageKind


def test_reads_in_a_snapshot_do_not_see_a_commit_made_between_them(database_url: str) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        with transaction(sessions) as session:
            job = create_job(session, models=["radq-smoke"])
            ids = add_instances(
                session, job_id=job.id, files=[NewInstance("a.dcm", StorageKind.PATH, "/a.dcm")]
            )
        with snapshot(sessions) as view:
            before = view.scalar(select(Job.status).where(Job.id == job.id))
            # A worker finishes the job while the view is half read.
            with transaction(sessions) as worker:
                worker.execute(
                    update(Instance).where(Instance.id.in_(ids)).values(status=InstanceStatus.DONE)
                )
                worker.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.DONE))
            counts = job_tally(view, job.id).counts
        with sessions() as fresh:
            now = fresh.scalar(select(Job.status).where(Job.id == job.id))
            done = fresh.scalar(
                select(func.count()).where(Instance.job_id == job.id, Instance.status == "done")
            )
    finally:
        engine.dispose()
    assert (before, counts["pending"], counts["done"]) == (JobStatus.QUEUED, 1, 0)  # one state
    assert (now, done) == (JobStatus.DONE, 1)  # the commit itself landed
