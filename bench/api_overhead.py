"""``python -m bench.api_overhead``: what one one-file ``POST /v1/jobs`` costs the API process.

A stream of one-file jobs (single uploads, C-STORE, STOW-RS) pays the API per job, not per
image: the request, recording the job and its audit event, the registrar's transactions, the
publish, the job view it answers with. This posts ``--posts`` one-file path jobs one after
the other to a real ``radq api`` (the bench's embedded stack, no worker: nothing else runs)
and reads, per POST, the API process's CPU (all its threads, from ``/proc``), the wall time,
and on PostgreSQL the transactions its database counted (``pg_stat_database``; SQLAlchemy's
pre-ping of each checkout is one). Then it asks for the last job's view as many times
(``GET /v1/jobs/{id}``, what a client polling its job pays) and reads the API's CPU per GET.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, text

from bench.machine import describe
from bench.pipeline import process_cpu_s
from bench.stack import DATABASES, Stack, embedded_stack
from radq.settings import Settings

SAMPLE = Path(__file__).resolve().parent.parent / "radq" / "samples" / "real" / "CT_small.dcm"
WARM_UP = 30
"""POSTs before each round (imports, connection pools, compiled statements)."""
SETTLE_S = 2.0
"""Wait around a round: the registrar's last transactions belong to it, and PostgreSQL's
backends report their counts at most once a second."""


@dataclass(frozen=True)
class Round:
    database: str
    posts: int
    wall_ms: float
    cpu_ms: float
    transactions: float | None
    get_cpu_ms: float


def _transactions(engine: Engine) -> int | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        query = text(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(conn.execute(query).scalar_one())


def _round(stack: Stack, database: str, posts: int) -> Round:
    for _ in range(WARM_UP):
        stack.client.submit_paths([str(SAMPLE)], force=True)
    time.sleep(SETTLE_S)
    before_xacts, before_cpu = _transactions(stack.engine), process_cpu_s(stack.api.pid)
    start = time.perf_counter()
    for _ in range(posts):
        job_id = stack.client.submit_paths([str(SAMPLE)], force=True)["id"]
    wall = time.perf_counter() - start
    time.sleep(SETTLE_S)
    cpu = process_cpu_s(stack.api.pid) - before_cpu
    after_xacts = _transactions(stack.engine)
    xacts = None if before_xacts is None or after_xacts is None else (after_xacts - before_xacts) / posts
    get_cpu_ms = _get_cpu_ms(stack, job_id, posts)
    return Round(database, posts, 1000 * wall / posts, 1000 * cpu / posts, xacts, get_cpu_ms)


def _get_cpu_ms(stack: Stack, job_id: str, gets: int) -> float:
    """The API's CPU per ``GET /v1/jobs/{id}`` of one job."""
    before = process_cpu_s(stack.api.pid)
    for _ in range(gets):
        stack.client.job(job_id)
    return 1000 * (process_cpu_s(stack.api.pid) - before) / gets


def parse_rounds(prog: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of the one-file-job benches: ``posts``, ``rounds``, ``databases``, ``postgres_url``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--posts", type=int, default=400, help="one-file jobs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="a server where this URL may CREATE DATABASE")  # fmt: skip
    args = parser.parse_args(argv)
    args.databases = args.database.split(",")
    unknown = [d for d in args.databases if d not in DATABASES]
    if unknown:
        parser.error(f"--database: {unknown[0]!r} is not one of {', '.join(DATABASES)}")
    return args


def print_machine(console: Console) -> None:
    machine = describe(torch.device("cpu"))
    console.print(f"{machine['cpu']}, {machine['usable_cores']} cores, python {machine['python']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_rounds("python -m bench.api_overhead", __doc__.split("\n")[0], argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    rounds: list[Round] = []
    for database in args.databases:
        base = Settings(allowed_roots=[SAMPLE.parent])
        with tempfile.TemporaryDirectory(prefix="radq-api-overhead-") as tmp, embedded_stack(
            base, home=Path(tmp), database=database, postgres_admin_url=args.postgres_url, worker=False
        ) as stack:  # fmt: skip
            rounds += [_round(stack, database, args.posts) for _ in range(args.rounds)]
    table = Table(title=f"one-file path jobs POSTed one after the other, {args.posts} per round, no worker")
    columns = ("database", "round", "wall ms/POST", "API CPU ms/POST", "transactions/POST", "API CPU ms/GET")
    for column in columns:
        table.add_column(column, justify="left" if column == "database" else "right")
    for database in dict.fromkeys(r.database for r in rounds):
        mine = [r for r in rounds if r.database == database]
        for n, r in enumerate(mine, 1):
            xacts = "-" if r.transactions is None else f"{r.transactions:.1f}"
            get = f"{r.get_cpu_ms:.2f}"
            table.add_row(database, str(n), f"{r.wall_ms:.1f}", f"{r.cpu_ms:.1f}", xacts, get)
        median = f"[bold]{statistics.median(r.cpu_ms for r in mine):.1f}[/bold]"
        get_median = f"[bold]{statistics.median(r.get_cpu_ms for r in mine):.2f}[/bold]"
        table.add_row(database, "median", "", median, "", get_median, end_section=True)
    console.print(table)
    print_machine(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
