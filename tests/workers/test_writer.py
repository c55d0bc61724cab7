"""The writer stage against a real database: what it commits, and when."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import workers.writer
from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance, Job
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, JobStatus, StorageKind
from db.work import claim
from workers.chunk import Chunk
from workers.writer import Writer


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _claimed_job(sessions: sessionmaker[Session], files: int) -> tuple[str, list[int]]:
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        new = [NewInstance(f"{i}.dcm", StorageKind.PATH, f"/data/{i}.dcm") for i in range(files)]
        ids = add_instances(session, job_id=job.id, files=new)
        job_id = job.id
    with transaction(sessions) as session:
        claim(session, job_id, ids, lease_seconds=600, worker="test-writer")
    return job_id, ids


def _study(sessions: sessionmaker[Session], instance_id: int) -> str | None:
    with sessions() as session:
        return session.scalar(select(Instance.study_instance_uid).where(Instance.id == instance_id))


def _wait_for(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_header_columns_commit_with_the_outcome_that_follows(sessions: sessionmaker[Session]) -> None:
    job_id, (first, second) = _claimed_job(sessions, 2)
    chunk = Chunk(job_id, {first, second})
    writer = Writer(sessions)
    try:
        for i in (first, second):
            writer.metadata(chunk, {"id": i, "study_instance_uid": f"1.2.3.{i}"})
        writer.outcome(chunk, first, InstanceStatus.DONE)
        writer.outcome(chunk, second, InstanceStatus.FAILED, "undecodable pixel data: test")
        assert chunk.done.wait(10), "the outcomes were not committed"
    finally:
        writer.close()
    assert _study(sessions, first) == f"1.2.3.{first}" and _study(sessions, second) == f"1.2.3.{second}"
    assert chunk.report.done == 1 and chunk.report.failed == 1
    with sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.DONE


def test_header_columns_alone_are_written_after_a_short_hold_or_at_close(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers.writer, "METADATA_HOLD_S", 0.3)
    job_id, (waiting, closing) = _claimed_job(sessions, 2)
    chunk = Chunk(job_id, {waiting, closing})
    writer = Writer(sessions)
    try:
        writer.metadata(chunk, {"id": waiting, "study_instance_uid": "1.2.3.4"})
        # No outcome follows (the model is still loading, say): the columns do not wait for one.
        assert _wait_for(lambda: _study(sessions, waiting) == "1.2.3.4", 5.0)
        writer.metadata(chunk, {"id": closing, "study_instance_uid": "1.2.3.5"})
    finally:
        writer.close()  # a worker that stops writes what it holds
    assert _study(sessions, closing) == "1.2.3.5"
    assert not chunk.done.is_set()  # header columns settle nothing: the instances still wait
