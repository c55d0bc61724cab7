"""Processing one chunk: claim, decode and preprocess in threads, infer in batches, write.

Decoding runs ahead in the context's thread pool while the calling thread runs the
model, so the two overlap. Outcomes are written in one transaction per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

import radq
from db.jobs import get_job
from db.session import transaction
from db.status import InstanceStatus
from db.work import (
    Claimed,
    ResultRow,
    claim,
    close_finished_jobs,
    finish,
    record_metadata,
    write_results,
)
from radq.errors import InstanceError, ModelError
from workers.context import WorkerContext
from workers.decode import decode
from workers.header import InstanceMeta, read_header
from workers.inference import predict
from workers.models.loader import LoadedModel
from workers.preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One claimed instance after decoding: model inputs, or why there are none."""

    claimed: Claimed
    metadata: dict[str, Any] | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    status: str | None = None
    reason: str | None = None


@dataclass
class ChunkReport:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass
class _Pending:
    """Writes accumulated since the last flush."""

    metadata: list[dict[str, Any]] = field(default_factory=list)
    results: list[ResultRow] = field(default_factory=list)
    outcomes: list[tuple[int, str, str | None]] = field(default_factory=list)


def _metadata_columns(instance_id: int, meta: InstanceMeta, notes: Sequence[str]) -> dict[str, Any]:
    return {
        "id": instance_id,
        "sop_instance_uid": meta.sop_instance_uid,
        "study_instance_uid": meta.study_instance_uid,
        "series_instance_uid": meta.series_instance_uid,
        "modality": meta.modality,
        "body_part": meta.body_part,
        "series_description": meta.series_description,
        "notes": "; ".join(notes) or None,
    }


def _applies(model: LoadedModel, meta: InstanceMeta) -> bool:
    wanted = model.card.applies_to.modalities
    return not wanted or (meta.modality or "").upper() in {m.upper() for m in wanted}


def prepare(claimed: Claimed, *, ctx: WorkerContext, models: Sequence[LoadedModel]) -> Prepared:
    """Read, decode and preprocess one instance for every model that applies to it.

    Never raises for a bad file: the failure is returned with its reason.
    """
    out = Prepared(claimed)
    path = ctx.locate(claimed.storage, claimed.location)
    try:
        ds, meta, notes = read_header(path)
        out.metadata = _metadata_columns(claimed.id, meta, notes)
        applicable = [m for m in models if _applies(m, meta)]
        if not applicable:
            what = " ".join(filter(None, [meta.modality, meta.body_part])) or "this instance"
            names = ", ".join(m.card.name for m in models)
            out.status, out.reason = InstanceStatus.SKIPPED, f"no model for {what} (job models: {names})"
            return out
        image = decode(
            ds,
            meta,
            notes,
            max_pixels=ctx.settings.max_image_pixels,
            frame=applicable[0].card.preprocessing.frame,
        )
        if out.metadata is not None:
            out.metadata["notes"] = "; ".join(image.notes) or None
        by_recipe: dict[str, np.ndarray] = {}
        for model in applicable:
            recipe = model.card.preprocessing_recipe
            if recipe not in by_recipe:
                by_recipe[recipe] = preprocess(image, model.card.input, model.card.preprocessing)
            out.inputs[model.card.name] = by_recipe[recipe]
    except InstanceError as exc:
        out.status, out.reason = exc.status, exc.reason
    except FileNotFoundError:
        out.status, out.reason = InstanceStatus.FAILED, f"file not found: {path}"
    except OSError as exc:
        out.status, out.reason = InstanceStatus.FAILED, f"file not readable: {path}: {exc.strerror}"
    except Exception as exc:  # a decoder bug must cost one file, not the chunk
        log.exception("unexpected error preparing instance %s", claimed.id)
        out.status = InstanceStatus.FAILED
        out.reason = f"unexpected error while reading the file: {type(exc).__name__}: {exc}"
    return out


