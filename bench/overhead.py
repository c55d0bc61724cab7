"""``python -m bench.overhead``: what one worker process's engine costs per image, itself.

A GPU worker is bound by its own process: the model leaves its CPU, but everything else
(dispatching files to the decode processes and reading their results back, batching,
writing to SQL) runs in one Python process under one GIL. This measures that cost on any
CPU, without Celery, an API or Redis: the worker's real engine (``workers.context``) in this
process, fed chunks of claimed instances by ``--concurrency`` threads as Celery's would, with
the bench's near-free ``overhead-probe`` model (about 0.5 ms of CPU per image here, the part
of the figure a GPU would take away) on a fresh SQLite (or ``--database``) database.

Per round: CPU seconds of this process per image (its decode processes excluded), the
images per second, and the voluntary / involuntary context switches per image (each a
wake-up of a thread; on a busy host also a wait for the GIL); then where the CPU went, per
thread of the process (``/proc/self/task``), summed over the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import delete, func, select

from bench.inputs import DEFAULT_CACHE, INPUTS, Corpus
from bench.machine import describe
from bench.models import OVERHEAD_PROBE, model_dir
from db.jobs import NewInstance, add_instances, create_job
from db.migrate import upgrade
from db.models import Instance, Result
from db.session import transaction
from db.status import InstanceStatus, StorageKind
from radq.settings import Settings
from workers.context import WorkerContext, get_context
from workers.pipeline import run_chunk

STAGES = (
    ("message-", "message threads (claim, submit to decode, wait)"),
    ("radq-decode-dispatcher", "decode dispatcher (pipes to the decode processes)"),
    ("radq-infer", "inference streams (batching, the model, results)"),
    ("radq-writer", "writer (SQL)"),
    ("radq-maps", "Grad-CAM maps (PNG, blob store; --explain)"),
)
"""Thread name prefixes of the engine's stages, in the order shown."""


@dataclass(frozen=True)
class Round:
    images: int
    done: int
    cpu_ms_per_image: float
    images_per_s: float
    voluntary_switches: float
    involuntary_switches: float
    stage_cpu_s: dict[str, float]
    batches: float
    """Forward passes the round ran."""
    forward_s: float
    """Wall seconds of those passes (the streams' ``radq_worker_infer_seconds``), all streams."""


def _batches(ctx: WorkerContext, model: str) -> tuple[float, float]:
    """(forward passes, their wall seconds) of ``model`` so far, from the worker's metrics."""
    registry = ctx.engine.metrics.registry
    labels = {"model": model}
    count = registry.get_sample_value("radq_worker_infer_seconds_count", labels) or 0.0
    return count, registry.get_sample_value("radq_worker_infer_seconds_sum", labels) or 0.0


def _stage_of(thread_name: str | None) -> str:
    for prefix, stage in STAGES:
        if thread_name and thread_name.startswith(prefix):
            return stage
    return "other threads (main, torch, libraries)"


