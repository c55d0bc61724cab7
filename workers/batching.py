"""Batches across instances and studies: per-model queues of frames, one forward pass each.

Multi-frame inputs (card frame policy ``all``) are spread over batches; an instance's
output per label is the maximum over its frames, with that frame's saliency map.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import radq
from db.status import InstanceStatus
from db.work import ResultRow
from radq.blobs import BlobStore
from workers.gradcam import explain, to_png
from workers.inference import predict
from workers.models.loader import LoadedModel
from workers.prepare import Prepared

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """Writes accumulated since the last flush."""

    metadata: list[dict[str, Any]] = field(default_factory=list)
    results: list[ResultRow] = field(default_factory=list)
    outcomes: list[tuple[int, str, str | None]] = field(default_factory=list)


class Batcher:
    """Per-model queues of inputs; a full queue runs one forward pass."""

    def __init__(
        self,
        models: Sequence[LoadedModel],
        batch_size: int,
        pending: Pending,
        *,
        explain_threshold: float | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.models = {m.card.name: m for m in models}
        self.explain_threshold = explain_threshold
        self.blobs = blobs
        self.batch_size = batch_size
        # One queue entry per frame; an instance's frames may span batches.
        self.queues: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in self.models}
        self.waiting_on: dict[int, set[str]] = {}
        self.frames_left: dict[tuple[str, int], int] = {}
        self.best: dict[tuple[str, int], tuple[dict[str, float], dict[str, str]]] = {}
        self.pending = pending

    def add(self, prepared: Prepared) -> bool:
        """Queue every frame of an instance's inputs; True when some model's batch ran."""
        instance_id = prepared.claimed.id
        self.waiting_on[instance_id] = set(prepared.inputs)
        ran = False
        for name, frames in prepared.inputs.items():  # (F, C, H, W)
            self.frames_left[(name, instance_id)] = len(frames)
            for frame in frames:
                self.queues[name].append((instance_id, frame))
                if len(self.queues[name]) >= self.batch_size:
                    self._run(name)
                    ran = True
        return ran

    def drain(self) -> None:
        for name in self.models:
            if self.queues[name]:
                self._run(name)

    def _predict(
        self, model: LoadedModel, inputs: list[np.ndarray]
    ) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
        """Probabilities and, when the job asks for them, Grad-CAM PNGs stored as blobs."""
        if self.explain_threshold is None or self.blobs is None:
            return predict(model, inputs), [{} for _ in inputs]
        explained = explain(model, inputs, self.explain_threshold)
        stored = [
            {label: self.blobs.put(io.BytesIO(to_png(m)))[0] for label, m in maps.items()}
            for maps in explained.saliency
        ]
        return explained.probabilities, stored

    def _run(self, name: str) -> None:
        model = self.models[name]
        batch, self.queues[name] = self.queues[name], []
        ids = [i for i, _ in batch]
        try:
            outputs, saliency = self._predict(model, [a for _, a in batch])
        except RuntimeError as exc:  # e.g. a shape the model cannot take
            log.exception("inference failed for model %s", name)
            for i in dict.fromkeys(ids):
                if self.frames_left.pop((name, i), None) is None:
                    continue  # failed in an earlier batch already
                self.best.pop((name, i), None)
                self.waiting_on.pop(i, None)
                reason = f"inference failed (model {model.key}): {exc}"
                self.pending.outcomes.append((i, InstanceStatus.FAILED, reason))
            return
        card = model.card
        for instance_id, probs, maps in zip(ids, outputs, saliency, strict=True):
            key = (name, instance_id)
            if key not in self.frames_left:
                continue  # its other frames failed in an earlier batch
            # Per label, the maximum over frames, with the saliency map of that frame.
            best, best_maps = self.best.setdefault(key, ({}, {}))
            for label, p in probs.items():
                if label not in best or p > best[label]:
                    best[label] = p
                    if label in maps:
                        best_maps[label] = maps[label]
                    else:
                        best_maps.pop(label, None)
            self.frames_left[key] -= 1
            if self.frames_left[key]:
                continue
            del self.frames_left[key], self.best[key]
            self.pending.results.append(
                ResultRow(
                    instance_id=instance_id,
                    model=card.name,
                    model_version=card.version,
                    weights_sha256=card.sha256,
                    radq_version=radq.__version__,
                    preprocessing=card.preprocessing_recipe,
                    outputs=best,
                    saliency=best_maps or None,
                )
            )
            waiting = self.waiting_on.get(instance_id)
            if waiting is not None:
                waiting.discard(name)
                if not waiting:
                    del self.waiting_on[instance_id]
                    self.pending.outcomes.append((instance_id, InstanceStatus.DONE, None))
