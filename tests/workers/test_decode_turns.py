"""A CPU worker's decode processes and model take turns on the cores; torch runs on one thread.

On a CPU worker the model's OpenMP threads use every core. Decode processes that run
beside a forward pass preempt those threads and stall the others at their barriers, so
the worker alternates: the decoders fill a few batches while the inference thread waits,
then rest (their pool paused) while it runs them. Models load on the inference thread,
so that a process has one OpenMP team, not one per thread that ever ran torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance, Result
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from radq.settings import Settings
from radq.tasks import INFER_CHUNK
from tests.conftest import SAMPLES, make_settings
from workers.app import create_worker_app
from workers.context import get_context

FILES = ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm", "JPEG2000.dcm")
COPIES = 6
BATCH = 4


def _worker(tmp_path: Path, database_url: str, turns: str) -> tuple[Celery, Settings]:
    settings = make_settings(
        tmp_path / turns, database_url, "memory://",
        batch_size=BATCH, decode_processes=2, device="cpu", batch_deadline=0.05, decode_turns=turns == "on",
    )  # fmt: skip
    app = create_worker_app(settings)
    app.conf.task_always_eager = True
    return app, settings


@pytest.fixture
def sessions(own_database_url: str) -> Iterator[Any]:
    engine = make_engine(own_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _run_job(app: Celery, settings: Settings, sessions: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One job of real files through the task body; what each instance ended with, and its outputs."""
    paths = [str(SAMPLES / "real" / name) for name in FILES] * COPIES
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session, job_id=job.id,
            files=[NewInstance(f"{i}-{Path(p).name}", StorageKind.PATH, p) for i, p in enumerate(paths)],
        )  # fmt: skip
    report = app.tasks[INFER_CHUNK].apply(args=[job.id, ids]).get()
    assert report["claimed"] == len(ids)
    with sessions() as session:
        names = dict(
            session.execute(select(Instance.id, Instance.file_name).where(Instance.job_id == job.id)).all()
        )
        statuses = dict(
            session.execute(select(Instance.id, Instance.status).where(Instance.job_id == job.id)).all()
        )
        outputs = dict(
            session.execute(
                select(Result.instance_id, Result.outputs).where(Result.instance_id.in_(ids))
            ).all()
        )
    return {names[i]: s for i, s in statuses.items()}, {names[i]: o for i, o in outputs.items()}


def _observe(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> tuple[list[bool], list[str]]:
    """Whether the decode pool was paused at each forward pass, and the threads that loaded models."""
    context = get_context(settings)
    engine = context.engine
    paused: list[bool] = []
    loaded_on: list[str] = []
    predict, get = engine.batcher._predict, context.models.get

    def recording_predict(*args: Any) -> Any:
        paused.append(engine.decoders.paused)
        return predict(*args)

    def recording_get(name: str) -> Any:
        loaded_on.append(threading.current_thread().name)
        return get(name)

    monkeypatch.setattr(engine.batcher, "_predict", recording_predict)
    monkeypatch.setattr(context.models, "get", recording_get)
    return paused, loaded_on


def test_decoders_rest_while_the_model_runs_and_results_do_not_change(
    tmp_path: Path, own_database_url: str, sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, settings = _worker(tmp_path, own_database_url, "on")
    paused, loaded_on = _observe(settings, monkeypatch)
    statuses, taking_turns = _run_job(app, settings, sessions)
    assert set(statuses.values()) == {InstanceStatus.DONE}
    assert len(paused) >= len(FILES) * COPIES // BATCH and all(paused)
    assert set(loaded_on) == {"radq-infer"}

    app, settings = _worker(tmp_path, own_database_url, "off")
    paused, loaded_on = _observe(settings, monkeypatch)
    statuses, together = _run_job(app, settings, sessions)
    assert set(statuses.values()) == {InstanceStatus.DONE}
    assert paused and not any(paused)  # the same observation fails when the decoders never rest
    assert set(loaded_on) == {"radq-infer"}

    assert taking_turns.keys() == together.keys() and len(together) == len(FILES) * COPIES
    for name, outputs in together.items():
        assert taking_turns[name] == pytest.approx(outputs, abs=1e-6), name


def test_a_lone_file_is_not_held_back_by_the_turns(
    tmp_path: Path, own_database_url: str, sessions: Any
) -> None:
    # One instance never fills a batch of 4: its partial batch runs at the deadline, and a
    # file that fails to decode ends with its reason beside it.
    app, settings = _worker(tmp_path, own_database_url, "on")
    paths = [str(SAMPLES / "real" / "CT_small.dcm"), str(Path(__file__))]
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session, job_id=job.id, files=[NewInstance(Path(p).name, StorageKind.PATH, p) for p in paths]
        )
    report = app.tasks[INFER_CHUNK].apply(args=[job.id, ids]).get()
    assert (report["done"], report["failed"]) == (1, 1)
    with sessions() as session:
        reasons = dict(
            session.execute(
                select(Instance.file_name, Instance.reason).where(Instance.job_id == job.id)
            ).all()
        )
    assert reasons["CT_small.dcm"] is None and "not a DICOM file" in (reasons["test_decode_turns.py"] or "")
