"""The full-pipeline figure: upload files over HTTP, wait until SQL says every instance is final."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from bench.machine import load_average
from bench.measure import Measurement
from bench.memory import TreePeak
from bench.stack import BenchError, Stack, decode_processes, log_tail
from db.jobs import as_utc
from db.models import Instance, JobSource, Result
from db.status import FINAL_STATUSES
from radq.client import MAX_PARTS
from workers.device import resolve_device
from workers.engine import infer_streams

SUBMIT_JOB_PER_FILE = "job-per-file"
SUBMIT_MODES = ("paths", "upload", SUBMIT_JOB_PER_FILE)
"""How the pipeline figure submits its files (see :func:`run_job`)."""
POLL_SECONDS = 0.1
"""How often the database is asked whether the job is finished."""


@dataclass(frozen=True)
class JobRun:
    """One submitted job (or one per file), timed from the start of the upload until its
    last instance was final."""

    job_id: str
    """The (first) job's id."""
    files: int
    upload_s: float
    total_s: float
    counts: dict[str, int]
    first_result_s: float | None
    last_result_s: float | None
    registered_s: float | None = None
    """Seconds from the start until a path job's last file was registered (None: an upload)."""
    jobs: int = 1


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) that process ``pid`` has used so far; its
    children, e.g. the decode processes, not included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _final_count(stack: Stack, job_ids: Sequence[str]) -> int:
    query = select(func.count()).where(Instance.job_id.in_(job_ids), Instance.status.in_(FINAL_STATUSES))
    with stack.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _counts(stack: Stack, job_ids: Sequence[str]) -> dict[str, int]:
    query = (
        select(Instance.status, func.count()).where(Instance.job_id.in_(job_ids)).group_by(Instance.status)
    )
    with stack.engine.connect() as conn:
        return {str(status): int(n) for status, n in conn.execute(query)}


def _result_span(
    stack: Stack, job_ids: Sequence[str], started: datetime
) -> tuple[float | None, float | None]:
    """Seconds from ``started`` to the jobs' first and last stored result (worker-side clock)."""
    query = (
        select(func.min(Result.created_at), func.max(Result.created_at))
        .join(Instance, Instance.id == Result.instance_id)
        .where(Instance.job_id.in_(job_ids))
    )
    with stack.engine.connect() as conn:
        row = conn.execute(query).one()
    first, last = as_utc(row[0]), as_utc(row[1])
    return (
        (first - started).total_seconds() if first else None,
        (last - started).total_seconds() if last else None,
    )


def _registered_s(stack: Stack, job_ids: Sequence[str], started: datetime) -> float | None:
    """Seconds from ``started`` until the API had registered every file of path jobs."""
    query = select(func.max(JobSource.finished_at)).where(JobSource.job_id.in_(job_ids))
    with stack.engine.connect() as conn:
        finished = as_utc(conn.execute(query).scalar_one())
    return (finished - started).total_seconds() if finished else None


def run_job(
    stack: Stack, files: Sequence[Path], *, models: Sequence[str], timeout: float, submit: str = "paths"
) -> JobRun:
    """Submit ``files`` as one job (or one job per file) and wait until every instance is final.

    ``submit``: ``paths`` asks the API to read the files where they are (an archive on
    shared storage: registration and queueing overlap the work); ``upload`` sends them
    over HTTP (one tar above :data:`MAX_PARTS` files), recorded once fully arrived;
    ``job-per-file`` posts each path as a job of its own, one after the other, as a
    C-STORE or STOW-RS stream of single images would come, while the worker runs them.
    Jobs are sent with ``force``: their instances are inferred even when the same instance
    was processed before (the bench submits the same files in every round).

    Raises:
        BenchError: the API registered a different number of files, a service exited,
            or the job did not finish within ``timeout`` seconds.
    """
    started_at = datetime.now(UTC)
    start = time.perf_counter()
    if submit == "paths":
        jobs = [stack.client.submit_paths([str(p.resolve()) for p in files], models=models, force=True)]
    elif submit == SUBMIT_JOB_PER_FILE:
        jobs = [stack.client.submit_paths([str(p.resolve())], models=models, force=True) for p in files]
    else:
        jobs = [stack.client.upload(list(files), models=models, force=True)]
    upload_s = time.perf_counter() - start
    job_ids, total = [str(job["id"]) for job in jobs], len(files)
    if submit == "upload" and int(jobs[0]["counts"]["total"]) != total:
        raise BenchError(
            f"job {job_ids[0]} registered {jobs[0]['counts']['total']} instances; {total} files were sent"
        )
    what = f"job {job_ids[0]}" if len(job_ids) == 1 else f"{len(job_ids)} jobs ({job_ids[0]}, ...)"
    while _final_count(stack, job_ids) < total:
        stack.check_alive()
        if time.perf_counter() - start > timeout:
            raise BenchError(
                f"{what} did not finish within {timeout:g}s: {_counts(stack, job_ids)}\n"
                f"{log_tail(stack.logs / 'worker.log')}"
            )
        time.sleep(POLL_SECONDS)
    total_s = time.perf_counter() - start
    first, last = _result_span(stack, job_ids, started_at)
    registered = _registered_s(stack, job_ids, started_at) if submit != "upload" else None
    counts = _counts(stack, job_ids)
    return JobRun(job_ids[0], total, upload_s, total_s, counts, first, last, registered, jobs=len(job_ids))


