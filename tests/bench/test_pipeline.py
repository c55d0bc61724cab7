"""The pipeline figure's submission modes, through the bench's own stack (API, worker, SQLite)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from bench.pipeline import SUBMIT_JOB_PER_FILE, run_job
from bench.stack import embedded_stack
from db.models import Instance
from radq.settings import Settings
from tests.conftest import SAMPLES

FILES = [SAMPLES / "real" / name for name in ("CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm")]


def test_job_per_file_posts_a_job_per_file_and_waits_for_them_all(redis_url: str, tmp_path: Path) -> None:
    base = Settings(broker_url=redis_url, allowed_roots=[SAMPLES.resolve()], dedup=False, batch_size=4)
    with embedded_stack(base, home=tmp_path / "home", database="sqlite", postgres_admin_url="") as stack:
        run = run_job(stack, FILES, models=["radq-smoke"], timeout=120, submit=SUBMIT_JOB_PER_FILE)
        with stack.engine.connect() as conn:
            jobs = conn.execute(select(func.count(func.distinct(Instance.job_id)))).scalar_one()
    assert (run.files, run.jobs, jobs, run.counts) == (3, 3, 3, {"done": 3})
    assert run.registered_s is not None and run.total_s >= run.upload_s > 0
