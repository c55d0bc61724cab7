"""In-process figures: the model alone, decoding alone, a decode process's work per file, the naive loop.

Each runs for about a given number of seconds (after an untimed warm-up) rather than a
given number of images, so that one budget fits a 2 img/s DenseNet on a laptop CPU and
a 2,000 img/s one on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, insert

from bench.machine import load_average
from bench.models import as_model_input, forward_context
from db.status import StorageKind
from db.work import Claimed
from radq.settings import Settings
from workers.decode import DecodedImage, decode
from workers.engine import decoder_finish_pixels, usable_cores
from workers.header import read_header
from workers.inference import predict
from workers.models.loader import LoadedModel
from workers.prepare import load
from workers.preprocess import preprocess

T = TypeVar("T")

MIN_BATCHES = 2
"""Fewest timed forward passes of the model-only figure."""
MAX_WARMUP_BATCHES = 3
"""Most untimed passes before the model-only figure (fewer when one pass is slow)."""
SYNC_EVERY = 8
"""Passes queued on a GPU between synchronisations of the model-only figure."""
MIN_FILES = 2
"""Fewest files a decode, decode-process or naive-loop figure times."""


ROUND_DETAILS = ("worker_process_cpu_ms_per_image",)
"""Details whose value in every round :func:`median` keeps (as ``<key>_rounds``)."""


@dataclass
class Measurement:
    """``images`` handled in ``seconds`` of wall time, with figure-specific details."""

    images: int
    seconds: float
    detail: dict[str, object] = field(default_factory=dict)
    load_before: float = field(default_factory=load_average)
    rounds: list[float] = field(default_factory=list)
    """Images per second of every round, when this is the median of several."""

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        rounds = self.rounds or [self.rate]
        return {
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.rate, 2),
            "images_per_s_rounds": [round(r, 2) for r in rounds],
            "load_avg_1m_before": self.load_before,
            **self.detail,
        }


def median(runs: Sequence[Measurement]) -> Measurement:
    """The round with the median rate (the upper one of an even count), carrying every round's
    rate and :data:`ROUND_DETAILS`."""
    if not runs:
        raise ValueError("median() needs at least one measurement")
    ordered = sorted(runs, key=lambda m: m.rate)
    middle = ordered[len(ordered) // 2]
    detail = dict(middle.detail)
    for key in ROUND_DETAILS:
        if all(key in m.detail for m in runs):
            detail[f"{key}_rounds"] = [m.detail[key] for m in runs]
    return replace(middle, rounds=[m.rate for m in runs], detail=detail)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch on ``count`` threads for a while (then as before)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """torch on one thread (preprocessing resizes with torch): a per-core figure."""
    return torch_threads(1)


def model_only(
    model: LoadedModel, *, batch_size: int, seconds: float, seed: int = 0, streams: int = 1
) -> Measurement:
    """Forward passes on random float32 batches already on the model's device; no I/O.

    Args:
        model: the loaded model (as the worker loads it: memory format, precision).
        batch_size: images per forward pass.
        seconds: time the passes for about this long, and at least :data:`MIN_BATCHES`.
        seed: seeds the random inputs.
        streams: threads running passes at once, as the worker's inference streams do
            (RADQ_INFER_STREAMS), each with the torch threads set for this process.
    """
    load = load_average()
    ready = threading.Barrier(streams)
    counts = [0] * streams
    spans = [0.0] * streams
    warmups = [0] * streams

    def run(index: int) -> None:
        spec = model.card.input
        generator = torch.Generator().manual_seed(seed + index)
        ring = [  # a few distinct batches, used in turn
            as_model_input(
                model,
                torch.randn(batch_size, spec.channels, spec.height, spec.width, generator=generator).to(
                    model.device
                ),
            )
            for _ in range(3)
        ]
        batches = itertools.cycle(ring)
        with forward_context(model):
            warm_until = time.perf_counter() + seconds / 4
            warmup = 0  # the first pass picks kernels and allocates; stop early when passes are slow
            while warmup < MAX_WARMUP_BATCHES and (warmup == 0 or time.perf_counter() < warm_until):
                model.forward(next(batches))
                _sync(model.device)
                warmup += 1
            group = 1 if model.device.type == "cpu" else SYNC_EVERY  # let the GPU queue a few passes
            count = 0
            ready.wait()  # every stream warm: they are timed over the same span
            start = time.perf_counter()
            while count < MIN_BATCHES or time.perf_counter() - start < seconds:
                for _ in range(group):
                    model.forward(next(batches))
                count += group
                _sync(model.device)  # the clock must not stop while the device still has work queued
            counts[index], spans[index], warmups[index] = count, time.perf_counter() - start, warmup

    with ThreadPoolExecutor(streams, thread_name_prefix="bench-stream") as pool:
        list(pool.map(run, range(streams)))  # re-raises a stream's error
    detail: dict[str, object] = {
        "batch_size": batch_size,
        "batches": sum(counts),
        "warmup_batches": sum(warmups),
        "streams": streams,
        "torch_threads": torch.get_num_threads(),
    }
    return Measurement(sum(counts) * batch_size, max(spans), detail, load)


def _timed_loop(items: Sequence[T], seconds: float) -> Iterator[T]:
    """Items in turn (cycling), until ``seconds`` have passed and at least :data:`MIN_FILES` were given."""
    start = time.perf_counter()
    for count, item in enumerate(itertools.cycle(items)):
        if count >= MIN_FILES and time.perf_counter() - start >= seconds:
            return
        yield item


def decode_only(files: Sequence[Path], model: LoadedModel, *, max_pixels: int, seconds: float) -> Measurement:
    """``read_header`` + ``decode`` of the frame the card asks for, one thread, no model, cycling files."""
    frame = model.card.preprocessing.frame

    def read(path: Path) -> DecodedImage:
        ds, meta, notes = read_header(path)
        return decode(ds, meta, notes, max_pixels=max_pixels, frame=frame)

    load = load_average()
    with one_thread():
        read(files[0])  # untimed: imports the codec
        count = 0
        start = time.perf_counter()
        for path in _timed_loop(files, seconds):
            read(path)
            count += 1
        elapsed = time.perf_counter() - start
    return Measurement(count, elapsed, {"threads": 1, "files": len(files)}, load)


def decoder_only(
    files: Sequence[Path], model: LoadedModel, settings: Settings, *, seconds: float
) -> Measurement:
    """What one of the worker's decode processes does per file, on one thread, cycling files.

    ``workers.prepare.load`` as the worker calls it (read, hash, header, pseudonym,
    decode, raw frames; also the preprocessing where the worker's decode processes do it:
    RADQ_PREPROCESS_IN_DECODERS on a CPU, RADQ_HOST_PREPROCESS_PIXELS on CUDA),
    and pickling its result for the pipe: the per-core rate the worker's decode capacity
    follows from. ``decode_only`` times the codec's share of it.
    """
    finish_pixels = decoder_finish_pixels(settings, model.device.type)
    key = bytes(32)  # the HMAC costs the same whatever the key

    def run(index: int, path: Path) -> None:
        claimed = Claimed(index, "bench", path.name, StorageKind.PATH, str(path), 0)
        prepared = load(
            claimed, path, key, [model.card], settings.max_image_pixels, finish_pixels=finish_pixels
        )
        if prepared.status:
            raise RuntimeError(f"{path}: {prepared.status}: {prepared.reason}")
        pickle.dumps(prepared, protocol=5, buffer_callback=lambda _buffer: None)

    load_before = load_average()
    with one_thread():
        run(0, files[0])  # untimed: imports the codec
        count = 0
        start = time.perf_counter()
        for count, path in enumerate(_timed_loop(files, seconds), 1):
            run(count, path)
        elapsed = time.perf_counter() - start
    detail: dict[str, object] = {"threads": 1, "preprocesses_from_pixels": finish_pixels}
    return Measurement(count, elapsed, detail, load_before)


def _results_table(metadata: MetaData) -> Table:
    return Table(
        "results",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("file_name", Text, nullable=False),
        Column("sop_instance_uid", String(64)),
        Column("model", String(128), nullable=False),
        Column("outputs", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


def naive_loop(
    files: Sequence[Path], model: LoadedModel, *, db_path: Path, max_pixels: int, seconds: float
) -> Measurement:
    """One file at a time: read, preprocess, forward pass of one, INSERT and COMMIT one row.

    Runs through ``files`` in turn for about ``seconds``. The database is a fresh SQLite
    file with SQLite's defaults (rollback journal, synchronous=FULL), as a script written
    without radq would have it. torch uses every core, its default, as in such a script.
    """
    with torch_threads(usable_cores()):
        return _naive_loop(files, model, db_path=db_path, max_pixels=max_pixels, seconds=seconds)


def _naive_loop(
    files: Sequence[Path], model: LoadedModel, *, db_path: Path, max_pixels: int, seconds: float
) -> Measurement:
    load = load_average()
    card = model.card
    frame = card.preprocessing.frame
    engine = create_engine(f"sqlite:///{db_path}")
    metadata = MetaData()
    table = _results_table(metadata)
    metadata.create_all(engine)
    predict(model, [np.zeros((card.input.channels, card.input.height, card.input.width), np.float32)])
    spent = {"decode_preprocess_s": 0.0, "model_s": 0.0, "db_s": 0.0}
    count = 0
    try:
        with engine.connect() as conn:
            start = time.perf_counter()
            for path in _timed_loop(files, seconds):
                t0 = time.perf_counter()
                ds, meta, notes = read_header(path)
                image = decode(ds, meta, notes, max_pixels=max_pixels, frame=frame)
                frames = preprocess(image, card.input, card.preprocessing)  # (F, C, H, W), F=1 here
                t1 = time.perf_counter()
                outputs = predict(model, [frames[0]])[0]
                t2 = time.perf_counter()
                row = {
                    "file_name": path.name,
                    "sop_instance_uid": image.meta.sop_instance_uid,
                    "model": card.name,
                    "outputs": outputs,
                    "created_at": datetime.now(UTC),
                }
                conn.execute(insert(table).values(**row))
                conn.commit()
                t3 = time.perf_counter()
                spent["decode_preprocess_s"] += t1 - t0
                spent["model_s"] += t2 - t1
                spent["db_s"] += t3 - t2
                count += 1
            elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    detail: dict[str, object] = {
        "batch_size": 1,
        "commits": count,
        "database": "sqlite (defaults: rollback journal, synchronous=FULL)",
        **{key: round(value, 3) for key, value in spent.items()},
    }
    return Measurement(count, elapsed, detail, load)
