"""``python -m bench.archive``: archive-scale submission, and the wait of an urgent job.

First, a plain tar of distinct 512x512 CT slices (default 1 GiB) is uploaded to a fresh
API, then the same files as a folder (``radq submit`` sends it as a tar made as it is
read): seconds, MiB/s, the bytes the API wrote, and the API's peak memory, which shows
the upload is streamed to the blob store rather than held.

Then for each tree size (default 10,000 and 100,000 files), on a fresh database and a fresh
``radq api`` process with no worker running:

- seconds until ``POST /v1/jobs {"paths": [tree]}`` answers with the job id;
- files registered per second by the background enumeration (its own clock, in SQL);
- seconds until the last instance is queued (its message is in Redis);
- the API process's peak resident memory (``VmHWM``) before and after.

Then, with the largest tree's bulk job queued, one ``radq worker`` starts on it; once it
is busy, an urgent job (real CT slices, uploaded) is submitted and timed until it is
done, three times; the same job on an idle worker gives the baseline. The wait behind
the backlog is the difference.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import torch
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bench import machine, report
from bench.stack import DATABASES, BenchError, Stack, embedded_stack, log_tail, start_worker
from bench.tree import REAL_CT, make_tree
from db.jobs import as_utc
from db.models import Instance
from radq.errors import RadqError
from radq.services import stop
from radq.settings import Settings

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "archive.json"
"""Where the JSON report goes unless --out says otherwise (git-ignored)."""
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
"""Server used with --database postgresql; the bench creates and drops its own database there."""
POLL_SECONDS = 0.5
"""How often the job is polled while it registers (timings come from SQL, not from polling)."""
URGENT_FILES = 8
"""Instances in the urgent job: one small study."""
URGENT_ROUNDS = 3
"""Urgent jobs timed behind the backlog (and on the idle worker)."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__)
    parser.add_argument(
        "--files", default="10000,100000", help="tree sizes, comma-separated (default 10000,100000)"
    )
    parser.add_argument("--database", choices=DATABASES, default="sqlite")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--upload-mib", type=int, default=1024, help="size of the uploaded tar (0: skip)")
    parser.add_argument("--model", default="radq-smoke", help="model the jobs run (default radq-smoke)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds any one phase may take")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted(int(n) for n in args.files.split(","))
    except ValueError:
        parser.error("--files takes comma-separated integers")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--files must name at least one positive size")
    return args


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise BenchError("no VmHWM in /proc/<pid>/status (not Linux?)")


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    stack.check_alive()
    return stack.client.job(job_id)


def _wait(stack: Stack, job_id: str, done: str, timeout: float) -> dict[str, Any]:
    """Poll until ``done`` ('registered' or 'finished') holds for the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = _job(stack, job_id)
        if done == "registered":
            if job["registration"]["status"] != "registering" and job["counts"]["pending"] == 0:
                return job
        elif job["status"] in ("done", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} not {done} after {timeout:.0f}s: {job['counts']}\n"
                             f"{log_tail(stack.logs / 'api.log')}")  # fmt: skip
        time.sleep(POLL_SECONDS if done == "registered" else 0.05)


def submission(
    args: argparse.Namespace, base: Settings, work: Path, files: int, *, urgent: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Time one path submission on a fresh stack; with ``urgent``, then the urgent-job wait."""
    tree = make_tree(work / "archive" / f"tree-{files}", files)
    home = work / f"home-{files}"
    # Every file of the tree is the same instance: deduplication would skip all but one.
    settings = base.model_copy(
        update={"allowed_roots": [work / "archive"], "default_models": [args.model], "dedup": False}
    )
    with embedded_stack(
        settings, home=home, database=args.database, postgres_admin_url=args.postgres_url, worker=False
    ) as stack:
        idle_mib = _peak_rss_mib(stack.api.pid)
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        response = httpx.post(
            f"{stack.api_url}/v1/jobs", json={"paths": [str(tree)]}, timeout=600,
            headers={"Authorization": f"Bearer {stack.token}"},
        )  # fmt: skip
        answered_s = time.perf_counter() - t0
        if response.status_code != 202:
            raise BenchError(f"submission refused: {response.status_code} {response.text}")
        job_id = response.json()["id"]
        job = _wait(stack, job_id, "registered", args.timeout)
        registration = job["registration"]
        with stack.engine.connect() as conn:
            last_queued = conn.execute(
                select(func.max(Instance.updated_at)).where(Instance.job_id == job_id)
            ).scalar_one()
        figure = {
            "files": files,
            "answered_s": round(answered_s, 3),
            "status_in_answer": response.json()["status"],
            "registered": registration["registered"],
            "queued": job["counts"]["queued"],
            "registration_s": _seconds(registration["started_at"], registration["finished_at"]),
            "registered_per_s": registration["rate_per_s"],
            "last_queued_s": round((as_utc(last_queued) - started).total_seconds(), 2),  # type: ignore[operator]
            "api_rss_idle_mib": idle_mib,
            "api_rss_peak_mib": _peak_rss_mib(stack.api.pid),
        }
        return figure, urgent_wait(args, stack, job_id, work) if urgent else None


