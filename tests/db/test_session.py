"""A worker's connection that goes quiet mid-transaction does not hold rows for hours."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.migrate import upgrade
from db.session import make_engine
from tests.conftest import PostgresServer


def test_idle_worker_transaction_is_ended_and_its_row_locks_released(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    upgrade(url)
    worker = make_engine(url, idle_transaction_timeout=1.0)
    reaper = make_engine(url)
    job_id = str(uuid.uuid4())
    try:
        with reaper.begin() as conn:
            insert = "INSERT INTO jobs (id, status, models, created_at) VALUES (:id, 'running', '[]', now())"
            conn.execute(text(insert), {"id": job_id})
        stalled = worker.connect()
        stalled.begin()
        # The worker locks the row, then its host drops off the network before it commits.
        stalled.execute(text("UPDATE jobs SET status = 'done' WHERE id = :id"), {"id": job_id})

        started = time.monotonic()
        with reaper.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '20s'"))
            conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = :id"), {"id": job_id})
        assert time.monotonic() - started < 15  # freed after ~1 s, not after TCP keepalive's hours

        with pytest.raises(DBAPIError):  # the server ended the stalled session
            stalled.execute(text("SELECT 1"))
        stalled.close()
        with reaper.connect() as conn:
            assert conn.scalar(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}) == "queued"
    finally:
        worker.dispose()
        reaper.dispose()
        postgres.drop_database(url)
