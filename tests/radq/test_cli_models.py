"""``radq models import``, ``show`` and ``validate`` as a user runs them (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.models.arch import SmallCNN

PROVENANCE = [
    "--training-data", "None: random weights made by the test suite.",
    "--intended-use", "Testing the radq CLI only; not a diagnostic device.",
    "--limitations", "Random weights; outputs mean nothing.",
    "--license", "Apache-2.0",
]


def radq(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "RADQ_MODEL_DIR": str(model_dir)}
    return subprocess.run(
        [sys.executable, "-m", "radq.cli", "models", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A DataParallel-style training checkpoint of the small CNN."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in SmallCNN(1, 3).state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 12, "state_dict": state}, path)
    return path


def test_import_then_show_and_validate(tmp_path: Path, checkpoint: Path) -> None:
    models = tmp_path / "models"
    preprocessing = tmp_path / "pre.json"
    preprocessing.write_text(json.dumps({"mean": [0.4], "std": [0.2], "frame": "first"}))
    imported = radq(
        "import", str(checkpoint), "--name", "us-tiny", "--version", "0.1.0",
        "--architecture", "radq-smallcnn", "--labels", "normal, cyst,mass",
        "--input-size", "128", "--channels", "1",
        "--preprocessing-json", str(preprocessing), *PROVENANCE, model_dir=models,
    )
    assert imported.returncode == 0, imported.stderr
    assert (models / "us-tiny" / "model.safetensors").is_file()

    shown = radq("show", "us-tiny", "--json", model_dir=models)
    assert shown.returncode == 0, shown.stderr
    card = json.loads(shown.stdout)
    assert card["labels"] == ["normal", "cyst", "mass"]
    assert card["input"] == {"height": 128, "width": 128, "channels": 1}
    assert card["preprocessing"]["mean"] == [0.4] and card["preprocessing"]["frame"] == "first"
    assert card["training_data"] == PROVENANCE[1] and card["license"] == "Apache-2.0"

    table = radq("show", "us-tiny", model_dir=models)
    assert table.returncode == 0 and "Random weights; outputs mean nothing." in table.stdout

    validated = radq("validate", str(models / "us-tiny"), model_dir=models)
    assert validated.returncode == 0, validated.stderr
    assert "ok: us-tiny@0.1.0 (radq-smallcnn, 3 labels)" in validated.stdout

    again = radq(
        "import", str(checkpoint), "--name", "us-tiny", "--version", "0.2.0",
        "--architecture", "radq-smallcnn", "--labels", "normal,cyst,mass",
        "--channels", "1", *PROVENANCE, model_dir=models,
    )
    assert again.returncode == 1 and "already exists" in again.stderr


def test_import_failures_exit_one_with_the_reason(tmp_path: Path, checkpoint: Path) -> None:
    models = tmp_path / "models"
    base = ["import", str(checkpoint), "--name", "m", "--version", "1", "--channels", "1", *PROVENANCE]
    wrong_labels = radq(*base, "--architecture", "radq-smallcnn", "--labels", "a,b", model_dir=models)
    assert wrong_labels.returncode == 1
    assert "shape mismatch for classifier.weight" in " ".join(wrong_labels.stderr.split())
    unknown = radq(*base, "--architecture", "vgg99", "--labels", "a,b,c", model_dir=models)
    assert unknown.returncode == 1 and "unknown architecture 'vgg99'" in unknown.stderr
    assert not (models / "m").exists()

    missing = radq("show", "nope", model_dir=models)
    assert missing.returncode == 1 and "model 'nope' not found" in missing.stderr


def test_provenance_is_required(tmp_path: Path, checkpoint: Path) -> None:
    result = radq(
        "import", str(checkpoint), "--name", "m", "--version", "1", "--architecture", "radq-smallcnn",
        "--labels", "a,b,c", "--channels", "1", model_dir=tmp_path,
    )
    assert result.returncode == 2 and "--training-data" in result.stderr
