"""workers.batching: batches across messages, the partial-batch deadline, out-of-memory splits."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from db.work import ResultRow
from radq.blobs.file import FileBlobStore
from radq.model_card import discover_cards
from radq.settings import BUNDLED_MODEL_DIR
from tests.conftest import SAMPLES
from workers.batching import Batcher
from workers.chunk import Chunk
from workers.decode import read_instance
from workers.device_prep import RawFrame, raw_frames
from workers.inference import predict
from workers.models import loader
from workers.models.loader import LoadedModel, Runtime, load_model, prepare_for_runtime
from workers.saliency import MapStore
from workers.writer import Writer


class Recorder(Writer):
    """What the batcher hands to the writing stage, kept in order instead of written."""

    def __init__(self) -> None:  # no database thread: the batcher is under test
        self.calls: list[tuple[str, int, Any]] = []
        self.saliency: dict[int, set[str]] = {}
        """Labels with a saliency map, per instance."""
        self.precision: dict[int, str | None] = {}

    def result(self, chunk: Chunk, row: Any) -> None:
        self.calls.append(("result", row.instance_id, row.outputs))
        self.saliency[row.instance_id] = set(row.saliency or {})
        self.precision[row.instance_id] = row.precision

    def outcome(self, chunk: Chunk, instance_id: int, status: str, reason: str | None = None) -> None:
        self.calls.append(("outcome", instance_id, (status, reason)))

    def outcomes(self) -> dict[int, tuple[str, str | None]]:
        return {i: v for kind, i, v in self.calls if kind == "outcome"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class OutOfMemoryAbove(nn.Module):
    """A model that, like a GPU with too little memory, refuses batches over ``limit``."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []  # type: ignore[var-annotated]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(x)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def smoke() -> LoadedModel:
    return load_model(discover_cards(BUNDLED_MODEL_DIR)["radq-smoke"][0], torch.device("cpu"))


def _frames(model: LoadedModel, name: str) -> list[RawFrame]:
    card = model.card
    image = read_instance(SAMPLES / "real" / name, max_pixels=1 << 28, frame=card.preprocessing.frame)
    return raw_frames(image, card.input, card.preprocessing)


def _batcher(
    tmp_path: Path, clock: Clock, batch_size: int = 4, deadline: float = 0.5
) -> tuple[Batcher, Recorder]:
    writer = Recorder()
    maps = MapStore(FileBlobStore(tmp_path), writer)
    return Batcher(batch_size, deadline, writer, maps, clock=clock), writer


def test_a_partial_batch_waits_for_company_until_its_deadline(tmp_path: Path, smoke: LoadedModel) -> None:
    clock = Clock()
    batcher, writer = _batcher(tmp_path, clock)
    chunk = Chunk("job", {1, 2})
    for i, name in ((1, "CT_small.dcm"), (2, "MR_small.dcm")):
        batcher.add(chunk, i, {"radq-smoke": _frames(smoke, name)}, {"radq-smoke": smoke}, None)
    assert writer.calls == [] and batcher.due_in() == pytest.approx(0.5)
    clock.now += 0.3
    batcher.run_due()
    assert writer.calls == [] and batcher.due_in() == pytest.approx(0.2)
    clock.now += 0.2
    batcher.run_due()
    assert writer.outcomes() == {1: ("done", None), 2: ("done", None)}
    assert batcher.due_in() is None


def test_a_full_batch_runs_at_once_across_chunks_and_matches_the_model(
    tmp_path: Path, smoke: LoadedModel
) -> None:
    batcher, writer = _batcher(tmp_path, Clock(), batch_size=3)
    names = ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"]
    frames = [_frames(smoke, n) for n in names]
    for i, f in enumerate(frames):  # one instance per message: the batch still fills
        batcher.add(Chunk(f"job-{i}", {i}), i, {"radq-smoke": f}, {"radq-smoke": smoke}, None)
    results = {i: outputs for kind, i, outputs in writer.calls if kind == "result"}
    card = smoke.card
    for i, f in enumerate(frames):
        alone = predict(smoke, [to_numpy(f, smoke)])[0]
        assert results[i] == pytest.approx(alone, abs=1e-5), names[i]
    assert set(writer.outcomes()) == {0, 1, 2} and card.name == "radq-smoke"


