"""``python -m bench.message_overhead``: what one one-file message costs the worker process.

The worker's side of :mod:`bench.api_overhead`. A stream of one-file jobs (single uploads,
C-STORE, STOW-RS) is one Celery message per file: receiving and acknowledging it, claiming
its instance, reading its job, closing the job, all paid once per image. :mod:`bench.overhead`
measures the engine in process, without Celery; this runs the whole stack: a real ``radq
api`` and one real ``radq worker`` with the bench's near-free ``overhead-probe`` model, gets
``--posts`` one-file path jobs posted one after the other while the worker runs, waits until
SQL holds every outcome, and reads the worker process's CPU per message (all its threads,
from ``/proc``; its decode processes not counted) and the jobs finished per second.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bench.api_overhead import SAMPLE, parse_rounds, print_machine
from bench.models import OVERHEAD_PROBE, model_dir
from bench.pipeline import process_cpu_s
from bench.stack import BenchError, Stack, embedded_stack
from db.models import Instance
from db.status import FINAL_STATUSES
from radq.settings import Settings

WARM_UP = 30
"""Jobs before each round: the model loaded, the decode processes started, pools filled."""
DEADLINE_S = 300.0
"""Longest wait for a round's outcomes."""


@dataclass(frozen=True)
class Round:
    database: str
    posts: int
    cpu_ms: float
    jobs_per_s: float


def _finished(stack: Stack) -> int:
    with stack.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(Instance.status.in_(FINAL_STATUSES))).scalar_one())


def _post_and_wait(stack: Stack, posts: int) -> None:
    start = _finished(stack)
    for _ in range(posts):
        stack.client.submit_paths([str(SAMPLE)], force=True)
    deadline = time.monotonic() + DEADLINE_S
    while _finished(stack) < start + posts:
        stack.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{posts} one-file jobs not finished after {DEADLINE_S:.0f} s")
        time.sleep(0.02)


def _round(stack: Stack, database: str, posts: int) -> Round:
    assert stack.worker is not None
    _post_and_wait(stack, WARM_UP)
    before = process_cpu_s(stack.worker.pid)
    start = time.perf_counter()
    _post_and_wait(stack, posts)
    wall = time.perf_counter() - start
    cpu = process_cpu_s(stack.worker.pid) - before
    return Round(database, posts, 1000 * cpu / posts, posts / wall)


def probe_settings(base: Settings, work: Path) -> Settings:
    """``base`` with the bench's model folder, ``overhead-probe`` as the default model, and no
    deduplication (every post is new work)."""
    models = model_dir(base.model_dir, work / "models")
    return base.model_copy(update={"model_dir": models, "default_models": [OVERHEAD_PROBE], "dedup": False})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_rounds("python -m bench.message_overhead", __doc__.split("\n")[0], argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    rounds: list[Round] = []
    for database in args.databases:
        with tempfile.TemporaryDirectory(prefix="radq-message-overhead-") as tmp:
            base = probe_settings(Settings(allowed_roots=[SAMPLE.parent]), Path(tmp))
            with embedded_stack(
                base, home=Path(tmp) / "home", database=database, postgres_admin_url=args.postgres_url
            ) as stack:  # fmt: skip
                rounds += [_round(stack, database, args.posts) for _ in range(args.rounds)]
    table = Table(title=f"one-file path jobs, {args.posts} per round, one worker, model {OVERHEAD_PROBE}")
    for column in ("database", "round", "worker CPU ms/message", "jobs finished/s"):
        table.add_column(column, justify="left" if column == "database" else "right")
    for database in dict.fromkeys(r.database for r in rounds):
        mine = [r for r in rounds if r.database == database]
        for n, r in enumerate(mine, 1):
            table.add_row(database, str(n), f"{r.cpu_ms:.2f}", f"{r.jobs_per_s:.0f}")
        median = f"[bold]{statistics.median(r.cpu_ms for r in mine):.2f}[/bold]"
        table.add_row(database, "median", median, "", end_section=True)
    console.print(table)
    print_machine(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
