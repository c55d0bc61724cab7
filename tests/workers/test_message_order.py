"""Messages a worker holds go through in the order they came, so one finishes while the next runs.

If the messages in hand were decoded interleaved they would all finish together, and a
worker would claim and start decoding its next messages only once its pipeline had
drained: on a GPU host the device then waits for every round's first batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select

from db.jobs import NewInstance, add_instances, create_job
from db.models import Instance
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from radq.settings import Settings
from radq.tasks import INFER_CHUNK
from tests.conftest import SAMPLES, make_settings
from workers.app import create_worker_app
from workers.context import get_context

PER_MESSAGE = 24
BATCH = 4


@pytest.fixture
def eager(own_database_url: str, tmp_path: Path) -> Iterator[tuple[Celery, Settings]]:
    settings = make_settings(
        tmp_path, own_database_url, "memory://",
        batch_size=BATCH, decode_processes=1, device="cpu", batch_deadline=0.05,
    )  # fmt: skip
    app = create_worker_app(settings)
    app.conf.task_always_eager = True
    yield app, settings


def test_first_message_finishes_before_the_second_is_half_done(eager: tuple[Celery, Settings]) -> None:
    app, settings = eager
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    ct = str(SAMPLES / "real" / "CT_small.dcm")
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session,
            job_id=job.id,
            files=[NewInstance(f"ct{i}.dcm", StorageKind.PATH, ct) for i in range(2 * PER_MESSAGE)],
        )
    messages = [ids[:PER_MESSAGE], ids[PER_MESSAGE:]]
    reports: dict[int, dict[str, object]] = {}

    def run(index: int) -> None:
        reports[index] = app.tasks[INFER_CHUNK].apply(args=[job.id, messages[index]]).get()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(report["done"] == PER_MESSAGE for report in reports.values())

    with sessions() as session:
        finished = dict(
            session.execute(select(Instance.id, Instance.updated_at).where(Instance.job_id == job.id)).all()
        )
        statuses = set(session.scalars(select(Instance.status).where(Instance.job_id == job.id)))
    engine.dispose()
    assert statuses == {InstanceStatus.DONE}
    last = [max(finished[i] for i in message) for message in messages]
    first, second = (0, 1) if last[0] <= last[1] else (1, 0)
    # Instances of the later message final before the earlier message's last one was. The
    # writer stamps every row of a transaction with one time, so rows committed together
    # with that last one tie with it: counting ties as earlier failed about one run in ten
    # (12 or 16 of 24 tied, a batch or a write shared with the tail; strictly earlier, 0-4).
    early = sum(finished[i] < last[first] for i in messages[second])
    assert early < PER_MESSAGE // 2, (
        f"{early} of the second message's {PER_MESSAGE} instances ended before the first"
    )


def test_the_first_messages_arriving_together_share_one_engine(eager: tuple[Celery, Settings]) -> None:
    # A worker's first messages each start on a thread of their own at once. Each used to
    # build an engine of its own (decode processes, inference streams, models), and their
    # instances then never shared a batch.
    _app, settings = eager
    start = threading.Barrier(4)
    got: list[object] = []

    def first_message() -> None:
        start.wait()
        got.append(get_context(settings))

    threads = [threading.Thread(target=first_message) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(got) == 4
    assert len({id(context) for context in got}) == 1, "each message thread built a context of its own"