class _Batcher:
    """Per-model queues of inputs; a full queue runs one forward pass."""

    def __init__(self, models: Sequence[LoadedModel], batch_size: int, pending: _Pending) -> None:
        self.models = {m.card.name: m for m in models}
        self.batch_size = batch_size
        self.queues: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in self.models}
        self.waiting_on: dict[int, set[str]] = {}
        self.pending = pending

    def add(self, prepared: Prepared) -> bool:
        """Queue an instance's inputs; True when some model's batch ran."""
        self.waiting_on[prepared.claimed.id] = set(prepared.inputs)
        ran = False
        for name, array in prepared.inputs.items():
            self.queues[name].append((prepared.claimed.id, array))
            if len(self.queues[name]) >= self.batch_size:
                self._run(name)
                ran = True
        return ran

    def drain(self) -> None:
        for name in self.models:
            if self.queues[name]:
                self._run(name)

    def _run(self, name: str) -> None:
        model = self.models[name]
        batch, self.queues[name] = self.queues[name], []
        ids = [i for i, _ in batch]
        try:
            outputs = predict(model, [a for _, a in batch])
        except RuntimeError as exc:  # e.g. a shape the model cannot take
            log.exception("inference failed for model %s", name)
            for i in ids:
                self.waiting_on.pop(i, None)
                reason = f"inference failed (model {model.key}): {exc}"
                self.pending.outcomes.append((i, InstanceStatus.FAILED, reason))
            return
        card = model.card
        for instance_id, probs in zip(ids, outputs, strict=True):
            self.pending.results.append(
                ResultRow(
                    instance_id=instance_id,
                    model=card.name,
                    model_version=card.version,
                    weights_sha256=card.sha256,
                    radq_version=radq.__version__,
                    preprocessing=card.preprocessing_recipe,
                    outputs=probs,
                )
            )
            waiting = self.waiting_on.get(instance_id)
            if waiting is not None:
                waiting.discard(name)
                if not waiting:
                    del self.waiting_on[instance_id]
                    self.pending.outcomes.append((instance_id, InstanceStatus.DONE, None))


def _flush(ctx: WorkerContext, job_id: str, pending: _Pending, report: ChunkReport) -> None:
    if not (pending.metadata or pending.results or pending.outcomes):
        return
    with transaction(ctx.sessions) as session:
        record_metadata(session, pending.metadata)
        write_results(session, pending.results)
        finish(session, pending.outcomes)
        close_finished_jobs(session, [job_id])
    for _, status, _ in pending.outcomes:
        setattr(report, status, getattr(report, status) + 1)
    pending.metadata.clear()
    pending.results.clear()
    pending.outcomes.clear()


def run_chunk(ctx: WorkerContext, job_id: str, instance_ids: Sequence[int]) -> ChunkReport:
    """Process the instances of one message; safe to call again with the same ids."""
    report = ChunkReport()
    with transaction(ctx.sessions) as session:
        claimed = claim(session, job_id, instance_ids, lease_seconds=ctx.settings.lease_seconds)
        job = get_job(session, job_id)
        model_names = list(job.models) if job else []
    report.claimed = len(claimed)
    if not claimed:
        return report

    pending = _Pending()
    try:
        models = [ctx.models.get(name) for name in model_names]
    except ModelError as exc:
        pending.outcomes.extend((c.id, InstanceStatus.FAILED, f"model unavailable: {exc}") for c in claimed)
        _flush(ctx, job_id, pending, report)
        return report

    batcher = _Batcher(models, ctx.settings.batch_size, pending)
    for prepared in ctx.executor.map(partial(prepare, ctx=ctx, models=models), claimed):
        if prepared.metadata:
            pending.metadata.append(prepared.metadata)
        if prepared.status:
            pending.outcomes.append((prepared.claimed.id, prepared.status, prepared.reason))
        elif batcher.add(prepared):
            _flush(ctx, job_id, pending, report)
    batcher.drain()
    _flush(ctx, job_id, pending, report)
    log.info(
        "job %s chunk done: claimed=%d done=%d failed=%d skipped=%d",
        job_id, report.claimed, report.done, report.failed, report.skipped,
    )
    return report
