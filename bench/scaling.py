"""``python -m bench.scaling``: one job's throughput with 1, 2, 4... worker processes on this host.

Each count gets the same stack (API, Redis, a fresh database) and the same files; the
workers start, run untimed warm-up jobs until each has taken some (each loads its model,
starts its decode processes and, on CUDA, tunes cuDNN), then one timed job. Besides
images per second it reports how busy the host's CPUs were during the timed job
(``/proc/stat``) and the workers' summed peak memory, so the table names what bounds
the scaling.

Two layouts: ``whole`` starts every worker as ``docker compose up --scale worker=N``
does (each worker sizes its torch threads and decode processes to every core it may
use); ``split`` gives each worker its share of the cores (RADQ_DECODE_PROCESSES, and
RADQ_INFER_STREAMS x RADQ_TORCH_THREADS = cores / N, at least 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from bench import machine
from bench.inputs import DEFAULT_CACHE, INPUTS, Corpus
from bench.memory import TreePeak
from bench.models import model_dir
from bench.pipeline import run_job
from bench.stack import DATABASES, BenchError, Stack, embedded_stack, start_worker
from db.models import Instance
from radq.errors import RadqError
from radq.services import stop
from radq.settings import Settings
from workers.device import resolve_device
from workers.engine import MAX_AUTO_STREAMS, usable_cores

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
"""Server the scaling runs use unless --database sqlite: the production database."""
LAYOUTS = ("whole", "split")
"""How cores are given to N workers on one host (see the module docstring)."""


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


WARMUP_ROUNDS = 5
"""Warm-up jobs at most before a worker that took none of them fails the measurement."""


@dataclass(frozen=True)
class Point:
    layout: str
    workers: int
    images: int
    seconds: float
    cpu_busy: float  # fraction of all the host's CPUs
    peak_mib: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _warm_every_worker(
    stack: Stack, workers: int, warm: Sequence[Path], *, model: str, timeout: float
) -> None:
    """Run untimed warm-up jobs until every worker process has processed some of them.

    A worker that took no warm-up message would load its model, start its decoders and,
    on CUDA, tune cuDNN (seconds per model) inside the timed job. One that starts first
    can take a warm-up job's every message (RADQ_WORKER_CONCURRENCY each), hence rounds.

    Raises:
        BenchError: a warm-up job did not process cleanly, or some worker took none of
            :data:`WARMUP_ROUNDS` jobs.
    """
    warmed: set[str] = set()
    for _ in range(WARMUP_ROUNDS):
        run = run_job(stack, warm, models=[model], timeout=timeout)
        if run.counts.get("done", 0) != len(warm):
            raise BenchError(f"warm-up job with {workers} workers did not process cleanly: {run.counts}")
        query = select(Instance.worker).where(Instance.job_id == run.job_id).distinct()
        with stack.engine.connect() as conn:
            warmed.update(str(name) for name in conn.scalars(query) if name)
        if len(warmed) >= workers:
            return
    raise BenchError(
        f"after {WARMUP_ROUNDS} warm-up jobs only {len(warmed)} of {workers} workers had taken work"
    )


def _measure(
    settings: Settings, *, workers: int, layout: str, files: Sequence[Path], warm: Sequence[Path],
    model: str, home: Path, database: str, postgres_url: str, timeout: float,
) -> Point:  # fmt: skip
    cores = usable_cores()
    if layout == "split":
        share = max(1, cores // workers)
        # As a worker sizes itself to the cores it may use (workers.engine.infer_streams).
        streams = min(share, MAX_AUTO_STREAMS) if resolve_device(settings.device).type == "cpu" else 1
        settings = settings.model_copy(
            update={"infer_streams": streams, "torch_threads": share // streams, "decode_processes": share}
        )
    with embedded_stack(
        settings, home=home, database=database, postgres_admin_url=postgres_url, worker=False
    ) as stack, contextlib.ExitStack() as running:  # fmt: skip
        procs = [start_worker(stack.settings, stack.logs / f"worker-{i}.log") for i in range(workers)]
        for proc in procs:
            running.callback(stop, proc)
        _warm_every_worker(stack, workers, warm, model=model, timeout=timeout)
        peaks = [running.enter_context(TreePeak(proc.pid)) for proc in procs]
        busy0, total0 = _cpu_times()
        run = run_job(stack, files, models=[model], timeout=timeout)
        busy1, total1 = _cpu_times()
        for proc in procs:
            if proc.poll() is not None:
                raise BenchError(f"a worker exited with code {proc.returncode} during the timed job")
        if run.counts.get("done", 0) != len(files):
            raise BenchError(f"timed job with {workers} workers did not process cleanly: {run.counts}")
        busy = (busy1 - busy0) / max(1, total1 - total0)
    return Point(layout, workers, len(files), run.total_s, busy, sum(p.hwm_mib or 0.0 for p in peaks))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker process counts")
    parser.add_argument("--layouts", default="whole,split", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    parser.add_argument("--model", default="headct-resnet18", help="model every job runs")
    parser.add_argument("--input", default="ct", choices=sorted(INPUTS), help="input kind")
    parser.add_argument("--images", type=int, default=600, help="files in the timed job")
    parser.add_argument("--database", choices=DATABASES, default="postgresql")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where generated corpora are kept")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one job may take")
    args = parser.parse_args(argv)
    args.workers = [int(v) for v in args.workers.split(",") if v.strip()]
    args.layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    if bad := [v for v in args.layouts if v not in LAYOUTS]:
        parser.error(f"unknown layout(s) {', '.join(bad)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    base = Settings()
    corpus = Corpus(INPUTS[args.input], cache=args.cache, seed=0)
    files = corpus.files(args.images)
    points: list[Point] = []
    try:
        with tempfile.TemporaryDirectory(prefix="radq-scaling-") as tmp:
            work = Path(tmp)
            settings = base.model_copy(
                update={
                    "model_dir": model_dir(base.model_dir, work / "models"),
                    "dedup": False,
                    "allowed_roots": [args.cache.resolve()],
                }
            )
            for layout in args.layouts:
                for n in args.workers:
                    if layout == "split" and n == 1 and "whole" in args.layouts:
                        continue  # one worker with every core is the same run as `whole`
                    # Enough warm-up messages that every worker can hold its share.
                    warm = files[: min(len(files), settings.chunk_size * n * settings.worker_concurrency)]
                    console.print(f"{layout}: {n} worker process(es) ...")
                    started = time.perf_counter()
                    point = _measure(
                        settings, workers=n, layout=layout, files=files, warm=warm, model=args.model,
                        home=work / f"{layout}-{n}", database=args.database, postgres_url=args.postgres_url,
                        timeout=args.timeout,
                    )  # fmt: skip
                    points.append(point)
                    took = time.perf_counter() - started
                    console.print(f"  {point.rate:.1f} img/s ({took:.0f}s with warm-up)")
    except RadqError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    _render(console, points, args)
    return 0


def _render(console: Console, points: Sequence[Point], args: argparse.Namespace) -> None:
    one = next((p.rate for p in points if p.workers == 1), None)
    table = Table(title=f"{args.model} on {args.input}, {args.images} files per job, {args.database}")
    columns = ("layout", "worker processes", "img/s", "vs 1 worker", "host CPU busy", "workers' peak MiB")
    for column in columns:
        table.add_column(column, justify="right")
    for p in points:
        speedup = f"{p.rate / one:.2f}x" if one else "-"
        table.add_row(
            p.layout, str(p.workers), f"{p.rate:.1f}", speedup, f"{p.cpu_busy:.0%}", f"{p.peak_mib:.0f}"
        )
    console.print(table)
    described = machine.describe(resolve_device(Settings().device))
    versions = described.pop("versions", {})
    console.print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in dict(versions).items()))  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
