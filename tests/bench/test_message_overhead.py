"""The worker-overhead figure runs real one-file jobs through a real worker and reads its CPU."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from bench.api_overhead import SAMPLE
from bench.message_overhead import WARM_UP, _round, probe_settings
from bench.models import OVERHEAD_PROBE
from bench.stack import embedded_stack
from db.models import Instance, Result
from db.status import InstanceStatus
from radq.settings import Settings


def test_a_round_runs_its_jobs_on_the_probe_and_measures_the_worker(redis_url: str, tmp_path: Path) -> None:
    base = probe_settings(Settings(broker_url=redis_url, allowed_roots=[SAMPLE.parent]), tmp_path)
    with embedded_stack(base, home=tmp_path / "home", database="sqlite", postgres_admin_url="") as stack:
        measured = _round(stack, "sqlite", posts=5)
        with stack.engine.connect() as conn:
            done = conn.execute(
                select(func.count()).where(Instance.status == InstanceStatus.DONE)
            ).scalar_one()
            models = set(conn.execute(select(Result.model)).scalars())
    assert done == WARM_UP + 5  # every job ran, none failed
    assert models == {OVERHEAD_PROBE}
    assert measured.posts == 5 and measured.cpu_ms > 0 and measured.jobs_per_s > 0
