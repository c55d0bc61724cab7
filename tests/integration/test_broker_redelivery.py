"""A chunk message published twice to the real broker is processed once."""

from __future__ import annotations

from sqlalchemy import func, select

from db.models import Instance, Result
from radq.queue import make_celery, publish_chunks
from tests.conftest import SAMPLES, Stack
from tests.jobwait import wait_done


def _result_rows(stack: Stack, job_id: str) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Result).join(Instance).where(Instance.job_id == job_id)
            )
            or 0
        )


def test_republished_chunk_changes_nothing(stack: Stack) -> None:
    files = [SAMPLES / "real" / n for n in ("CT_small.dcm", "MR_small.dcm", "CR3_6278.dcm")]
    job = wait_done(stack.client, stack.client.upload(files)["id"])
    ids = [i["id"] for i in stack.client.instances(job["id"])]
    rows_before = _result_rows(stack, job["id"])
    assert rows_before == 3

    producer = make_celery(stack.settings)
    publish_chunks(producer, job_id=job["id"], instance_ids=ids, chunk_size=2, queue=stack.settings.queue)
    publish_chunks(producer, job_id=job["id"], instance_ids=ids, chunk_size=100, queue=stack.settings.queue)
    # One worker consumes the queue in order: once a job submitted after the duplicates
    # is done, the duplicates have been handled.
    marker = wait_done(stack.client, stack.client.upload([SAMPLES / "real" / "CT5N_2062.dcm"])["id"])
    assert marker["counts"]["done"] == 1

    after = stack.client.job(job["id"])
    assert after["counts"] == job["counts"]
    assert after["finished_at"] == job["finished_at"]
    assert _result_rows(stack, job["id"]) == rows_before
