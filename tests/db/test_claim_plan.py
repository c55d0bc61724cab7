"""A worker's claim looks its one job up: it does not read every job in the database.

A stream of one-file jobs (C-STORE, STOW-RS) leaves a job per file behind; a claim that
listed every live job cost each message time in proportion to all the jobs ever run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event

from db.jobs import NewInstance, add_instances, create_job
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from db.work import claim


def test_sqlite_plans_a_claim_without_scanning_the_jobs_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'radq.db'}"
    upgrade(url)
    engine = make_engine(url)
    executed: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        executed.append((statement, parameters))

    try:
        sessions = make_sessionmaker(engine)
        with transaction(sessions) as session:
            job = create_job(session, models=["radq-smoke"])
            ids = add_instances(
                session, job_id=job.id, files=[NewInstance("a.dcm", StorageKind.PATH, "/a.dcm")]
            )
        executed.clear()
        with transaction(sessions) as session:
            claimed = claim(session, job.id, ids, lease_seconds=60, worker="w")
        assert [c.id for c in claimed] == ids  # the claim works

        statement, parameters = next(
            (s, p) for s, p in executed if s.lstrip().upper().startswith("UPDATE INSTANCES")
        )
        with engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            status = conn.exec_driver_sql("SELECT status FROM instances WHERE id = ?", (ids[0],)).scalar_one()
    finally:
        engine.dispose()
    details = [str(row[-1]) for row in plan]
    assert not any(d.startswith("SCAN jobs") for d in details), details
    assert status == InstanceStatus.PROCESSING
