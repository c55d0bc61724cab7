"""A CPU worker runs forward passes on several inference streams at once; results do not change.

On the CPU one forward pass spread over every core stalls at each op's barrier whenever
another process preempts one of its threads, so a CPU worker runs one single-threaded
stream per core (RADQ_INFER_STREAMS). Each stream forms batches of its own from the one
queue of decoded instances. Models load on a stream's thread: only those run torch, so
the process has no OpenMP team beyond the streams'.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from db.jobs import NewInstance, add_instances, create_job
from db.migrate import upgrade
from db.models import Instance, Result
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from radq.settings import Settings
from radq.tasks import INFER_CHUNK
from tests.conftest import SAMPLES, make_settings
from workers import engine as engine_module
from workers.app import create_worker_app
from workers.context import get_context
from workers.engine import MAX_AUTO_STREAMS, infer_streams, torch_threads

FILES = ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm", "JPEG2000.dcm")
COPIES = 6
BATCH = 4


def _worker(tmp_path: Path, database_url: str, streams: int, **overrides: Any) -> tuple[Celery, Settings]:
    options: dict[str, Any] = {"batch_deadline": 0.05, **overrides}
    settings = make_settings(
        tmp_path / f"streams-{streams}", database_url, "memory://",
        batch_size=BATCH, decode_processes=2, device="cpu", infer_streams=streams, **options,
    )  # fmt: skip
    app = create_worker_app(settings)
    app.conf.task_always_eager = True
    return app, settings


@pytest.fixture
def sessions(own_database_url: str) -> Iterator[Any]:
    engine = make_engine(own_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _submit(sessions: Any, paths: list[str]) -> tuple[str, list[int]]:
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session, job_id=job.id,
            files=[NewInstance(f"{i}-{Path(p).name}", StorageKind.PATH, p) for i, p in enumerate(paths)],
        )  # fmt: skip
    return job.id, ids


def _run_job(app: Celery, sessions: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One job of real files through the task body; what each instance ended with, and its outputs."""
    job_id, ids = _submit(sessions, [str(SAMPLES / "real" / name) for name in FILES] * COPIES)
    report = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    assert report["claimed"] == len(ids)
    with sessions() as session:
        rows = session.execute(
            select(Instance.id, Instance.file_name, Instance.status).where(Instance.job_id == job_id)
        ).all()
        query = select(Result.instance_id, Result.outputs).where(Result.instance_id.in_(ids))
        outputs = dict(session.execute(query).all())
    names = {i: name for i, name, _ in rows}
    return {name: status for _, name, status in rows}, {names[i]: o for i, o in outputs.items()}


