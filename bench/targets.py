"""Issue 7's verdicts on one row of the matrix: ratios, the bounding stage, targets met or not.

Targets:

* always: pipeline >= 10x the naive loop;
* CPU: pipeline >= 0.90x model only, for DenseNet-121 on 512x512 CT;
* GPU: pipeline >= 0.85x min(model only, decode rate over all host cores);
  where the worker decodes the input on the GPU (nvImageCodec): >= 0.85x model only.

"Decode rate" is what one of the worker's decode processes gets through per second
(``workers.prepare.load``: read, hash, header, decode; on a CPU worker the preprocessing
too), on one core; the codec's share alone is also given.
The bounding stage is the slowest of: the model alone; decode capacity (that per-core
rate times the worker's decode processes); the upload (files per second until the API
answered: a job's instances are queued once its upload has arrived); for a path
submission, the registration (files per second until the API had registered the last);
on a GPU, the worker's own process (files per CPU second it used: its Python runs
under one GIL); and on a CPU, the cores that the model and the decode processes share
(:func:`shared_cores_rate`).
"""

from __future__ import annotations

from dataclasses import dataclass

NAIVE_FACTOR = 10.0
"""The pipeline must beat the naive loop by this factor."""
CPU_SHARE = 0.90
"""Share of the model-only rate the pipeline must keep on a CPU (DenseNet-121 on CT)."""
GPU_SHARE = 0.85
"""Share of min(model only, host decode rate) the pipeline must keep on a GPU."""
CPU_TARGET_ARCHITECTURE, CPU_TARGET_INPUT = "densenet121", "ct"
"""The workload the CPU target names."""


@dataclass(frozen=True)
class Rates:
    """Median images per second of one row's figures."""

    model_only: float
    decode: float
    """read_header + decode alone, one core."""
    decoder: float
    """A decode process's whole work per file, one core."""
    naive: float
    pipeline: float
    upload: float = 0.0
    """Files per second of the pipeline job's upload (HTTP, until the API answered); 0 if unknown."""
    registration: float = 0.0
    """Files per second until a path job's last file was registered; 0 if not a path job."""
    worker_process: float = 0.0
    """Files per CPU second of the worker's own process (Celery, the inference and writer
    threads; not its decode processes); 0 if unknown."""


SHARED_CORES = "cores (model + decode)"
"""The name of the CPU's bounding stage where the model and decoding share the cores."""


def shared_cores_rate(model_only: float, decoder_per_core: float, cores: int) -> float:
    """Images per second when the model and the decode processes share ``cores``.

    The model-only figure keeps every core busy, so an image costs the model
    ``cores / model_only`` core-seconds and a decode process ``1 / decoder_per_core``:
    on a CPU worker nothing runs faster than ``cores`` over their sum, however well the
    stages overlap.
    """
    if model_only <= 0 or decoder_per_core <= 0 or cores <= 0:
        return 0.0
    return 1.0 / (1.0 / model_only + 1.0 / (decoder_per_core * cores))


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _target(name: str, required: float, actual: float) -> dict[str, object]:
    return {"target": name, "required_img_s": round(required, 2), "met": actual >= required}


def summarize(
    rates: Rates, *, device: str, architecture: str, input_name: str, decode_processes: int, host_cores: int,
    gpu_decoded: bool = False,
) -> dict[str, object]:  # fmt: skip
    """Ratios, the stage that bounds the pipeline, and each target that applies, met or not.

    Args:
        rates: the row's medians.
        device: ``cpu`` or ``cuda``.
        architecture: the model card's architecture (``densenet121``, ``resnet18``...).
        input_name: the input kind (``ct``, ``cr``...).
        decode_processes: decode processes of one worker process.
        host_cores: cores of the machine.
        gpu_decoded: the worker decoded this input on the GPU (nvImageCodec); the decode
            figures were then taken with GPU decode too.
    """
    core = rates.decoder  # files one decode process gets through per second
    decode_capacity = core * decode_processes
    stages = {"model": rates.model_only, "decode": decode_capacity}
    if rates.upload > 0:  # the job is processed once its upload has arrived, so it is a stage too
        stages["upload"] = rates.upload
    if rates.registration > 0:  # workers get only what the API has registered and queued
        stages["registration"] = rates.registration
    if device == "cuda" and rates.worker_process > 0:
        # Its Python runs under one GIL: about one core's worth per worker process. (On the
        # CPU the same process runs the model's threads, which the model stage covers.)
        stages["worker process"] = rates.worker_process
    if device == "cpu" and not gpu_decoded:
        shared = shared_cores_rate(rates.model_only, core, host_cores)
        if shared > 0:
            stages[SHARED_CORES] = shared
    bound = min(stages, key=lambda stage: stages[stage])
    targets = [_target(f">= {NAIVE_FACTOR:g}x naive", NAIVE_FACTOR * rates.naive, rates.pipeline)]
    if device == "cpu" and (architecture, input_name) == (CPU_TARGET_ARCHITECTURE, CPU_TARGET_INPUT):
        targets.append(_target(f">= {CPU_SHARE:.2f}x model", CPU_SHARE * rates.model_only, rates.pipeline))
    if device == "cuda" and gpu_decoded:
        targets.append(
            _target(f">= {GPU_SHARE:.2f}x model (GPU decode)", GPU_SHARE * rates.model_only, rates.pipeline)
        )
    elif device == "cuda":
        ceiling = min(rates.model_only, core * host_cores)
        targets.append(
            _target(f">= {GPU_SHARE:.2f}x min(model, host decode)", GPU_SHARE * ceiling, rates.pipeline)
        )
    return {
        "pipeline_over_model_only": _ratio(rates.pipeline, rates.model_only),
        "pipeline_over_naive": _ratio(rates.pipeline, rates.naive),
        "decoder_per_core_img_s": round(core, 2),
        "decode_processes": decode_processes,
        "gpu_decoded": gpu_decoded,
        "decode_capacity_img_s": round(decode_capacity, 2),
        "bound": bound,
        "bound_img_s": round(stages[bound], 2),
        "pipeline_over_bound": _ratio(rates.pipeline, stages[bound]),
        "upload_img_s": round(rates.upload, 2),
        "registration_img_s": round(rates.registration, 2),
        "worker_process_img_per_cpu_s": round(rates.worker_process, 2),
        "bound_why": f"model only {rates.model_only:.1f} img/s; decode process {core:.1f} img/s/core "
        f"x {decode_processes} decode processes = {decode_capacity:.1f} img/s; "
        f"upload {rates.upload:.1f} img/s; registration {rates.registration:.1f} img/s; "
        f"worker process {rates.worker_process:.1f} img per CPU second"
        + (f"; {SHARED_CORES} {stages[SHARED_CORES]:.1f} img/s" if SHARED_CORES in stages else ""),
        "targets": targets,
    }
