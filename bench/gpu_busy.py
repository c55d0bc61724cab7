"""How busy a GPU was over a figure's span, read from the driver (``nvidia-smi``).

The driver's ``utilization.gpu`` is the share of its last sample period (1/6 s to 1 s,
by product) during which at least one kernel ran on the GPU: 100 % says the GPU never
waited for the host, not that its cores were full. ``nvidia-smi -lms`` prints it every
:data:`PERIOD_MS` while the figure runs; the figure reports the mean of the samples.
The GPU is named by UUID, as torch and ``nvidia-smi`` may number GPUs differently.
"""

from __future__ import annotations

import shutil
import subprocess
from types import TracebackType

import torch

PERIOD_MS = 200
"""How often ``nvidia-smi`` prints a sample."""


def gpu_uuid(device: torch.device) -> str | None:
    """The UUID ``nvidia-smi --id`` knows ``device`` by; None for a CPU or an unknown GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    uuid = getattr(torch.cuda.get_device_properties(device.index or 0), "uuid", None)
    return None if uuid is None else f"GPU-{uuid}"


def parse_samples(text: str) -> list[float]:
    """The percentages in ``nvidia-smi --format=csv,noheader,nounits`` output; lines that
    are not one (``[N/A]``, a message) are left out."""
    samples = []
    for line in text.splitlines():
        try:
            samples.append(float(line.strip()))
        except ValueError:
            continue
    return samples


class GpuBusy:
    """Samples one GPU's utilisation while the ``with`` block runs.

    ``percent`` is None where there is no GPU to sample (no UUID, no ``nvidia-smi``) or
    no sample came, and ``why`` says which.
    """

    def __init__(self, uuid: str | None, *, command: str = "nvidia-smi", period_ms: int = PERIOD_MS) -> None:
        self._uuid, self._command, self._period_ms = uuid, command, period_ms
        self._process: subprocess.Popen[str] | None = None
        self.samples: list[float] = []
        self.why: str | None = None

    def __enter__(self) -> GpuBusy:
        executable = shutil.which(self._command)
        if self._uuid is None:
            self.why = "no GPU"
        elif executable is None:
            self.why = f"{self._command} not found"
        else:
            self._process = subprocess.Popen(
                [
                    executable,
                    f"--id={self._uuid}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={self._period_ms}",
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            output, _ = self._process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            output, _ = self._process.communicate()
        self.samples = parse_samples(output)
        if not self.samples:
            self.why = f"{self._command} printed no sample: {output.strip()[:200]!r}"

    @property
    def percent(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None

    def as_detail(self) -> dict[str, object]:
        """The figure's details: the mean, the sample count, or why there is none."""
        if self.percent is None:
            return {"gpu_busy_pct": None, "gpu_busy_why": self.why}
        return {"gpu_busy_pct": self.percent, "gpu_busy_samples": len(self.samples)}