def to_numpy(frames: list[RawFrame], model: LoadedModel) -> Any:
    from workers.device_prep import to_batch

    card = model.card
    return to_batch(frames, card.input, card.preprocessing, torch.device("cpu"))[0].numpy()


def test_an_out_of_memory_batch_is_split_not_failed(tmp_path: Path, smoke: LoadedModel) -> None:
    picky = OutOfMemoryAbove(smoke.module, limit=2)
    model = LoadedModel(smoke.card, picky, smoke.device)
    batcher, writer = _batcher(tmp_path, Clock(), batch_size=8)
    chunk = Chunk("job", set(range(8)))
    frames = _frames(smoke, "CT_small.dcm")
    for i in range(8):
        batcher.add(chunk, i, {"radq-smoke": frames}, {"radq-smoke": model}, None)
    assert writer.outcomes() == {i: ("done", None) for i in range(8)}
    assert picky.sizes == [8, 4, 2, 2, 2, 2]
    assert batcher.limit["radq-smoke"] == 2  # later batches start at the size that fitted
    batcher.add(Chunk("job2", {9}), 9, {"radq-smoke": frames}, {"radq-smoke": model}, None)
    batcher.add(Chunk("job2", {10}), 10, {"radq-smoke": frames}, {"radq-smoke": model}, None)
    assert picky.sizes[-1] == 2 and writer.outcomes()[10] == ("done", None)


def test_one_image_that_does_not_fit_fails_with_the_reason(tmp_path: Path, smoke: LoadedModel) -> None:
    model = LoadedModel(smoke.card, OutOfMemoryAbove(smoke.module, limit=0), smoke.device)
    batcher, writer = _batcher(tmp_path, Clock(), batch_size=2)
    chunk = Chunk("job", {1, 2})
    for i in (1, 2):
        batcher.add(chunk, i, {"radq-smoke": _frames(smoke, "CT_small.dcm")}, {"radq-smoke": model}, None)
    outcomes = writer.outcomes()
    assert {status for status, _ in outcomes.values()} == {"failed"}
    assert all("out of memory even for one image" in (reason or "") for _, reason in outcomes.values())


def test_mixed_precision_stays_within_its_tolerance(tmp_path: Path, smoke: LoadedModel) -> None:
    """bf16 autocast (RADQ_PRECISION=bf16; CUDA's fp16 works alike) against float32, per instance."""
    runtime = Runtime(torch.device("cpu"), precision="bf16")
    card = smoke.card
    mixed = prepare_for_runtime(LoadedModel(card, smoke.module, smoke.device), runtime)
    assert mixed.autocast == torch.bfloat16
    assert mixed.runner is not None  # traced under autocast: the graph holds the casts
    names = ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm", "examples_rgb_color.dcm"]
    outputs = {}
    for model in (smoke, mixed):
        batcher, writer = _batcher(tmp_path, Clock(), batch_size=len(names))
        for i, name in enumerate(names):
            batcher.add(Chunk("job", {i}), i, {card.name: _frames(smoke, name)}, {card.name: model}, None)
        outputs[model.autocast] = {i: o for kind, i, o in writer.calls if kind == "result"}
        assert set(writer.precision.values()) == {"bf16" if model.autocast else "fp32"}  # recorded
    full, half = outputs[None], outputs[torch.bfloat16]
    assert full.keys() == half.keys() == set(range(len(names)))
    for i in full:
        assert half[i] == pytest.approx(full[i], abs=MIXED_PRECISION_TOLERANCE), names[i]


MIXED_PRECISION_TOLERANCE = 0.02
"""Largest difference of a probability under bf16 autocast (8 bits of mantissa); measured:
3e-5 for radq-smoke, 1.4e-3 for DenseNet-121 on random inputs, at most 1.8e-3 for the
bundled DenseNet-121 and ResNet-18 on the bench's CT and CR images."""


