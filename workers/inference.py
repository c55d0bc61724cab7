"""Batched forward passes: label probabilities from a batch, at the model's precision."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from radq.model_card import ModelCard
from workers.models.loader import LoadedModel

_OUT_OF_MEMORY = ("out of memory", "can't allocate memory")
"""How CUDA's and the CPU allocator's failures read."""


def to_batch(model: LoadedModel, inputs: Sequence[np.ndarray]) -> Tensor:
    """Stack model inputs already preprocessed on the host and move them to the model's device."""
    batch = torch.from_numpy(np.stack(inputs))
    if model.device.type == "cuda":
        return batch.pin_memory().to(model.device, non_blocking=True)
    return batch


def activate(card: ModelCard, logits: Tensor) -> Tensor:
    """The card's output activation: sigmoid (multi-label) or softmax (one of n)."""
    return torch.softmax(logits, dim=1) if card.output_activation == "softmax" else torch.sigmoid(logits)


def as_label_dicts(card: ModelCard, probs: Tensor) -> list[dict[str, float]]:
    rows = probs.detach().float().cpu().tolist()  # Python floats in one call, not one per value
    return [{label: round(p, 6) for label, p in zip(card.labels, row, strict=True)} for row in rows]


def precision_context(model: LoadedModel) -> contextlib.AbstractContextManager[object]:
    """Autocast to the model's mixed precision, or nothing for float32."""
    if model.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=model.autocast)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # TorchScript re-raises as torch.jit.Error, which is not a RuntimeError: go by the words.
    return any(text in str(exc) for text in _OUT_OF_MEMORY)


def predict(model: LoadedModel, inputs: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """Run one batch and map each output row to ``{label: probability}``."""
    batch = to_batch(model, inputs)
    with torch.inference_mode(), precision_context(model):
        probs = activate(model.card, model.forward(batch).float())
    return as_label_dicts(model.card, probs)
