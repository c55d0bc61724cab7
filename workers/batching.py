"""The inference stage: per-model queues of frames from every message, one forward pass per batch.

Frames wait in a queue per (model, explain threshold) until it holds a batch, until
the oldest has waited ``deadline`` seconds (a small urgent job is not held back for
company), or until the engine has nothing more on its way to them (:meth:`Batcher.drain`).
Batches mix instances, studies and messages. Multi-frame inputs (card frame policy
``all``) are spread over batches; an instance's output per label is the maximum over its
frames, with that frame's saliency map. A batch the device has no memory for is split in
halves (and the model's batch size lowered) rather than failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import radq
from db.status import InstanceStatus
from db.work import ResultRow
from radq.logs import log_context
from workers.chunk import Chunk
from workers.device_prep import RawFrame, to_batch
from workers.gradcam import explain
from workers.inference import activate, as_label_dicts, is_out_of_memory, precision_context
from workers.metrics import WorkerMetrics
from workers.models.loader import LoadedModel
from workers.saliency import MapStore
from workers.writer import Writer

log = logging.getLogger(__name__)

_Key = tuple[str, float | None]
"""A queue: model name and the job's explain threshold (None: no saliency maps)."""


@dataclass
class StageTimes:
    """Where an inference stream's time went: the bench and the logs name the bounding stage."""

    batches: int = 0
    frames: int = 0
    prep_s: float = 0.0
    """Device preprocessing (:func:`workers.device_prep.to_batch`)."""
    model_s: float = 0.0
    """Forward passes, including the copy of results back to the host."""

    def take(self) -> StageTimes:
        """These figures, and reset them (for a period's log line)."""
        taken = StageTimes(self.batches, self.frames, self.prep_s, self.model_s)
        self.batches, self.frames, self.prep_s, self.model_s = 0, 0, 0.0, 0.0
        return taken


@dataclass
class _Frame:
    chunk: Chunk
    instance_id: int
    frame: RawFrame
    queued_at: float


