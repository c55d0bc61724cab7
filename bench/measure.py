"""In-process measurements: the model alone, decoding alone, and the naive one-file loop."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, insert

from bench.machine import load_average
from workers.decode import read_instance
from workers.inference import predict
from workers.models.loader import LoadedModel
from workers.preprocess import preprocess

MIN_BATCHES = 10
"""Fewest timed forward passes of the model-only figure, so a small --n still gives a stable rate."""


@dataclass
class Measurement:
    """``images`` handled in ``seconds`` of wall time, with phase-specific details."""

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
    """The round with the median rate (the upper one of an even count), carrying every round's rate."""
    if not runs:
        raise ValueError("median() needs at least one measurement")
    ordered = sorted(runs, key=lambda m: m.rate)
    middle = ordered[len(ordered) // 2]
    return replace(middle, rounds=[m.rate for m in runs])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(
    model: LoadedModel, *, images: int, batch_size: int, warmup: int = 3, seed: int = 0
) -> Measurement:
    """Forward passes on random float32 batches already on the model's device; no I/O.

    Args:
        model: the loaded model.
        images: at least this many images are pushed through, in whole batches
            (and at least :data:`MIN_BATCHES` batches).
        batch_size: images per forward pass.
        warmup: untimed passes first (allocator, oneDNN/cuDNN kernel choice).
        seed: seeds the random inputs.
    """
    load = load_average()
    spec = model.card.input
    generator = torch.Generator().manual_seed(seed)
    count = max(math.ceil(images / batch_size), MIN_BATCHES)
    batches = [
        torch.randn(batch_size, spec.channels, spec.height, spec.width, generator=generator).to(model.device)
        for _ in range(count)
    ]
    with torch.inference_mode():
        for i in range(warmup):
            model.module(batches[i % count])
        _sync(model.device)
        start = time.perf_counter()
        for batch in batches:
            model.module(batch)
        _sync(model.device)
        elapsed = time.perf_counter() - start
    detail: dict[str, object] = {"batch_size": batch_size, "batches": count, "warmup_batches": warmup}
    return Measurement(count * batch_size, elapsed, detail, load)


def decode_preprocess(files: Sequence[Path], model: LoadedModel, *, max_pixels: int) -> Measurement:
    """Read, decode and preprocess every file in this thread, as the model card says; no model."""
    load = load_average()
    card = model.card
    frame = card.preprocessing.frame
    preprocess(read_instance(files[0], max_pixels=max_pixels, frame=frame), card.input, card.preprocessing)
    start = time.perf_counter()
    for path in files:
        image = read_instance(path, max_pixels=max_pixels, frame=frame)
        preprocess(image, card.input, card.preprocessing)
    elapsed = time.perf_counter() - start
    return Measurement(len(files), elapsed, {"threads": 1}, load)


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


def naive_loop(files: Sequence[Path], model: LoadedModel, *, db_path: Path, max_pixels: int) -> Measurement:
    """One file at a time: read, preprocess, forward pass of one, INSERT and COMMIT one row.

    The database is a fresh SQLite file with SQLite's defaults (rollback journal,
    synchronous=FULL), as a script written without radq would have it.
    """
    load = load_average()
    card = model.card
    frame = card.preprocessing.frame
    engine = create_engine(f"sqlite:///{db_path}")
    metadata = MetaData()
    table = _results_table(metadata)
    metadata.create_all(engine)
    predict(model, [np.zeros((card.input.channels, card.input.height, card.input.width), np.float32)])
    spent = {"decode_preprocess_s": 0.0, "model_s": 0.0, "db_s": 0.0}
    try:
        with engine.connect() as conn:
            start = time.perf_counter()
            for path in files:
                t0 = time.perf_counter()
                image = read_instance(path, max_pixels=max_pixels, frame=frame)
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
            elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    detail: dict[str, object] = {
        "batch_size": 1,
        "commits": len(files),
        "database": "sqlite (defaults: rollback journal, synchronous=FULL)",
        **{key: round(value, 3) for key, value in spent.items()},
    }
    return Measurement(len(files), elapsed, detail, load)
