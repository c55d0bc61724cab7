"""Turning the matrix's measurements into the JSON report and the printed table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

FIGURE_LABELS = {
    "model_only": "model only (batched, random tensors on the device)",
    "decode": "read_header + decode, 1 thread, no model",
    "decoder": "a decode process's work per file (workers.prepare.load + pickling), 1 thread",
    "naive_loop": "naive loop (1 file, 1 forward pass, 1 commit)",
    "pipeline": "full pipeline (HTTP submission, Redis, radq worker, SQL)",
}
"""Figures of a row, with what each times."""


def write(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _rate(figure: Mapping[str, Any] | None) -> str:
    """Median img/s, with the range over rounds when there were several."""
    if figure is None:
        return "-"
    rounds = figure["images_per_s_rounds"]
    text = f"{figure['images_per_s']:.1f}"
    if len(rounds) > 1:
        text += f" ({min(rounds):.1f}-{max(rounds):.1f})"
    return text


def _worker_ms(pipeline: Mapping[str, Any]) -> str:
    """The median round's worker ms/img, with the range over rounds when there were several."""
    if not pipeline:
        return "-"
    text = f"{pipeline['worker_process_cpu_ms_per_image']:.2f}"
    rounds = pipeline.get("worker_process_cpu_ms_per_image_rounds", [])
    if len(rounds) > 1:
        text += f" ({min(rounds):.2f}-{max(rounds):.2f})"
    return text


def _targets(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "not measured (see notes)"
    return "\n".join(f"{t['target']}: {'met' if t['met'] else 'NOT met'}" for t in summary["targets"])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _bound(summary: Mapping[str, Any]) -> str:
    """The bounding stage, its rate, and the share of it the pipeline reached."""
    if "bound" not in summary:
        return "-"
    if summary.get("bound_img_s") is None:  # reports written before the rate was kept
        return str(summary["bound"])
    return f"{summary['bound']}: {summary['bound_img_s']:.1f} ({_ratio(summary.get('pipeline_over_bound'))})"


def _gpu_busy(figures: Mapping[str, Any]) -> str:
    """Mean GPU utilisation during the model-only and the pipeline figures."""
    shares = [(figures.get(name) or {}).get("gpu_busy_pct") for name in ("model_only", "pipeline")]
    return " / ".join("-" if share is None else f"{share:.0f} %" for share in shares)


def _rows_table(report: Mapping[str, Any]) -> Table:
    run = report["run"]
    rounds = run["rounds"]
    title = (
        f"radq throughput, img/s ({run['seconds']:g}s per figure; "
        f"{'median of ' + str(rounds) + ' rounds' if rounds > 1 else '1 round'}; device {run['device']})"
    )
    table = Table(title=title, title_justify="left")
    columns: tuple[tuple[str, str], ...] = (
        ("model", "left"), ("input", "left"), ("model only", "right"), ("naive", "right"),
        ("decode /core", "right"), ("decoder /core", "right"), ("pipeline", "right"), ("files", "right"),
        ("pipe/ model", "right"), ("pipe/ naive", "right"), ("bound", "left"), ("worker ms/img", "right"),
        ("worker MiB", "right"),
        ("load", "right"), ("targets", "left"),
    )  # fmt: skip
    on_gpu = run["device"].startswith("cuda")
    if on_gpu:
        columns = (*columns[:-1], ("GPU busy: model / pipe", "right"), columns[-1])
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in report["rows"]:
        figures, summary = row["figures"], row["summary"] or {}
        pipe = figures.get("pipeline") or {}
        cells = [
            row["model"], row["input"], _rate(figures.get("model_only")), _rate(figures.get("naive_loop")),
            _rate(figures.get("decode")), _rate(figures.get("decoder")), _rate(figures.get("pipeline")),
            str(pipe.get("images", "-")), _ratio(summary.get("pipeline_over_model_only")),
            _ratio(summary.get("pipeline_over_naive")), _bound(summary),
            _worker_ms(pipe),
            f"{pipe['worker_peak_mib']:.0f}" if pipe else "-",
            f"{pipe['load_avg_1m_before']:.2f}" if pipe else "-",
        ]  # fmt: skip
        if on_gpu:
            cells.append(_gpu_busy(figures))
        table.add_row(*cells, _targets(row["summary"]))
    return table


def _key_values(title: str, rows: Mapping[str, object]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        table.add_row(key, text)
    return table


def render(report: Mapping[str, Any], console: Console) -> None:
    """Print the rows as one table, then the machine, and notes on what was not run."""
    console.print(_rows_table(report))
    console.print(_key_values("machine", report["machine"]))
    notes: Sequence[str] = report["notes"]
    for note in notes:
        console.print(f"note: {note}")
    console.print(
        "decode (codec alone), decoder (all a decode process does per file): img/s on one core. bound: "
        "the slowest of model only, decoder per core x decode processes, the upload (files/s until the "
        "API answered), the registration of path jobs and, on a GPU, the worker process (images per "
        "CPU second of its own process, whose Python runs under one GIL) and, on a CPU, the cores the "
        "model and the decode processes share (1 / (1/model only + 1/(decoder per core x cores))); "
        "shown as stage: its img/s (pipeline / that). worker ms/img: CPU time of "
        "the worker's own process per image (not its decode processes). worker MiB: sum of VmHWM over "
        "the worker's processes during the pipeline job. load: 1-minute load average before the "
        "pipeline job (other work skews every figure). GPU busy (CUDA runs): mean share of time a "
        "kernel ran, nvidia-smi sampled every 0.2 s, during model only / the pipeline job. Details "
        "per figure in the JSON report."
    )