def _observe(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The threads that ran each forward pass, and the threads that loaded models."""
    context = get_context(settings)
    ran_on: list[str] = []
    loaded_on: list[str] = []
    for stream in context.engine.streams:
        predict = stream.batcher._predict

        def recording_predict(*args: Any, _predict: Any = predict) -> Any:
            ran_on.append(threading.current_thread().name)
            return _predict(*args)

        monkeypatch.setattr(stream.batcher, "_predict", recording_predict)
    get = context.models.get

    def recording_get(name: str) -> Any:
        loaded_on.append(threading.current_thread().name)
        return get(name)

    monkeypatch.setattr(context.models, "get", recording_get)
    return ran_on, loaded_on


def test_two_streams_share_the_work_and_give_the_results_of_one(
    tmp_path: Path, own_database_url: str, sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, settings = _worker(tmp_path, own_database_url, 1)
    ran_on, loaded_on = _observe(settings, monkeypatch)
    statuses, one = _run_job(app, sessions)
    assert set(statuses.values()) == {InstanceStatus.DONE}
    assert set(ran_on) == {"radq-infer"} and set(loaded_on) == {"radq-infer"}

    app, settings = _worker(tmp_path, own_database_url, 2)
    assert len(get_context(settings).engine.streams) == 2
    ran_on, loaded_on = _observe(settings, monkeypatch)
    statuses, two = _run_job(app, sessions)
    assert set(statuses.values()) == {InstanceStatus.DONE}
    # Both streams ran batches: the job's 24 instances make at least 6 of 4.
    assert set(ran_on) == {"radq-infer-1", "radq-infer-2"}, ran_on
    assert loaded_on and set(loaded_on) <= {"radq-infer-1", "radq-infer-2"}

    assert one.keys() == two.keys() and len(two) == len(FILES) * COPIES
    for name, outputs in one.items():
        assert two[name] == pytest.approx(outputs, abs=1e-6), name


def test_a_lone_file_is_flushed_at_the_deadline_beside_a_failing_one(
    tmp_path: Path, own_database_url: str, sessions: Any
) -> None:
    # One instance never fills a batch of 4: its stream runs the partial batch (once nothing
    # more can come, or at the deadline), and a file that fails to decode ends with its
    # reason beside it. A short
    # chunk time limit makes a broken flush fail this test instead of hanging it.
    app, _settings = _worker(tmp_path, own_database_url, 2, chunk_time_limit=30)
    job_id, ids = _submit(sessions, [str(SAMPLES / "real" / "CT_small.dcm"), str(Path(__file__))])
    report = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    assert (report["done"], report["failed"]) == (1, 1)
    with sessions() as session:
        reasons = [
            reason for (reason,) in session.execute(select(Instance.reason).where(Instance.job_id == job_id))
        ]
    assert None in reasons and any("not a DICOM file" in (r or "") for r in reasons), reasons


def test_a_lone_file_does_not_wait_out_the_batch_deadline(
    tmp_path: Path, own_database_url: str, sessions: Any
) -> None:
    # With nothing else in hand no instance can join a one-file job's partial batch until
    # that job finishes, so the batch runs at once instead of after RADQ_BATCH_DEADLINE: a
    # worker fed one-file jobs (C-STORE, STOW-RS, single uploads) is not held 30 s per job.
    app, _settings = _worker(tmp_path, own_database_url, 1, batch_deadline=30.0, chunk_time_limit=120)
    ct = str(SAMPLES / "real" / "CT_small.dcm")
    job_id, ids = _submit(sessions, [ct])  # untimed: starts the decode processes, loads the model
    assert app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()["done"] == 1
    job_id, ids = _submit(sessions, [ct])
    started = time.monotonic()
    report = app.tasks[INFER_CHUNK].apply(args=[job_id, ids]).get()
    took = time.monotonic() - started
    assert report["done"] == 1
    assert took < 10, f"a lone file took {took:.1f} s: held for the 30 s batch deadline"


def test_a_stream_waiting_with_a_partial_batch_wakes_at_its_timeout_when_another_takes_the_work(
    tmp_path: Path,
) -> None:
    # A stream holding a partial batch waits for decoded instances with a short timeout.
    # When a put wakes it but another stream takes the item first, it must still be back
    # at its timeout: on CPython 3.11-3.12 a queue.SimpleQueue waited for the next put
    # instead, and at the end of a job none comes, so the partial batch never ran (an
    # instance left processing until its lease lapsed). Two threads wait as streams do,
    # a third holds the GIL in slices as a forward pass does, and work arrives slowly.
    # The queue alone is under test: one database kind will do.
    database_url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(database_url)
    _app, settings = _worker(tmp_path, database_url, 2)
    engine = get_context(settings).engine
    timeout, overslept = 0.005, []
    done = threading.Event()

    def stream() -> None:
        while not done.is_set():
            started = time.monotonic()
            engine._next(timeout)
            overslept.append(time.monotonic() - started - timeout)

    def busy() -> None:
        while not done.is_set():
            sum(range(20_000))

    threads = [threading.Thread(target=stream) for _ in range(2)] + [threading.Thread(target=busy)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(12):
            engine._ready.put([])  # an empty group: the streams take it and find nothing to add
            time.sleep(0.5)
    finally:
        done.set()
        for _ in range(2):
            engine._ready.put([])
        for thread in threads:
            thread.join()
    assert len(overslept) > 100, "the waiting threads barely ran"
    assert max(overslept) < 0.25, f"a wait outlived its {timeout} s timeout by {max(overslept):.2f} s"


def test_a_message_for_a_loaded_model_does_not_wait_for_a_stream(tmp_path: Path) -> None:
    # Models load on a stream's thread (only those run torch). Once loaded, a message takes
    # them at once: waiting for a stream meant waiting for its forward pass to end before
    # the message's files could start decoding.
    database_url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(database_url)
    _app, settings = _worker(tmp_path, database_url, 2)
    engine = get_context(settings).engine
    engine._models(["radq-smoke"])  # loads it, on a stream
    busy = threading.Event()
    for _ in engine.streams:  # each stream in a long "forward pass"
        engine._ready.put(engine_module._Call(lambda: busy.wait(60), Future()))
    got: list[object] = []
    message = threading.Thread(target=lambda: got.append(engine._models(["radq-smoke"])))
    message.start()
    message.join(timeout=10)
    waited = message.is_alive()
    busy.set()
    message.join()
    assert not waited, "a message waited for a busy stream to hand it a loaded model"
    assert got


@pytest.mark.parametrize(
    ("cores", "streams", "threads", "device", "want"),
    [
        (2, 0, 0, "cpu", (2, 1)),
        (16, 0, 0, "cpu", (MAX_AUTO_STREAMS, 16 // MAX_AUTO_STREAMS)),
        (1, 0, 0, "cpu", (1, 1)),
        (3, 0, 0, "cpu", (3, 1)),
        (16, 0, 0, "cuda", (1, 16)),
        (8, 1, 0, "cpu", (1, 8)),
        (8, 2, 3, "cpu", (2, 3)),
    ],
)
def test_streams_and_their_threads_default_to_the_cores(
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    streams: int,
    threads: int,
    device: str,
    want: tuple[int, int],
) -> None:
    monkeypatch.setattr(engine_module, "usable_cores", lambda: cores)
    settings = Settings(infer_streams=streams, torch_threads=threads)
    assert (infer_streams(settings, device), torch_threads(settings, device)) == want