class Batcher:
    """Not thread-safe: one inference stream owns it."""

    def __init__(
        self,
        batch_size: int,
        deadline: float,
        writer: Writer,
        maps: MapStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: WorkerMetrics | None = None,
        pad: bool | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.pad = pad
        """Pad partial batches to the batch size: by default on CUDA only (:meth:`_pads`)."""
        self.metrics = metrics
        self.deadline = deadline
        self.writer = writer
        self.maps = maps
        self.clock = clock
        self.queues: dict[_Key, list[_Frame]] = {}
        self.models: dict[_Key, LoadedModel] = {}
        self.limit: dict[str, int] = {}
        """Batch size per model, lowered after running out of device memory."""
        self.waiting_on: dict[int, set[str]] = {}
        self.frames_left: dict[tuple[str, int], int] = {}
        self.best: dict[tuple[str, int], tuple[dict[str, float], dict[str, np.ndarray]]] = {}
        self.explained: set[int] = set()
        """Instances whose job asks for maps and whose outcome is still to come: their
        writes go through :attr:`maps`, in order behind the maps being stored."""
        self.times = StageTimes()

    @property
    def frames_queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def add(
        self,
        chunk: Chunk,
        instance_id: int,
        inputs: dict[str, list[RawFrame]],
        models: dict[str, LoadedModel],
        explain_threshold: float | None,
    ) -> None:
        """Queue every frame of an instance for each of its models; run the batches that fill."""
        now = self.clock()
        self.waiting_on[instance_id] = set(inputs)
        if explain_threshold is not None:
            self.explained.add(instance_id)
        for name, frames in inputs.items():
            key = (name, explain_threshold)
            self.models[key] = models[name]
            self.frames_left[(name, instance_id)] = len(frames)
            queue = self.queues.setdefault(key, [])
            queue.extend(_Frame(chunk, instance_id, frame, now) for frame in frames)
            while len(queue) >= self._limit(name):
                self._run(key)
                queue = self.queues[key]

    def due_in(self) -> float | None:
        """Seconds until the oldest partial batch is due; None when nothing waits."""
        oldest = [q[0].queued_at for q in self.queues.values() if q]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self.deadline - self.clock())

    def run_due(self) -> None:
        now = self.clock()
        for key, queue in list(self.queues.items()):
            if queue and queue[0].queued_at + self.deadline <= now:
                self._run(key)

    def drain(self) -> None:
        for key, queue in list(self.queues.items()):
            while queue:
                self._run(key)
                queue = self.queues[key]

    def _limit(self, name: str) -> int:
        return self.limit.get(name, self.batch_size)

    def _run(self, key: _Key) -> None:
        size = self._limit(key[0])
        batch, self.queues[key] = self.queues[key][:size], self.queues[key][size:]
        jobs = {frame.chunk.job_id for frame in batch}
        # Batches mix jobs; their log lines name the job only when there is one.
        with log_context(job_id=jobs.pop() if len(jobs) == 1 else None):
            self._infer(key, batch)

    def _predict(
        self, model: LoadedModel, threshold: float | None, batch: list[_Frame]
    ) -> tuple[list[dict[str, float]], list[dict[str, np.ndarray]]]:
        """Probabilities and, when the job asks for them, Grad-CAM maps per label."""
        card = model.card
        started = time.perf_counter()
        inputs = to_batch([f.frame for f in batch], card.input, card.preprocessing, model.device)
        rows, size = len(batch), self._limit(card.name)
        if rows < size and self._pads(model):
            inputs = torch.cat([inputs, inputs.new_zeros((size - rows, *inputs.shape[1:]))])
        if model.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        prepared = time.perf_counter()
        # On CUDA prep_s holds the launches only: the wait lands in the forward pass.
        if threshold is None:
            with torch.inference_mode(), precision_context(model):
                probs = activate(card, model.forward(inputs)[:rows].float())
            labelled = as_label_dicts(card, probs)  # copies to the host: the device is done
            self._timed(card.name, len(batch), prepared - started, time.perf_counter() - prepared)
            return labelled, [{} for _ in batch]
        explained = explain(model, inputs, threshold, rows)
        self._timed(card.name, len(batch), prepared - started, time.perf_counter() - prepared)
        return explained.probabilities, explained.saliency

    def _pads(self, model: LoadedModel) -> bool:
        """Whether partial batches are padded with zeros to the batch size.

        On CUDA, ``cudnn.benchmark`` times every convolution's algorithms again for each
        new input shape: measured on an H200, about 3 s for DenseNet-121 each time a
        partial batch of a new size came, 22 s of a 33 s job. One shape per model costs
        one tuning; padding costs the idle GPU a few milliseconds per partial batch.
        Grad-CAM batches are padded too; their padding is neither explained nor returned.
        """
        return model.device.type == "cuda" if self.pad is None else self.pad

    def _timed(self, model: str, frames: int, prep_s: float, model_s: float) -> None:
        """One batch's timings, for the periodic log line and the worker's metrics."""
        self.times.batches += 1
        self.times.frames += frames
        self.times.prep_s += prep_s
        self.times.model_s += model_s
        if self.metrics is not None:
            self.metrics.batch(model, frames, prep_s, model_s)

    def _infer(self, key: _Key, batch: list[_Frame]) -> None:
        name, threshold = key
        model = self.models[key]
        try:
            outputs, saliency = self._predict(model, threshold, batch)
        except Exception as exc:  # a bad batch costs its instances, never the stage
            if is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                self.limit[name] = min(self._limit(name), half)
                log.warning(
                    "model %s: out of memory on %s at batch %d; batch size now %d",
                    model.key, model.device, len(batch), self.limit[name],
                )  # fmt: skip
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                rest = batch
                while rest:  # pieces of the size that fits, as far as it is known so far
                    size = self._limit(name)
                    self._infer(key, rest[:size])
                    rest = rest[size:]
                return
            log.exception("inference failed for model %s", name)
            what = "out of memory even for one image" if is_out_of_memory(exc) else str(exc)
            self._fail(name, batch, f"inference failed (model {model.key} on {model.device}): {what}")
            return
        self._collect(model, batch, outputs, saliency)

    def _fail(self, name: str, batch: list[_Frame], reason: str) -> None:
        for frame in batch:
            i = frame.instance_id
            if self.frames_left.pop((name, i), None) is None:
                continue  # failed in an earlier batch already
            self.best.pop((name, i), None)
            self.waiting_on.pop(i, None)
            if self.metrics is not None:
                self.metrics.failed.labels(name).inc()
            self._outcome(frame.chunk, i, InstanceStatus.FAILED, reason)

    def _collect(
        self,
        model: LoadedModel,
        batch: list[_Frame],
        outputs: list[dict[str, float]],
        saliency: list[dict[str, np.ndarray]],
    ) -> None:
        card = model.card
        recipe = card.preprocessing_recipe  # JSON made from the card: once per batch, not per row
        for frame, probs, maps in zip(batch, outputs, saliency, strict=True):
            key = (card.name, frame.instance_id)
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
            if self.metrics is not None:
                self.metrics.processed.labels(card.name).inc()
            self._result(
                frame.chunk,
                ResultRow(
                    instance_id=frame.instance_id,
                    model=card.name,
                    model_version=card.version,
                    weights_sha256=card.sha256,
                    radq_version=radq.__version__,
                    preprocessing=recipe,
                    precision=model.precision,
                    outputs=best,
                ),
                best_maps,
            )
            waiting = self.waiting_on.get(frame.instance_id)
            if waiting is not None:
                waiting.discard(card.name)
                if not waiting:
                    del self.waiting_on[frame.instance_id]
                    self._outcome(frame.chunk, frame.instance_id, InstanceStatus.DONE)

    def _result(self, chunk: Chunk, row: ResultRow, maps: dict[str, np.ndarray]) -> None:
        i = row.instance_id
        if maps or i in self.explained:
            self.maps.result(chunk, row, maps, ended=i not in self.explained)
        else:
            self.writer.result(chunk, row)

    def _outcome(self, chunk: Chunk, instance_id: int, status: str, reason: str | None = None) -> None:
        if instance_id in self.explained:
            self.explained.discard(instance_id)
            self.maps.outcome(chunk, instance_id, status, reason)
        else:
            self.writer.outcome(chunk, instance_id, status, reason)
