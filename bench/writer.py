"""``python -m bench.writer``: what the worker's writer costs per instance, on SQLite and PostgreSQL.

The writer stage commits, per transaction, the header columns, the result rows and the
final statuses of the instances that finished meanwhile (``db.work.write_outcomes``,
the body of ``workers.writer.Writer``). Here the same function runs on a fresh,
migrated database with instances claimed as a worker claims them, in transactions of
``--rows`` instances, and the CPU time of this process (what a worker's one Python
process pays: the driver, SQLAlchemy and, for SQLite, the database itself) and the wall
time are reported per instance.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import radq
from bench.__main__ import DEFAULT_POSTGRES
from bench.machine import describe
from bench.stack import create_postgres_database, drop_postgres_database
from db.jobs import NewInstance, add_instances, create_job
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker, transaction
from db.status import InstanceStatus, StorageKind
from db.work import ResultRow, claim, write_outcomes

LABELS = [f"label_{i}" for i in range(14)]  # DenseNet-121's CheXNet labels: 14 probabilities per row


@dataclass
class Round:
    instances: int
    cpu_s: float
    wall_s: float


@contextlib.contextmanager
def _database(kind: str, work: Path, admin_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{work / 'radq.db'}"
        return
    url = create_postgres_database(admin_url)
    try:
        yield url
    finally:
        drop_postgres_database(admin_url, url)


def _metadata(instance_id: int) -> dict[str, object]:
    """The header columns a decode process sends for a CT slice."""
    return {
        "id": instance_id,
        "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{instance_id}",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.2",
        "modality": "CT",
        "body_part": "HEAD",
        "series_description": "bench",
        "notes": None,
        "patient_pseudonym": "0" * 64,
        "content_sha256": "f" * 64,
    }


def _result(instance_id: int) -> ResultRow:
    return ResultRow(
        instance_id=instance_id,
        model="bench-model",
        model_version="1.0.0",
        weights_sha256="e" * 64,
        radq_version=radq.__version__,
        preprocessing='{"frame": "middle"}',
        precision="bf16",
        outputs={label: 0.5 for label in LABELS},
    )


def _round(url: str, instances: int, rows: int) -> Round:
    """One job of ``instances``, claimed, then written ``rows`` instances per transaction."""
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        with transaction(sessions) as session:
            job = create_job(session, models=["bench-model"])
            files = [NewInstance(f"{i}.dcm", StorageKind.PATH, f"/bench/{i}.dcm") for i in range(instances)]
            ids = add_instances(session, job_id=job.id, files=files)
            job_id = job.id
        with transaction(sessions) as session:
            claim(session, job_id, ids, lease_seconds=600, worker="bench-writer")
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(ids), rows):
            batch = ids[start : start + rows]
            with transaction(sessions) as session:
                write_outcomes(
                    session,
                    [_metadata(i) for i in batch],
                    [_result(i) for i in batch],
                    [(i, InstanceStatus.DONE, None) for i in batch],
                    [job_id],
                )
        return Round(len(ids), time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        engine.dispose()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2048, help="instances per round")
    parser.add_argument("--rows", type=int, default=16, help="instances per transaction")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="a server to create databases on")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    table = Table(
        title=f"writer transactions of {args.rows} instances (metadata, result, status), "
        f"{args.instances} instances per round, {args.rounds} rounds",
        title_justify="left",
    )
    for name in ("database", "CPU ms/instance, median (range)", "wall ms/instance, median (range)"):
        table.add_column(name, justify="left" if name == "database" else "right")
    for kind in args.databases.split(","):
        with (
            tempfile.TemporaryDirectory(prefix="radq-writer-") as tmp,
            _database(kind, Path(tmp), args.postgres_url) as url,
        ):
            upgrade(url)
            _round(url, args.rows * 4, args.rows)  # untimed: connections, statement caches
            rounds = [_round(url, args.instances, args.rows) for _ in range(args.rounds)]
        cpu = [1000 * r.cpu_s / r.instances for r in rounds]
        wall = [1000 * r.wall_s / r.instances for r in rounds]
        table.add_row(
            kind,
            f"{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})",
            f"{statistics.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f})",
        )
    console.print(table)
    machine = describe(torch.device("cpu"))
    console.print(f"{machine['cpu']}, {machine['cores']} cores; radq {radq.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
