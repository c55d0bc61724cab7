"""Turning measurements into the JSON report and the printed tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import Measurement

PHASES = {
    "model_only": "model only (batched)",
    "model_batch1": "model only (batch 1)",
    "decode_preprocess": "decode + preprocess (1 thread)",
    "naive_loop": "naive loop (1 file, 1 commit)",
    "pipeline": "full pipeline (HTTP + worker + SQL)",
}
"""Result keys in report order, with the label printed for each."""


def ratios(results: Mapping[str, Measurement]) -> dict[str, float | None]:
    """Pipeline throughput relative to the model alone and to the naive loop."""
    pipeline = results["pipeline"].rate

    def over(key: str) -> float | None:
        rate = results[key].rate
        return round(pipeline / rate, 3) if rate else None

    return {"pipeline_over_model_only": over("model_only"), "pipeline_over_naive": over("naive_loop")}


def build(
    *, results: Mapping[str, Measurement], machine: dict[str, object], dicom: dict[str, object],
    model: dict[str, object], run: dict[str, object],
) -> dict[str, Any]:  # fmt: skip
    """The whole report as JSON-able data."""
    return {
        "run": run,
        "machine": machine,
        "model": model,
        "dicom": dicom,
        "results": {key: results[key].as_dict() for key in PHASES if key in results},
        "ratios": ratios(results),
    }


def write(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _note(key: str, data: Mapping[str, Any]) -> str:
    if key in ("model_only", "model_batch1"):
        return f"batch {data['batch_size']}, random tensors, {data['warmup_batches']} warm-up passes"
    if key == "decode_preprocess":
        return "read_instance + preprocess, no model"
    if key == "naive_loop":
        return (
            f"decode {data['decode_preprocess_s']}s, model {data['model_s']}s, insert+commit {data['db_s']}s"
        )
    counts = ", ".join(f"{k}={v}" for k, v in sorted(data["counts"].items()))
    first, last = data["first_result_s"], data["last_result_s"]
    return (
        f"{data['database']}; {data['upload']}, upload {data['upload_s']}s; "
        f"results from {first}s to {last}s; {counts}"
    )


def _key_values(title: str, rows: Mapping[str, object]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        table.add_row(key, text)
    return table


def render(report: Mapping[str, Any], console: Console) -> None:
    """Print the report as tables: figures, ratios (of the medians), machine, model, DICOM."""
    results = report["results"]
    run = report["run"]
    title = f"radq throughput ({run['files']} files; median of {run['rounds']} interleaved rounds)"
    table = Table(title=title, title_justify="left")
    columns = (("measurement", "left"), ("images", "right"), ("seconds", "right"), ("img/s", "right"),
               ("range img/s", "right"), ("load", "right"), ("notes", "left"))  # fmt: skip
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for key, label in PHASES.items():
        if key in results:
            data = results[key]
            spread = data["images_per_s_rounds"]
            table.add_row(
                label, str(data["images"]), f"{data['seconds']:.2f}", f"{data['images_per_s']:.1f}",
                f"{min(spread):.1f}-{max(spread):.1f}", f"{data['load_avg_1m_before']:.2f}", _note(key, data),
            )  # fmt: skip
    console.print(table)
    console.print(
        _key_values(
            "ratios",
            {
                "pipeline / model only": report["ratios"]["pipeline_over_model_only"],
                "pipeline / naive loop": report["ratios"]["pipeline_over_naive"],
            },
        )
    )
    console.print(_key_values("machine", report["machine"]))
    console.print(_key_values("model", report["model"]))
    console.print(_key_values("DICOM", report["dicom"]))
    console.print(
        "img/s, seconds and notes: the median round; range: slowest and fastest round; "
        "load: 1-minute load average before the median round (other work on the machine skews every figure)"
    )