@pytest.mark.parametrize(
    ("device", "bf16_in_hardware", "mixed_precision", "want"),
    [
        ("cpu", True, True, torch.bfloat16),  # 1.8-2x the float32 rate on the 2-core EPYC
        ("cpu", False, True, None),  # emulated bf16 would be slower than float32
        ("cpu", True, False, None),  # the card forbids it
        ("cuda", False, True, torch.float16),
        ("cuda", True, False, None),
    ],
)
def test_auto_precision_follows_the_device_and_the_card(
    monkeypatch: pytest.MonkeyPatch,
    smoke: LoadedModel,
    device: str,
    bf16_in_hardware: bool,
    mixed_precision: bool,
    want: torch.dtype | None,
) -> None:
    monkeypatch.setattr(loader, "cpu_computes_bf16", lambda: bf16_in_hardware)
    card = smoke.card.model_copy(update={"mixed_precision": mixed_precision})
    assert Runtime(torch.device(device), precision="auto").autocast_for(card) == want
    assert Runtime(torch.device(device), precision="fp32").autocast_for(card) is None


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_a_padded_partial_batch_gives_each_instance_its_own_result(
    tmp_path: Path, smoke: LoadedModel, threshold: float | None
) -> None:
    """On CUDA partial batches are padded to the batch size (one shape for cudnn.benchmark to
    tune), Grad-CAM batches (threshold 0: every label explained) too; the padding must reach
    the model and change no instance's result, nor get saliency maps of its own."""
    seen = OutOfMemoryAbove(smoke.module, limit=1000)  # records the batch sizes it is given
    card = smoke.card.model_copy(update={"gradcam_layer": "inner.features"})  # inside the wrapper
    model = LoadedModel(card, seen, smoke.device)
    names = ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"]
    outputs = {}
    for pad in (False, True):
        clock = Clock()
        writer = Recorder()
        maps = MapStore(FileBlobStore(tmp_path), writer)
        batcher = Batcher(8, 0.5, writer, maps, clock=clock, pad=pad)
        for i, name in enumerate(names):
            frames = {"radq-smoke": _frames(smoke, name)}
            batcher.add(Chunk("job", {i}), i, frames, {"radq-smoke": model}, threshold)
        clock.now += 1
        batcher.run_due()
        maps.close()  # the maps' writes are handed on by its thread
        outputs[pad] = {i: o for kind, i, o in writer.calls if kind == "result"}
        assert writer.outcomes() == {i: ("done", None) for i in range(3)}
        labels = set(smoke.card.labels) if threshold is not None else set()
        assert writer.saliency == {i: labels for i in range(3)}
    assert seen.sizes == [3, 8]
    for i in range(3):
        assert outputs[True][i] == pytest.approx(outputs[False][i], abs=1e-6), names[i]


