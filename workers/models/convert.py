"""Turning a third-party checkpoint into a radq model directory.

Checkpoints found in the wild wrap the same tensors in different layouts: training
containers (``{"state_dict": ..., "epoch": ...}``), ``nn.DataParallel``'s ``module.``
prefix, a wrapper attribute (CheXNet's ``densenet121.``), torchvision's pre-0.3
DenseNet names (``norm.1``) and a classifier inside ``nn.Sequential(Linear, Sigmoid)``.
:func:`normalize_state_dict` maps those onto the names of :mod:`workers.models.arch`;
:func:`import_checkpoint` then proves the fit with a strict load and writes
``model.safetensors`` with an honest card.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from radq.errors import ModelError
from radq.model_card import ModelCard
from workers.models.arch import ARCHITECTURES
from workers.models.loader import read_checkpoint, sha256_of

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts nest the weights, tried in this order."""
WRAPPER_PREFIXES = ("module.", "densenet121.", "model.")
"""Prefixes stripped while every key carries one (DataParallel, CheXNet, Lightning)."""
HEADS = {"densenet121": "classifier", "resnet18": "fc", "resnet50": "fc", "radq-smallcnn": "classifier"}
"""The final linear layer of each architecture, for unwrapping ``head.0.*``."""

# Before torchvision 0.3 a dense layer's children were named "norm.1", "conv.2"...;
# the released ImageNet DenseNet weights (and CheXNet's) still use those names.
_OLD_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for _ in range(3):
        # A container key holding a mapping wins over loose tensors beside it (a best_loss).
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    return state


def normalize_state_dict(state: Mapping[str, Any], architecture: str) -> dict[str, torch.Tensor]:
    """Map a checkpoint's layout onto radq's (torchvision's) parameter names.

    Args:
        state: What the weights file held: a state dict, or a training container with
            one under ``state_dict``, ``model_state_dict`` or ``model``.
        architecture: The target architecture name (a key of ``ARCHITECTURES``).

    Returns:
        A flat ``name -> tensor`` dict; whether it fits is checked by a strict load.

    Raises:
        ModelError: no flat dict of tensors could be found.
    """
    flat = _unwrap(state)
    odd = [k for k, v in flat.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not flat or odd:
        example = f" (e.g. entry {odd[0]!r})" if odd else ""
        raise ModelError(f"the checkpoint holds no flat state dict of tensors{example}")
    out: dict[str, torch.Tensor] = dict(flat)

    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True

    renamed: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        old = _OLD_DENSE_LAYER_KEY.match(key)
        renamed[old.group(1) + old.group(2) if old else key] = value

    head = HEADS.get(architecture)
    if head and f"{head}.weight" not in renamed and f"{head}.0.weight" in renamed:
        # nn.Sequential(Linear, Sigmoid): the card's output_activation applies the sigmoid.
        for suffix in ("weight", "bias"):
            if f"{head}.0.{suffix}" in renamed:
                renamed[f"{head}.{suffix}"] = renamed.pop(f"{head}.0.{suffix}")
    return renamed


def import_checkpoint(
    src: Path,
    dest_dir: Path,
    *,
    name: str,
    version: str,
    architecture: str,
    labels: Sequence[str],
    input_size: int,
    channels: int,
    training_data: str,
    intended_use: str,
    limitations: str,
    license: str,
    preprocessing: dict[str, Any] | None = None,
    task: str = "multi-label classification",
    output_activation: str = "sigmoid",
    overwrite: bool = False,
) -> Path:
    """Convert ``src`` into the model directory ``dest_dir / name``.

    The weights are read without unpickling code, normalised, loaded strictly into
    the architecture, and saved as ``model.safetensors`` next to ``model.json``. The
    card's provenance fields are required: they are what a reader of the results
    relies on to know what the outputs mean.

    Args:
        src: A ``.safetensors``, ``.pt``, ``.pth`` or ``.pth.tar`` checkpoint.
        dest_dir: The model root (``RADQ_MODEL_DIR``); the model goes in a subdirectory.
        name: Model name (directory name and card ``name``).
        version: Card version.
        architecture: A key of ``ARCHITECTURES``.
        labels: Output labels, in the order of the classifier's outputs.
        input_size: Height and width of the model input.
        channels: Input channels (1 or 3).
        training_data: What the weights were trained on, and by whom.
        intended_use: What the outputs may be used for.
        limitations: Known limitations.
        license: The weights' license.
        preprocessing: The card's ``preprocessing`` section; radq's default if None.
        task: The card's ``task``.
        output_activation: ``sigmoid`` or ``softmax``.
        overwrite: Replace an existing directory of the same name.

    Returns:
        The written model directory.

    Raises:
        ModelError: unknown architecture, an unsafe or unreadable checkpoint, weights that
            do not fit, an invalid card, or an existing directory without ``overwrite``.
    """
    factory = ARCHITECTURES.get(architecture)
    if factory is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {architecture!r} (known: {known})")
    if not src.is_file():
        raise ModelError(f"{src}: no such checkpoint file")
    provenance = {"training_data": training_data, "intended_use": intended_use, "limitations": limitations}
    for field, text in {**provenance, "license": license}.items():
        if not text.strip():
            raise ModelError(f"{field} is empty: the card must say what these weights are")
    out_dir = dest_dir / name
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass overwrite to replace it)")

    state = normalize_state_dict(read_checkpoint(src), architecture)
    module = factory(in_channels=channels, num_classes=len(labels))
    # strict=True's checks, spelled out so the error lists what is wrong in one line.
    # BatchNorm fills in a missing num_batches_tracked (pre-0.4 checkpoints have none).
    expected = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if wrong:
        raise ModelError(
            f"{src}: weights do not fit {architecture} with {len(labels)} labels: "
            f"shape mismatch for {', '.join(wrong)}"
        )
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(_misfit(src, architecture, result.missing_keys, result.unexpected_keys))

    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": task,
        "architecture": architecture,
        "labels": list(labels),
        "input": {"height": input_size, "width": input_size, "channels": channels},
        "output_activation": output_activation,
        "weights": "model.safetensors",
        "weights_format": "state_dict",
        "sha256": "0" * 64,
        "intended_use": intended_use,
        "limitations": limitations,
        "training_data": training_data,
        "license": license,
    }
    if preprocessing is not None:
        card["preprocessing"] = preprocessing
    _validate(card)  # before writing anything

    dest_dir.mkdir(parents=True, exist_ok=True)
    # Written beside its destination and renamed, so no reader sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest_dir))
    try:
        staging.chmod(0o755)
        weights = staging / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(weights))
        card["sha256"] = sha256_of(weights)
        text = _validate(card).model_dump_json(indent=2)
        (staging / "model.json").write_text(text + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _validate(card: dict[str, Any]) -> ModelCard:
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"invalid model card: {where}: {first['msg']}") from None


def _misfit(src: Path, architecture: str, missing: list[str], unexpected: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [f"{src}: the checkpoint does not fit {architecture}"]
    if missing:
        parts.append(f"missing keys: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {some(unexpected)}")
    return "; ".join(parts)
