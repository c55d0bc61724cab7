"""The API-overhead figure posts real one-file path jobs and reads the API process's CPU."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from bench.api_overhead import SAMPLE, WARM_UP, _round
from bench.stack import embedded_stack
from db.models import Job
from radq.settings import Settings


def test_a_round_posts_its_jobs_and_measures_the_api_process(redis_url: str, tmp_path: Path) -> None:
    base = Settings(broker_url=redis_url, allowed_roots=[SAMPLE.parent])
    home = tmp_path / "home"
    with embedded_stack(base, home=home, database="sqlite", postgres_admin_url="", worker=False) as stack:
        measured = _round(stack, "sqlite", posts=5)
        with stack.engine.connect() as conn:
            jobs = conn.execute(select(func.count()).select_from(Job)).scalar_one()
    assert jobs == WARM_UP + 5
    assert measured.posts == 5 and measured.cpu_ms > 0 and measured.wall_ms > 0
    assert measured.get_cpu_ms > 0  # the polls reached the API process
    assert measured.transactions is None  # counted on PostgreSQL only
