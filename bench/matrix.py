"""Measuring the matrix: every figure of every (model, input) row, on one stack, in one run.

Models are taken one at a time. For each, a fresh ``radq worker`` starts (so its peak
memory is that model's) and runs an untimed warm-up job; then ``--repeat`` rounds each
measure the model alone once and, for every input of the model, decoding, a decode process,
the naive loop and the pipeline, in that order. The pipeline's file count is fixed in the
first round from the rates measured just before it, so that its job takes about the
time budget; the later rounds reuse it.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.gpu_busy import GpuBusy, gpu_uuid
from bench.inputs import Corpus
from bench.measure import Measurement, decode_only, decoder_only, median, model_only, naive_loop
from bench.models import Pair, load_as_worker
from bench.pipeline import JobRun, pipeline, warm_up
from bench.stack import Stack, decode_processes, start_worker
from radq.errors import RadqError
from radq.services import stop
from radq.settings import Settings
from workers.engine import infer_streams
from workers.gpu_decode import gpu_decode_device
from workers.gpu_decode import install as install_gpu_decode
from workers.gpu_decode import uninstall as uninstall_gpu_decode
from workers.models.loader import LoadedModel

FIGURES = ("model_only", "decode", "decoder", "naive_loop", "pipeline")
"""Figures of one row, in the order they are measured."""
WARMUP_FILES = 2
"""Files of each input in a model's untimed warm-up job."""
MAX_CORPUS_BYTES = 4 * 1024**3
"""Largest corpus one pipeline figure uploads (the API stores another copy); RADQ_MAX_UPLOAD_BYTES
caps it further."""
UPLOAD_MARGIN = 0.95
"""Share of RADQ_MAX_UPLOAD_BYTES a job's files may fill (multipart or tar framing takes the rest)."""
DECODE_SHARE, DECODER_SHARE = 0.25, 0.5
"""Shares of the time budget the decode and decode-process figures take."""


@dataclass
class Plan:
    """What to measure and how long each figure should take."""

    rows: list[Pair]
    seconds: float
    repeat: int
    max_images: int
    seed: int
    timeout: float
    submit: str = "paths"
    """How the pipeline figure submits: ``paths`` (read in place) or ``upload`` (over HTTP)."""