def _make_upload(path: Path, mib: int, seed: int = 0) -> int:
    """A plain tar of distinct 512x512 CT slices (real header, random pixels), ``mib`` MiB in all.

    Returns:
        The number of members.
    """
    ds = pydicom.dcmread(REAL_CT)
    ds.Rows = ds.Columns = 512
    rng = np.random.default_rng(seed)
    members = max(1, mib * 1024**2 // (512 * 512 * 2))
    with tarfile.open(path, "w") as tar:
        for i in range(members):
            ds.SOPInstanceUID = f"{ds.SOPInstanceUID.rsplit('.', 1)[0]}.{900000 + i}"
            ds.PixelData = rng.integers(0, 2000, (512, 512), dtype=np.int16).tobytes()
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            info = tarfile.TarInfo(f"ct/{i:05d}.dcm")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return members


def _written_mib(pid: int) -> float:
    """Bytes the process has caused to be written to storage so far (Linux ``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    raise BenchError("no write_bytes in /proc/<pid>/io (not Linux?)")


def _upload_once(
    args: argparse.Namespace, base: Settings, home: Path, what: Path, members: int
) -> dict[str, Any]:
    """``what`` (a tar, or a folder: sent as a tar made as it is read) uploaded to a fresh API."""
    settings = base.model_copy(update={"default_models": [args.model], "dedup": False})
    with embedded_stack(
        settings, home=home, database=args.database, postgres_admin_url=args.postgres_url, worker=False,
    ) as stack:  # fmt: skip
        idle_mib = _peak_rss_mib(stack.api.pid)
        written_before = _written_mib(stack.api.pid)
        t0 = time.perf_counter()
        job = stack.client.upload([what])
        seconds = time.perf_counter() - t0
        if job["counts"]["total"] != members:
            raise BenchError(f"upload recorded {job['counts']['total']} of {members} members")
        return {
            "seconds": round(seconds, 2),
            "api_rss_idle_mib": idle_mib,
            "api_rss_peak_mib": _peak_rss_mib(stack.api.pid),
            "api_written_mib": round(_written_mib(stack.api.pid) - written_before, 1),
        }


def upload_figure(args: argparse.Namespace, base: Settings, work: Path) -> dict[str, Any]:
    """Upload one large tar, then the same files as a folder, each to a fresh stack: seconds,
    MiB/s, the API's peak memory and the bytes it wrote."""
    bundle = work / "upload.tar"
    members = _make_upload(bundle, args.upload_mib)
    size = bundle.stat().st_size
    tar = _upload_once(args, base, work / "home-upload", bundle, members)
    folder = work / "upload-folder"
    with tarfile.open(bundle) as archive:
        archive.extractall(folder, filter="data")
    bundle.unlink()
    as_folder = _upload_once(args, base, work / "home-upload-folder", folder / "ct", members)
    shutil.rmtree(folder)
    return {
        "bytes": size,
        "members": members,
        **tar,
        "mib_per_s": round(size / 1024**2 / tar["seconds"], 1),
        "folder": {**as_folder, "mib_per_s": round(size / 1024**2 / as_folder["seconds"], 1)},
    }


def _seconds(start: str, end: str | None) -> float | None:
    if end is None:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 2)


def _urgent_study(work: Path, index: int) -> list[Path]:
    folder = work / f"urgent-{index}"
    folder.mkdir()
    for i in range(URGENT_FILES):
        shutil.copy(REAL_CT, folder / f"{i}.dcm")
    return [folder]


def _time_urgent(stack: Stack, args: argparse.Namespace, work: Path, index: int) -> float:
    t0 = time.perf_counter()
    job = stack.client.upload(_urgent_study(work, index), [args.model], None, priority="urgent", force=True)
    final = _wait(stack, job["id"], "finished", args.timeout)
    if final["counts"]["done"] != URGENT_FILES:
        raise BenchError(f"urgent job {job['id']} did not finish cleanly: {final['counts']}")
    return time.perf_counter() - t0


