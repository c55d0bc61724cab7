"""A jobs page reads every job's counts and registration in a few grouped queries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, update

from db.jobs import NewInstance, add_instances, create_job, job_tallies, job_tally
from db.models import Instance
from db.session import make_engine, make_sessionmaker, transaction
from db.sources import add_sources, finish_source, registration_of, registrations_of
from db.status import InstanceStatus, JobStatus, SourceStatus, StorageKind

STUDY = "1.2.826.0.1.3680043.8.498.2"


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_batched_readers_agree_with_the_per_job_ones(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            uploaded = create_job(session, models=["radq-smoke"])
            ids = add_instances(
                session,
                job_id=uploaded.id,
                files=[NewInstance(f"f{n}.dcm", StorageKind.PATH, f"/d/f{n}.dcm") for n in range(3)],
            )
            session.execute(
                update(Instance)
                .where(Instance.id == ids[0])
                .values(study_instance_uid=STUDY, status=InstanceStatus.DONE)
            )
            by_path = create_job(session, models=["radq-smoke"], status=JobStatus.REGISTERING)
            sources = add_sources(
                session, job_id=by_path.id, paths=["/d/a", "/d/b", "/d/c"], lease_seconds=60
            )
            finish_source(session, sources[0].id, SourceStatus.FAILED, "no such directory")
            finish_source(session, sources[1].id, SourceStatus.DONE)
            empty = create_job(session, models=["radq-smoke"])
        job_ids = [uploaded.id, by_path.id, empty.id]
        with make_sessionmaker(engine)() as session:
            with statements(engine) as seen:
                tallies = job_tallies(session, job_ids)
                registrations = registrations_of(session, job_ids)
            assert len(seen) == 3  # tallies, registration summaries, and the one job's errors
            assert tallies == {job_id: job_tally(session, job_id) for job_id in job_ids}
            assert registrations == {by_path.id: registration_of(session, by_path.id)}
    finally:
        engine.dispose()

    assert tallies[uploaded.id].counts["total"] == 3
    assert tallies[empty.id].counts["total"] == 0
    found = registrations[by_path.id]
    assert found.status == SourceStatus.REGISTERING  # one source still open
    assert found.errors == ["/d/a: no such directory"]
    assert found.finished_at is None
