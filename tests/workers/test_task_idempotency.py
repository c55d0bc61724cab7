"""The task body, run eagerly against real databases: re-delivery never duplicates rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select, update

from db.jobs import NewInstance, add_instances, create_job, job_counts
from db.models import Instance, Job, Result, utcnow
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, JobStatus, StorageKind
from radq.settings import Settings
from radq.tasks import INFER_CHUNK
from tests.conftest import SAMPLES, make_settings
from workers.app import create_worker_app


@pytest.fixture
def eager(own_database_url: str, tmp_path: Path) -> Iterator[tuple[Celery, Settings]]:
    # A database of this module's own: the maintenance loop of another test's API would reap
    # the expired lease set below and have its worker infer that instance meanwhile.
    settings = make_settings(tmp_path, own_database_url, "memory://")
    app = create_worker_app(settings)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    yield app, settings


def _job(settings: Settings, names: list[str]) -> tuple[str, list[int]]:
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        job = create_job(session, models=["radq-smoke"])
        files = [NewInstance(n, StorageKind.PATH, str(SAMPLES / "real" / n)) for n in names]
        ids = add_instances(session, job_id=job.id, files=files)
    engine.dispose()
    return job.id, ids


def _state(settings: Settings, job_id: str) -> tuple[dict[str, int], int, str]:
    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        counts = job_counts(session, job_id)
        results = session.scalar(
            select(func.count()).select_from(Result).join(Instance).where(Instance.job_id == job_id)
        )
        status = session.get(Job, job_id).status  # type: ignore[union-attr]
    engine.dispose()
    return counts, int(results or 0), status


def test_same_chunk_twice_gives_one_row_per_instance(eager: tuple[Celery, Settings]) -> None:
    app, settings = eager
    job_id, ids = _job(settings, ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"])
    first = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    after_first = _state(settings, job_id)
    second = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    assert first["done"] == 3 and second["claimed"] == 0
    assert _state(settings, job_id) == after_first
    counts, results, status = after_first
    assert counts["done"] == 3 and results == 3 and status == JobStatus.DONE


def test_redelivered_message_leaves_held_instances_to_their_lease(eager: tuple[Celery, Settings]) -> None:
    app, settings = eager
    job_id, ids = _job(settings, ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"])
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        # A worker died holding the first (lease expired); another still holds the second.
        session.execute(
            update(Instance).where(Instance.id == ids[0])
            .values(status=InstanceStatus.PROCESSING, lease_expires_at=utcnow() - timedelta(seconds=5))
        )
        session.execute(
            update(Instance).where(Instance.id == ids[1])
            .values(status=InstanceStatus.PROCESSING, lease_expires_at=utcnow() + timedelta(hours=1))
        )
    engine.dispose()
    # The message comes back (a visibility timeout, a dead worker): only the waiting
    # instance is processed; held ones are the reaper's business, never inferred twice.
    report = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    assert report["claimed"] == 1 and report["done"] == 1
    counts, results, status = _state(settings, job_id)
    assert counts["done"] == 1 and counts["processing"] == 2 and results == 1
    assert status == JobStatus.RUNNING


def test_message_for_another_job_claims_nothing(eager: tuple[Celery, Settings]) -> None:
    app, settings = eager
    job_id, ids = _job(settings, ["CT_small.dcm"])
    report = app.tasks[INFER_CHUNK].apply(args=["some-other-job", ids]).get()
    assert report["claimed"] == 0
    counts, results, _ = _state(settings, job_id)
    assert counts["done"] == 0 and results == 0


def test_cancelled_job_is_not_processed(eager: tuple[Celery, Settings]) -> None:
    app, settings = eager
    job_id, ids = _job(settings, ["CT_small.dcm"])
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED))
    engine.dispose()
    assert app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()["claimed"] == 0


def test_missing_file_fails_with_its_path(eager: tuple[Celery, Settings], tmp_path: Path) -> None:
    app, settings = eager
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        job = create_job(session, models=["radq-smoke"])
        gone = tmp_path / "gone.dcm"
        missing = NewInstance("gone.dcm", StorageKind.PATH, str(gone))
        ids = add_instances(session, job_id=job.id, files=[missing])
    engine.dispose()
    app.tasks[INFER_CHUNK].apply(args=[job.id, ids]).get()
    counts, _, status = _state(settings, job.id)
    assert counts["failed"] == 1 and status == JobStatus.DONE
    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as session:
        assert session.get(Instance, ids[0]).reason == f"file not found: {gone}"  # type: ignore[union-attr]
    engine.dispose()
