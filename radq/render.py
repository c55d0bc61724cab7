"""Terminal output for the CLI: progress while a job runs, results as table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from radq.client import Client

FINAL = ("done", "failed", "skipped")


def wait_for_job(
    client: Client,
    job_id: str,
    console: Console,
    *,
    timeout: float,
    poll: float = 0.5,
    alive: Callable[[], str | None] = lambda: None,
) -> dict[str, Any]:
    """Poll a job until it ends, showing a progress bar; returns the final job.

    ``alive`` returns a message when something the job depends on has died.
    """
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=None, detail="")
        while True:
            job = client.job(job_id)
            c = job["counts"]
            finished = sum(c[k] for k in FINAL)
            detail = f"done {c['done']} failed {c['failed']} skipped {c['skipped']}"
            registration = job.get("registration") or {}
            if registration.get("status") == "registering":
                detail = f"registering: {registration['files_seen']} files found; {detail}"
            progress.update(task, total=c["total"], completed=finished, detail=detail)
            if job["status"] in ("done", "cancelled"):
                return job
            if (problem := alive()) is not None:
                raise RuntimeError(problem)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} did not finish within {timeout:.0f}s (status {job['status']})"
                )
            time.sleep(poll)


def job_table(job: dict[str, Any]) -> Table:
    c = job["counts"]
    table = Table(title=f"job {job['id']}: {job['status']}", show_header=True)
    for key in ("total", "done", "failed", "skipped", "queued", "processing"):
        table.add_column(key, justify="right")
    table.add_row(*(str(c[k]) for k in ("total", "done", "failed", "skipped", "queued", "processing")))
    return table


def problems_table(instances: list[dict[str, Any]]) -> Table:
    table = Table(title="files without a result", show_lines=False)
    table.add_column("file")
    table.add_column("status")
    table.add_column("reason")
    for inst in instances:
        table.add_row(inst["file_name"], inst["status"], inst["reason"] or "")
    return table


def _top(outputs: dict[str, float], n: int = 2) -> str:
    best = sorted(outputs.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{label} {p:.3f}" for label, p in best)


def studies_table(studies: list[dict[str, Any]]) -> Table:
    """One row per study and model: modality, instance count, highest-scoring labels."""
    table = Table(title="results per study (study summary: top labels)")
    table.add_column("StudyInstanceUID", overflow="fold")
    table.add_column("modality")
    table.add_column("instances", justify="right")
    table.add_column("model")
    table.add_column("top labels")
    for study in studies:
        modalities = sorted({s["modality"] or "?" for s in study["series"]})
        n = sum(len(s["instances"]) for s in study["series"])
        summaries = study["summary"] or [None]
        for summary in summaries:
            table.add_row(
                study["study_instance_uid"],
                "/".join(modalities),
                str(n),
                f"{summary['model']} {summary['model_version']}" if summary else "-",
                _top(summary["outputs"]) if summary else "no results",
            )
    return table


def results_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a study's results: one row per instance, model and label."""
    rows = []
    for series in study["series"]:
        for inst in series["instances"]:
            for result in inst["results"]:
                for label, prob in result["outputs"].items():
                    rows.append(
                        {
                            "study_instance_uid": study["study_instance_uid"],
                            "series_instance_uid": series["series_instance_uid"],
                            "sop_instance_uid": inst["sop_instance_uid"],
                            "file_name": inst["file_name"],
                            "model": result["model"],
                            "model_version": result["model_version"],
                            "precision": result.get("precision"),
                            "label": label,
                            "probability": prob,
                        }
                    )
    return rows


def format_results(study: dict[str, Any], fmt: str) -> str | Table:
    if fmt == "json":
        return json.dumps(study, indent=2)
    rows = results_rows(study)
    if fmt == "csv":
        buf = io.StringIO()
        fields = [
            "study_instance_uid",
            "series_instance_uid",
            "sop_instance_uid",
            "file_name",
            "model",
            "model_version",
            "precision",
            "label",
            "probability",
        ]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    table = Table(title=f"study {study['study_instance_uid']}")
    for col in ("series", "SOPInstanceUID", "model", "outputs"):
        table.add_column(col, overflow="fold")
    for series in study["series"]:
        for inst in series["instances"]:
            for result in inst["results"] or [None]:
                table.add_row(
                    f"{series['modality'] or '?'} {series['series_instance_uid'] or ''}",
                    inst["sop_instance_uid"] or inst["file_name"],
                    f"{result['model']} {result['model_version']}" if result else inst["status"],
                    _top(result["outputs"], 4) if result else (inst["reason"] or ""),
                )
    for summary in study["summary"]:
        table.add_row(
            "study summary",
            f"({summary['aggregation']} over {summary['instances']})",
            f"{summary['model']} {summary['model_version']}",
            _top(summary["outputs"], 4),
        )
    return table


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="jobs (newest first)")
    columns = ("id", "status", "priority", "created", "total", "done", "failed", "skipped", "img/s", "ETA s")
    for col in columns:
        table.add_column(col, overflow="fold")
    for job in jobs:
        c, p = job["counts"], job["progress"]
        eta = p["eta_seconds"]
        table.add_row(
            job["id"], job["status"], job["priority"], job["created_at"][:19],
            *(str(c[k]) for k in ("total", "done", "failed", "skipped")),
            f"{p['rate_per_s']:.1f}" if p["rate_per_s"] else "-", "-" if eta is None else f"{eta:.0f}",
        )  # fmt: skip
    return table