@dataclass
class Outcome:
    """Every round of every figure, by row."""

    rounds: dict[Pair, dict[str, list[Measurement]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    warmups: dict[str, JobRun] = field(default_factory=dict)
    pipeline_files: dict[Pair, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Why a model's figures stopped short, by model name."""

    def medians(self, pair: Pair) -> dict[str, Measurement]:
        return {name: median(runs) for name, runs in self.rounds[pair].items() if runs}


def pipeline_files(
    plan: Plan,
    corpus: Corpus,
    *,
    model_rate: float,
    decoder: float,
    processes: int,
    batch: int,
    max_upload_bytes: int,
) -> int:
    """Files for a pipeline job of about ``plan.seconds``: the expected rate is the slower of
    the model and the decode processes; at least two batches, at most ``--max-images``,
    :data:`MAX_CORPUS_BYTES` and what one upload may carry."""
    expected = min(model_rate, decoder * processes)
    most_bytes = MAX_CORPUS_BYTES
    if plan.submit == "upload":
        most_bytes = min(most_bytes, int(max_upload_bytes * UPLOAD_MARGIN))
    ceiling = max(2 * batch, min(plan.max_images, most_bytes // max(corpus.file_bytes(), 1)))
    return min(max(math.ceil(plan.seconds * expected), 2 * batch), ceiling)


@contextlib.contextmanager
def decoding_as_worker(settings: Settings, model: LoadedModel) -> Iterator[None]:
    """Decode here as the worker's decode processes do: on the GPU where RADQ_GPU_DECODE puts
    them there (the naive loop, outside, stays on the CPU codecs)."""
    device = gpu_decode_device(settings.gpu_decode, model.device.type, model.device.index)
    if device is None:
        yield
        return
    install_gpu_decode(device)
    try:
        yield
    finally:
        uninstall_gpu_decode()


def _start_worker(stack: Stack) -> None:
    stack.worker = start_worker(stack.settings, stack.logs / "worker.log")


def _stop_worker(stack: Stack) -> None:
    if stack.worker is not None:
        stop(stack.worker)
        stack.worker = None


def _measure_model(
    plan: Plan,
    stack: Stack,
    model: LoadedModel,
    pairs: list[Pair],
    corpora: dict[str, Corpus],
    outcome: Outcome,
    work: Path,
    say: Callable[[str], None],
) -> None:
    settings = stack.settings
    name = model.card.name
    processes = decode_processes(settings)
    batch = settings.batch_size
    gpu = gpu_uuid(model.device)
    for index in range(plan.repeat):
        say(f"{name}, round {index + 1}/{plan.repeat}: model only ...")
        with GpuBusy(gpu) as busy:
            alone = model_only(
                model, batch_size=batch, seconds=plan.seconds, seed=plan.seed + index,
                streams=infer_streams(settings, model.device.type),
            )  # fmt: skip
        alone.detail.update(busy.as_detail())
        for pair in pairs:
            corpus = corpora[pair.input]
            figures = outcome.rounds[pair]
            figures["model_only"].append(alone)
            say(f"{name} on {pair.input}: decode, decode process ...")
            distinct = corpus.files(corpus.kind.distinct)
            max_pixels = settings.max_image_pixels
            with decoding_as_worker(settings, model):
                decoded = decode_only(
                    distinct, model, max_pixels=max_pixels, seconds=plan.seconds * DECODE_SHARE
                )
                decoder = decoder_only(distinct, model, settings, seconds=plan.seconds * DECODER_SHARE)
            figures["decode"].append(decoded)
            figures["decoder"].append(decoder)
            if pair not in outcome.pipeline_files:
                outcome.pipeline_files[pair] = pipeline_files(
                    plan, corpus, model_rate=alone.rate, decoder=decoder.rate,
                    processes=processes, batch=batch, max_upload_bytes=settings.max_upload_bytes,
                )  # fmt: skip
            files = corpus.files(outcome.pipeline_files[pair])
            say(f"{name} on {pair.input}: naive loop ...")
            db = work / f"naive-{name}-{pair.input}-{index}.db"
            naive = naive_loop(files, model, db_path=db, max_pixels=max_pixels, seconds=plan.seconds)
            figures["naive_loop"].append(naive)
            db.unlink(missing_ok=True)
            say(f"{name} on {pair.input}: pipeline, {len(files)} files ...")
            with GpuBusy(gpu) as busy:
                job = pipeline(stack, files, model=name, timeout=plan.timeout, submit=plan.submit)
            job.detail.update(busy.as_detail())
            figures["pipeline"].append(job)


def _run_model(
    plan: Plan, stack: Stack, name: str, model_dir: Path, corpora: dict[str, Corpus], device: torch.device,
    outcome: Outcome, work: Path, say: Callable[[str], None],
) -> None:  # fmt: skip
    pairs = [pair for pair in plan.rows if pair.model == name]
    model = load_as_worker(model_dir, stack.settings, device)
    _start_worker(stack)
    try:
        warm = [path for pair in pairs for path in corpora[pair.input].files(WARMUP_FILES)]
        outcome.warmups[name] = warm_up(stack, warm, model=name, timeout=plan.timeout, submit=plan.submit)
        _measure_model(plan, stack, model, pairs, corpora, outcome, work, say)
    finally:
        _stop_worker(stack)


def run_matrix(
    plan: Plan,
    stack: Stack,
    *,
    model_dirs: dict[str, Path],
    corpora: dict[str, Corpus],
    device: torch.device,
    work: Path,
    say: Callable[[str], None],
) -> Outcome:
    """Measure every row of ``plan`` on ``stack`` (started without a worker).

    A model whose figures fail (a service died, a job timed out, the model does not
    load) is recorded in :attr:`Outcome.errors` with what it measured so far; the run
    goes on with the next model.
    """
    outcome = Outcome()
    for name in dict.fromkeys(pair.model for pair in plan.rows):
        say(f"{name}: loading, starting a worker, untimed warm-up job ...")
        try:
            _run_model(plan, stack, name, model_dirs[name], corpora, device, outcome, work, say)
        except RadqError as exc:
            outcome.errors[name] = str(exc)
            say(f"[red]{name} stopped short:[/red] {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return outcome