def urgent_wait(args: argparse.Namespace, stack: Stack, bulk_id: str, work: Path) -> dict[str, Any]:
    """Start a worker on the queued bulk job; time urgent jobs behind it and on an idle worker."""
    worker = start_worker(stack.settings, stack.logs / "worker.log")
    stack.worker = worker
    try:
        deadline = time.monotonic() + args.timeout
        while (bulk := _job(stack, bulk_id))["counts"]["done"] < 2 * stack.settings.chunk_size:
            if time.monotonic() > deadline:
                tail = log_tail(stack.logs / "worker.log")
                raise BenchError(f"the worker did not start on the bulk job:\n{tail}")
            time.sleep(0.2)
        t_busy = time.perf_counter()
        done_before = bulk["counts"]["done"]
        behind = [_time_urgent(stack, args, work, i) for i in range(URGENT_ROUNDS)]
        bulk = _job(stack, bulk_id)
        bulk_rate = (bulk["counts"]["done"] - done_before) / (time.perf_counter() - t_busy)
        stack.client.cancel(bulk_id)
        _wait(stack, bulk_id, "finished", args.timeout)
        idle = [_time_urgent(stack, args, work, URGENT_ROUNDS + i) for i in range(URGENT_ROUNDS)]
    finally:
        stop(worker)
    backlog = bulk["counts"]["queued"]
    return {
        "urgent_files": URGENT_FILES,
        "behind_bulk_s": [round(s, 2) for s in behind],
        "idle_worker_s": [round(s, 2) for s in idle],
        "wait_s": round(statistics.median(behind) - statistics.median(idle), 2),
        "bulk_queued_at_the_time": backlog,
        "bulk_rate_per_s": round(bulk_rate, 1),
        "backlog_drain_s": round(backlog / bulk_rate, 0) if bulk_rate else None,
        "chunk_size": stack.settings.chunk_size,
    }


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"path submission ({result['run']['database']})", title_justify="left")
    for column in ("files", "job id after s", "registered/s", "registration s", "last queued s",
                   "API RSS idle MiB", "API RSS peak MiB"):  # fmt: skip
        table.add_column(column, justify="right")
    for f in result["submission"]:
        table.add_row(
            f"{f['files']:,}", f"{f['answered_s']:.3f}", f"{f['registered_per_s']:,.0f}",
            f"{f['registration_s']}", f"{f['last_queued_s']}", f"{f['api_rss_idle_mib']}",
            f"{f['api_rss_peak_mib']}",
        )  # fmt: skip
    console.print(table)
    u = result["urgent"]
    console.print(
        f"urgent job ({u['urgent_files']} CT slices, uploaded) behind a running bulk job with "
        f"{u['bulk_queued_at_the_time']:,} instances queued ({u['bulk_rate_per_s']} img/s, "
        f"~{u['backlog_drain_s']} s of backlog): done in {u['behind_bulk_s']} s; on an idle worker "
        f"{u['idle_worker_s']} s; wait caused by the backlog: {u['wait_s']} s"
    )
    if (up := result["upload"]) is not None:
        for what, fig in (("tar", up), ("folder (sent as a tar made as it is read)", up.get("folder"))):
            if fig is None:
                continue
            console.print(
                f"upload of a {up['bytes'] / 1024**2:,.0f} MiB {what} ({up['members']:,} CT slices): "
                f"{fig['seconds']} s ({fig['mib_per_s']} MiB/s) until the job answered; "
                f"API RSS {fig['api_rss_idle_mib']} MiB idle, {fig['api_rss_peak_mib']} MiB peak; "
                f"the API wrote {fig.get('api_written_mib', '?')} MiB"
            )
    m = result["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; python {m['python']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    console = Console(width=150)
    base = Settings()
    figures: list[dict[str, Any]] = []
    urgent: dict[str, Any] | None = None
    upload: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="radq-bench-archive-") as tmp:
            work = Path(tmp)
            if args.upload_mib:
                console.print(f"uploading a {args.upload_mib} MiB tar of CT slices to a fresh API ...")
                upload = upload_figure(args, base, work)
            for files in args.sizes:
                last = files == args.sizes[-1]
                console.print(f"{files:,} files: making the tree, starting a fresh API, submitting ...")
                figure, found = submission(args, base, work, files, urgent=last)
                figures.append(figure)
                urgent = found or urgent
    except RadqError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    result = {
        "submission": figures,
        "urgent": urgent,
        "upload": upload,
        "machine": machine.describe(torch.device("cpu")),
        "run": {
            "database": args.database,
            "model": args.model,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.archive", *sys.argv[1:]]),
        },
    }
    report.write(result, args.out)
    render(result, console)
    console.print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
