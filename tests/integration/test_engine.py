"""The worker's engine end to end: real API and worker processes, real Redis and SQL.

What the throughput optimisations must not change: each instance's outputs equal the
model's outputs on the same input; a small job is not held back waiting for a full
batch; a batch the device has no memory for is split, not failed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from db.models import Instance, Result
from db.session import make_engine
from radq.model_card import discover_cards
from radq.settings import BUNDLED_MODEL_DIR
from tests.conftest import SAMPLES, make_settings
from tests.integration.test_faults import processes, submit_paths
from tests.jobwait import wait_done
from tests.workers.test_batching import MIXED_PRECISION_TOLERANCE
from workers.decode import read_instance
from workers.device_prep import raw_frames, to_batch
from workers.inference import activate
from workers.models.loader import Runtime, load_model
from workers.preprocess import preprocess

FILES = ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm", "JPEG2000.dcm", "examples_rgb_color.dcm",
         "J2K_pixelrep_mismatch.dcm", "CT5N_2062.dcm", "CR3_6278.dcm"]  # fmt: skip
REFERENCE_TOLERANCE = 0.02
"""Largest difference of a probability between the device preprocessing and the reference
(numpy, per frame): decimation and float32 order of operations move inputs slightly (and,
under bf16 autocast, the model's rounding)."""


def _rows(database_url: str, job_id: str) -> list[tuple[str, dict[str, float], str | None]]:
    """(file name, outputs, precision) of every result of the job."""
    engine = make_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Instance.file_name, Result.outputs, Result.precision)
            .join(Result)
            .where(Instance.job_id == job_id)
        ).all()
    engine.dispose()
    return [(Path(name).name, dict(outputs), precision) for name, outputs, precision in rows]


def _outputs(database_url: str, job_id: str) -> dict[str, dict[str, float]]:
    return {name: outputs for name, outputs, _ in _rows(database_url, job_id)}


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True)
    for name in names:
        shutil.copy(SAMPLES / "real" / name, root / name)
    return root


def test_outputs_equal_the_model_on_the_same_input(tmp_path: Path, database_url: str, redis_url: str) -> None:
    settings = make_settings(tmp_path, database_url, redis_url, batch_size=3, batch_deadline=0.2)
    folder = _folder(settings.allowed_roots[0] / "same", FILES)
    with processes(settings) as running:
        job = wait_done(running.client, submit_paths(running, [folder]), timeout=180)
    assert job["counts"]["done"] == len(FILES), job["counts"]
    stored = _outputs(database_url, job["id"])
    model = load_model(discover_cards(BUNDLED_MODEL_DIR)["radq-smoke"][0], torch.device("cpu"))
    card = model.card
    # On a CPU with bf16 in hardware the worker runs the model under bf16 autocast (auto).
    mixed = Runtime(torch.device("cpu"), settings.precision).autocast_for(card) is not None
    same_input_tolerance = MIXED_PRECISION_TOLERANCE if mixed else 1e-4
    assert {precision for _, _, precision in _rows(database_url, job["id"])} == {"bf16" if mixed else "fp32"}
    for name in FILES:
        image = read_instance(SAMPLES / "real" / name, max_pixels=1 << 28, frame=card.preprocessing.frame)
        frames = raw_frames(image, card.input, card.preprocessing)
        same_input = to_batch(frames, card.input, card.preprocessing, torch.device("cpu"))
        reference = torch.from_numpy(preprocess(image, card.input, card.preprocessing))
        with torch.inference_mode():  # float32, NCHW, one image: none of the worker's optimisations
            for inputs, tolerance in ((same_input, same_input_tolerance), (reference, REFERENCE_TOLERANCE)):
                probs = activate(card, model.module(inputs[:1])).numpy()[0]
                expected = dict(zip(card.labels, probs.tolist(), strict=True))
                assert stored[name] == pytest.approx(expected, abs=tolerance), (name, tolerance)


def test_a_small_job_is_not_held_back_for_a_full_batch(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    # Batches of 64 would never fill from 3 files: only the deadline runs them.
    settings = make_settings(tmp_path, database_url, redis_url, batch_size=64, batch_deadline=0.5)
    folder = _folder(settings.allowed_roots[0] / "small", FILES[:3])
    with processes(settings) as running:
        job = wait_done(running.client, submit_paths(running, [folder]), timeout=120)
    assert job["counts"]["done"] == 3


OOM_MODEL = '''
import torch


class OutOfMemoryAbove(torch.nn.Module):
    """Fails like a GPU without memory for batches over 2 images; else the mean per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)
'''


def _oom_model(root: Path) -> Path:
    """A TorchScript model directory whose model cannot take batches over 2."""
    folder = root / "picky"
    folder.mkdir(parents=True)
    (root / "picky_module.py").write_text(OOM_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("picky_module", root / "picky_module.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.jit.save(torch.jit.script(module.OutOfMemoryAbove()), str(folder / "model.pt"))
    card = {
        "name": "picky", "version": "1", "task": "test", "architecture": "mean",
        "labels": ["bright"], "input": {"height": 32, "width": 32, "channels": 1},
        "weights": "model.pt", "weights_format": "torchscript",
        "sha256": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
        "intended_use": "tests", "limitations": "none", "training_data": "none", "license": "MIT",
    }  # fmt: skip
    (folder / "model.json").write_text(json.dumps(card))
    return root


def test_out_of_memory_batches_are_split_not_failed(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    models = _oom_model(tmp_path / "models")
    # One inference stream: all 8 instances reach one batcher and fill its batch of 8.
    settings = make_settings(tmp_path, database_url, redis_url, batch_size=8, batch_deadline=5.0,
                             model_dir=models, default_models=["picky"], infer_streams=1)  # fmt: skip
    names = [f"{n:02d}.dcm" for n in range(8)]
    folder = settings.allowed_roots[0] / "oom"
    folder.mkdir()
    for name in names:
        shutil.copy(SAMPLES / "real" / "CT_small.dcm", folder / name)
    with processes(settings) as running:
        job = wait_done(running.client, submit_paths(running, [folder]), timeout=120)
    assert job["counts"]["done"] == 8 and job["counts"]["failed"] == 0, job["counts"]
    assert len(_outputs(database_url, job["id"])) == 8
    log = "".join(p.read_text(errors="replace") for p in settings.home.glob("worker-*.log"))
    assert "out of memory on cpu at batch 8; batch size now 4" in log
    assert "batch size now 2" in log
