"""Model directories for routing tests: small bundled models, one of them GPU-only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from radq.settings import BUNDLED_MODEL_DIR

SMOKE = "radq-smoke"
"""A CPU model (``device: any``, the default)."""
SMOKE_B = "radq-smoke-b"
"""A second CPU model: a job naming both goes to the general queue."""
SMOKE_GPU = "radq-smoke-gpu"
"""The same weights under a card that says ``device: gpu``."""


def copy_model(root: Path, name: str, **card: object) -> Path:
    """Copy the bundled radq-smoke into ``root/name`` with its card renamed and ``card`` applied."""
    dest = root / name
    shutil.copytree(BUNDLED_MODEL_DIR / SMOKE, dest)
    path = dest / "model.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "name": name, **card}, indent=2))
    return dest


def routing_model_dir(root: Path) -> Path:
    """``root`` holding radq-smoke, radq-smoke-b (CPU) and radq-smoke-gpu (``device: gpu``)."""
    root.mkdir(parents=True, exist_ok=True)
    copy_model(root, SMOKE)
    copy_model(root, SMOKE_B)
    copy_model(root, SMOKE_GPU, device="gpu")
    return root