def _submitted(submit: str, files: int) -> str:
    if submit == "paths":
        return f"{files} paths, read in place"
    if submit == SUBMIT_JOB_PER_FILE:
        return f"{files} jobs of one path each, posted one after the other"
    return "one tar archive" if files > MAX_PARTS else f"{files} multipart parts"


def warm_up(
    stack: Stack, files: Sequence[Path], *, model: str, timeout: float, submit: str = "paths"
) -> JobRun:
    """Run an untimed warm-up job: it starts the worker's children, loads the model and codecs.

    Raises:
        BenchError: as :func:`run_job`, or a warm-up file was not processed.
    """
    warm = run_job(stack, files, models=[model], timeout=timeout, submit=submit)
    if warm.counts.get("done", 0) != warm.files:
        raise BenchError(f"the warm-up job {warm.job_id} did not process cleanly: {warm.counts}")
    return warm


def pipeline(
    stack: Stack, files: Sequence[Path], *, model: str, timeout: float, submit: str = "paths"
) -> Measurement:
    """Time one job of ``files`` through the running stack (after :func:`warm_up`).

    The worker's peak memory over the job (its process tree, peaks reset at the start)
    is part of the details.

    Raises:
        BenchError: as :func:`run_job`, or the stack has no worker.

    Returns:
        The job's figure; its details name the job, its outcome counts, phases and memory.
    """
    if stack.worker is None:
        raise BenchError("the pipeline figure needs a running worker")
    load = load_average()
    cpu_before = process_cpu_s(stack.worker.pid)
    with TreePeak(stack.worker.pid) as memory:
        run = run_job(stack, files, models=[model], timeout=timeout, submit=submit)
    # The worker's own process (Celery, the inference and writer threads): Python in one
    # process, so about one core's worth is all it can use, whatever the decoders do.
    worker_cpu_s = process_cpu_s(stack.worker.pid) - cpu_before
    settings = stack.settings
    detail: dict[str, object] = {
        "job_id": run.job_id,
        "jobs": run.jobs,
        "counts": run.counts,
        "submit": _submitted(submit, len(files)),
        "upload_s": round(run.upload_s, 3),
        "registered_s": None if run.registered_s is None else round(run.registered_s, 3),
        "first_result_s": None if run.first_result_s is None else round(run.first_result_s, 3),
        "last_result_s": None if run.last_result_s is None else round(run.last_result_s, 3),
        "worker": f"1 worker process ({settings.worker_concurrency} messages in hand, up to "
        f"{settings.worker_max_messages} while they are small)",
        "infer_streams": infer_streams(settings, resolve_device(settings.device).type),
        "batch_size": settings.batch_size,
        "chunk_size": settings.chunk_size,
        "decode_processes": decode_processes(settings),
        "database": stack.engine.url.get_backend_name(),
        "worker_process_cpu_s": round(worker_cpu_s, 3),
        "worker_process_cpu_ms_per_image": round(1000 * worker_cpu_s / len(files), 3),
        "worker_process_cores_busy": round(worker_cpu_s / run.total_s, 3),
        "worker_peak_mib": memory.hwm_mib,
        "worker_peak_rss_sampled_mib": memory.rss_mib,
        "worker_processes": memory.processes,
        "worker_peak_reset": memory.reset,
    }
    return Measurement(len(files), run.total_s, detail, load)