def _cpu_by_stage() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process's threads, summed per stage."""
    ticks = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    by_stage: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        stage = _stage_of(names.get(int(task.name)))
        by_stage[stage] = by_stage.get(stage, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return by_stage


def _register(
    ctx: WorkerContext, files: Sequence[Path], model: str, dedup: bool = False, explain: float | None = None
) -> tuple[str, list[int]]:
    """A queued job of ``files`` (read in place), recorded as the API records a path submission.

    With ``dedup`` the job asks for deduplication (the API's default) and the results of
    earlier rounds are deleted first, so that every round is a first submission: what
    deduplication costs when it finds nothing to reuse. With ``explain`` the job asks for
    Grad-CAM maps of every label scoring at least that much.
    """
    with transaction(ctx.sessions) as session:
        if dedup:
            session.execute(delete(Result))
        options: dict[str, object] = {"dedup": dedup}
        if explain is not None:
            options["explain_threshold"] = explain
        job = create_job(session, models=[model], options=options)
        found = [NewInstance(f.name, StorageKind.PATH, str(f)) for f in files]
        return job.id, add_instances(session, job_id=job.id, files=found)


def _run(ctx: WorkerContext, job_id: str, ids: list[int], concurrency: int) -> None:
    """Chunks of the job through the worker's task body (claim, leases, engine) from
    ``concurrency`` threads, as Celery's thread pool runs them."""
    size = ctx.settings.chunk_size
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    lock = threading.Lock()

    def take() -> None:
        while True:
            with lock:
                if not chunks:
                    return
                chunk = chunks.pop(0)
            run_chunk(ctx, job_id, chunk, worker="bench-overhead")

    threads = [threading.Thread(target=take, name=f"message-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _round(ctx: WorkerContext, files: Sequence[Path], args: argparse.Namespace, concurrency: int) -> Round:
    model = args.model
    job_id, ids = _register(ctx, files, model, args.dedup, args.explain)
    stages = _cpu_by_stage()
    batches, forward_s = _batches(ctx, model)
    usage, cpu, wall = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    _run(ctx, job_id, ids, concurrency)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    batches_after, forward_after = _batches(ctx, model)
    stage_cpu = {k: v - stages.get(k, 0.0) for k, v in _cpu_by_stage().items()}
    # The message threads have ended by now, and their /proc entries with them: theirs is the rest.
    stage_cpu[STAGES[0][1]] = max(0.0, cpu - sum(stage_cpu.values()))
    with transaction(ctx.sessions) as session:
        done = session.scalar(
            select(func.count()).where(Instance.job_id == job_id, Instance.status == InstanceStatus.DONE)
        )
    n = len(ids)
    return Round(
        images=n,
        done=int(done or 0),
        cpu_ms_per_image=1000 * cpu / n,
        images_per_s=n / wall,
        voluntary_switches=(after.ru_nvcsw - usage.ru_nvcsw) / n,
        involuntary_switches=(after.ru_nivcsw - usage.ru_nivcsw) / n,
        stage_cpu_s=stage_cpu,
        batches=batches_after - batches,
        forward_s=forward_after - forward_s,
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="ct", choices=sorted(INPUTS), help="input kind")
    parser.add_argument("--images", type=int, default=2000, help="files per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=OVERHEAD_PROBE, help="model every job runs")
    parser.add_argument("--database", help="SQLAlchemy URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--dedup", action="store_true", help="jobs ask for deduplication (the API's default), finding nothing"
    )
    parser.add_argument(
        "--explain", type=float, metavar="THRESHOLD",
        help="jobs ask for Grad-CAM maps of every label at or above THRESHOLD (0: all)",
    )  # fmt: skip
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where generated corpora are kept")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    files = Corpus(INPUTS[args.input], cache=args.cache, seed=0).files(args.images)
    base = Settings()
    with tempfile.TemporaryDirectory(prefix="radq-overhead-") as tmp:
        work = Path(tmp)
        url = args.database or f"sqlite:///{work / 'radq.db'}"
        upgrade(url)
        settings = base.model_copy(
            update={
                "database_url": url,
                "home": work / "home",
                "model_dir": model_dir(base.model_dir, work / "models"),
                "allowed_roots": [args.cache.resolve()],
            }
        )
        ctx = get_context(settings)
        try:
            console.print(
                f"warm-up (model load, decode processes), then {args.rounds} rounds of {len(files)} files"
            )
            _run(
                ctx,
                *_register(ctx, files[: 2 * settings.chunk_size], args.model, explain=args.explain),
                settings.worker_concurrency,
            )
            concurrency = settings.worker_concurrency
            rounds = [_round(ctx, files, args, concurrency) for _ in range(args.rounds)]
        finally:
            ctx.engine.close()
    _render(console, rounds, args, settings, ctx)
    return 0 if all(r.done == r.images for r in rounds) else 1


def _render(
    console: Console,
    rounds: Sequence[Round],
    args: argparse.Namespace,
    settings: Settings,
    ctx: WorkerContext,
) -> None:
    table = Table(
        title=f"one worker engine in process: {args.model} on {args.input}"
        f"{', deduplication on' if args.dedup else ''}"
        f"{f', Grad-CAM maps at >= {args.explain:g}' if args.explain is not None else ''}, "
        f"{settings.worker_concurrency} messages in hand, chunks of {settings.chunk_size}, "
        f"{ctx.engine.decoders.processes} decode processes",
        title_justify="left",
    )
    for name in (
        "round",
        "images",
        "done",
        "CPU ms/img",
        "img/s",
        "voluntary switches/img",
        "involuntary/img",
        "img/batch",
        "forward ms/img",
    ):
        table.add_column(name, justify="right")
    for i, r in enumerate(rounds, 1):
        table.add_row(
            str(i), str(r.images), str(r.done), f"{r.cpu_ms_per_image:.3f}", f"{r.images_per_s:.0f}",
            f"{r.voluntary_switches:.1f}", f"{r.involuntary_switches:.1f}",
            f"{r.images / r.batches:.1f}" if r.batches else "-",
            f"{1000 * r.forward_s / r.images:.2f}",
        )  # fmt: skip
    console.print(table)
    images = sum(r.images for r in rounds)
    stages = Table(title="where this process's CPU went, all rounds", title_justify="left")
    for name, justify in (("thread", "left"), ("CPU ms/img", "right"), ("share", "right")):
        stages.add_column(name, justify=justify)  # type: ignore[arg-type]
    totals: dict[str, float] = {}
    for r in rounds:
        for stage, seconds in r.stage_cpu_s.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    whole = sum(totals.values()) or 1.0
    for stage, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        stages.add_row(stage, f"{1000 * seconds / images:.3f}", f"{100 * seconds / whole:.0f} %")
    console.print(stages)
    cpu = [r.cpu_ms_per_image for r in rounds]
    machine = describe(ctx.models.device)
    console.print(
        f"median {statistics.median(cpu):.3f} ms of this process's CPU per image "
        f"({min(cpu):.3f}-{max(cpu):.3f}); "
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch_threads']} thread(s)"
    )


if __name__ == "__main__":  # decode processes import this module as __mp_main__: nothing runs then
    sys.exit(main())
