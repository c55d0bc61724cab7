"""GPU utilisation in the bench's report: sampled from the driver's tool while a figure runs."""

from __future__ import annotations

import io
import stat
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench.gpu_busy import GpuBusy, gpu_uuid, parse_samples
from bench.report import render


def _fake_tool(tmp_path: Path, lines: str) -> str:
    """An executable that prints ``lines`` as ``nvidia-smi -lms`` would, then keeps sampling."""
    tool = tmp_path / "fake-nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{lines}'\nexec sleep 60\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return str(tool)


def test_samples_are_averaged_and_lines_that_are_no_sample_left_out(tmp_path: Path) -> None:
    assert parse_samples("37\n[N/A]\n 45 \n\n") == [37.0, 45.0]
    with GpuBusy("GPU-0000", command=_fake_tool(tmp_path, "50\\n70\\n")) as busy:
        time.sleep(0.5)  # the figure's span; the tool prints, then samples on until stopped
    assert busy.percent == 60.0
    assert busy.as_detail() == {"gpu_busy_pct": 60.0, "gpu_busy_samples": 2}


def test_without_a_gpu_the_figure_says_why_there_is_no_share(tmp_path: Path) -> None:
    assert gpu_uuid(torch.device("cpu")) is None
    with GpuBusy(None) as busy:
        pass
    assert busy.as_detail() == {"gpu_busy_pct": None, "gpu_busy_why": "no GPU"}
    with GpuBusy("GPU-0000", command=str(tmp_path / "absent")) as busy:
        pass
    assert busy.percent is None and "not found" in str(busy.why)
    with GpuBusy("GPU-0000", command=_fake_tool(tmp_path, "No devices were found\\n")) as busy:
        time.sleep(0.3)
    assert busy.percent is None and "No devices were found" in str(busy.why)


def _report(device: str) -> dict[str, Any]:
    def figure(rate: float, busy: float | None) -> dict[str, Any]:
        return {"images_per_s": rate, "images_per_s_rounds": [rate], "gpu_busy_pct": busy}

    pipeline = figure(650.0, 41.0) | {
        "images": 4000, "worker_process_cpu_ms_per_image": 1.5, "worker_peak_mib": 2100.0,
        "load_avg_1m_before": 0.4,
    }  # fmt: skip
    row = {
        "model": "densenet121-ct",
        "input": "ct",
        "figures": {"model_only": figure(6200.0, 97.0), "pipeline": pipeline},
        "summary": None,
    }
    run = {"seconds": 5.0, "rounds": 1, "device": device}
    return {"run": run, "rows": [row], "machine": {"device": device}, "notes": []}


def test_a_cuda_report_shows_how_busy_the_gpu_was_and_a_cpu_report_does_not() -> None:
    def rendered(device: str) -> str:
        out = io.StringIO()
        render(_report(device), Console(file=out, width=400))
        return out.getvalue()

    cuda = rendered("cuda")
    assert "GPU busy" in cuda and "97 % / 41 %" in cuda
    assert "97 % / 41 %" not in rendered("cpu")
