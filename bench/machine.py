"""What the benchmark ran on: CPU, memory, library versions, torch threads and device."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

LIBRARIES = (
    "torch", "pydicom", "numpy", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pyjpegls", "imagecodecs",
    "pillow", "celery", "sqlalchemy", "fastapi", "redis", "psycopg",
)  # fmt: skip
"""Packages whose versions a report lists."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def describe(device: torch.device) -> dict[str, object]:
    """The machine and software a run measured, as plain JSON-able values."""
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "versions": {name: _version(name) for name in LIBRARIES},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    elif torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name(0)} (not used: device {device})"
    else:
        info["gpu"] = "none"
    return info


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure."""
    return round(os.getloadavg()[0], 2)