class ShapeDependent(nn.Module):
    """Python control flow on the batch size: a trace keeps only the branch it saw."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if x.shape[0] == 2 else -out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_graph_that_traced_wrong_is_refused_and_the_model_runs_eagerly(
    smoke: LoadedModel, precision: str
) -> None:
    odd = LoadedModel(smoke.card, ShapeDependent(smoke.module), smoke.device)
    prepared = prepare_for_runtime(odd, Runtime(torch.device("cpu"), precision=precision))
    assert prepared.runner is None and prepared.forward is prepared.module
    fine = prepare_for_runtime(smoke, Runtime(torch.device("cpu"), precision=precision))
    assert fine.runner is not None  # the same network without the branch traces


class HeldStore(FileBlobStore):
    """A blob store whose writes wait until the test lets them go, or fail when told to."""

    def __init__(self, root: Path, failing: bool = False) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.failing = failing

    def put(self, stream: Any, *, max_bytes: int | None = None, what: str = "file") -> tuple[str, int]:
        if not self.release.wait(timeout=30):
            raise TimeoutError("the test never released the store")
        if self.failing:
            raise OSError(28, "No space left on device")
        return super().put(stream, max_bytes=max_bytes, what=what)


def test_maps_are_stored_off_the_inference_thread_and_written_before_their_outcome(
    tmp_path: Path, smoke: LoadedModel
) -> None:
    writer = Recorder()
    store = HeldStore(tmp_path)
    maps = MapStore(store, writer)
    batcher = Batcher(2, 0.5, writer, maps, clock=Clock())
    chunk = Chunk("job", {1, 2, 3})
    batcher.add(chunk, 1, {"radq-smoke": _frames(smoke, "CT_small.dcm")}, {"radq-smoke": smoke}, 0.0)
    batcher.add(chunk, 2, {"radq-smoke": _frames(smoke, "MR_small.dcm")}, {"radq-smoke": smoke}, 0.0)
    # The batch ran and the stream is free while its maps wait for the store; a job that
    # asks for no maps is not held behind them.
    batcher.add(chunk, 3, {"radq-smoke": _frames(smoke, "CR2_6247.dcm")}, {"radq-smoke": smoke}, None)
    batcher.drain()
    assert writer.calls[0][:2] == ("result", 3) and writer.outcomes() == {3: ("done", None)}
    store.release.set()
    maps.close()
    kinds = [(kind, i) for kind, i, _ in writer.calls]
    assert kinds == [
        ("result", 3),
        ("outcome", 3),
        ("result", 1),
        ("outcome", 1),
        ("result", 2),
        ("outcome", 2),
    ]
    assert writer.saliency == {1: set(smoke.card.labels), 2: set(smoke.card.labels), 3: set()}


def test_a_map_that_cannot_be_stored_fails_its_instance_with_the_reason(
    tmp_path: Path, smoke: LoadedModel
) -> None:
    writer = Recorder()
    store = HeldStore(tmp_path, failing=True)
    store.release.set()
    maps = MapStore(store, writer)
    batcher = Batcher(2, 0.5, writer, maps, clock=Clock())
    chunk = Chunk("job", {1, 2})
    batcher.add(chunk, 1, {"radq-smoke": _frames(smoke, "CT_small.dcm")}, {"radq-smoke": smoke}, 0.0)
    batcher.add(chunk, 2, {"radq-smoke": _frames(smoke, "MR_small.dcm")}, {"radq-smoke": smoke}, None)
    batcher.drain()
    maps.close()
    outcomes = writer.outcomes()
    assert outcomes[2] == ("done", None)  # in the same batch, without maps
    status, reason = outcomes[1]
    assert status == "failed" and reason is not None
    assert (
        reason.startswith(f"Grad-CAM maps could not be stored in {store.url}: ") and "No space left" in reason
    )
    assert [i for kind, i, _ in writer.calls if kind == "result"] == [2]  # no row without its maps


def test_a_multi_frame_instance_stores_only_its_best_frames_maps(tmp_path: Path, smoke: LoadedModel) -> None:
    """Card frame policy ``all``: the result keeps, per label, the map of the frame with the
    highest score, so only those are encoded and stored, not one per frame and label."""
    card = smoke.card
    every_frame = card.model_copy(
        update={"preprocessing": card.preprocessing.model_copy(update={"frame": "all"})}
    )
    model = LoadedModel(every_frame, smoke.module, smoke.device)
    frames = _frames(model, "rtdose.dcm")
    assert len(frames) == 15
    writer = Recorder()
    store = FileBlobStore(tmp_path / "blobs")
    maps = MapStore(store, writer)
    batcher = Batcher(4, 0.5, writer, maps, clock=Clock())
    batcher.add(Chunk("job", {1}), 1, {"radq-smoke": frames}, {"radq-smoke": model}, 0.0)
    batcher.drain()
    maps.close()
    assert writer.outcomes() == {1: ("done", None)}
    assert writer.saliency[1] == set(card.labels)
    stored = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(stored) <= len(card.labels)  # labels whose best frame is the same may share a map


def test_maps_waiting_for_a_slow_store_hold_the_stream_back_past_their_bound(tmp_path: Path) -> None:
    writer = Recorder()
    store = HeldStore(tmp_path)
    maps = MapStore(store, writer, max_waiting=4)
    chunk = Chunk("job", {1, 2})
    level = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)

    def row(i: int) -> ResultRow:
        return ResultRow(i, "m", "1", "0" * 64, "0", "{}", "fp32", {"a": 0.5, "b": 0.5, "c": 0.5})

    maps.result(chunk, row(1), {"a": level, "b": level, "c": level})  # 3 of 4 waiting
    second = threading.Thread(target=maps.result, args=(chunk, row(2), {"a": level, "b": 1 - level}))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # 3 + 2 > 4: the caller waits while the store is stuck
    store.release.set()
    second.join(timeout=30)
    assert not second.is_alive()
    maps.close()
    assert writer.saliency == {1: {"a", "b", "c"}, 2: {"a", "b"}}
