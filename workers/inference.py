"""Batched forward passes: stacked float32 inputs in, label probabilities out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from radq.model_card import ModelCard
from workers.models.loader import LoadedModel


def to_batch(model: LoadedModel, inputs: Sequence[np.ndarray]) -> Tensor:
    batch = torch.from_numpy(np.stack(inputs))
    if model.device.type == "cuda":
        return batch.pin_memory().to(model.device, non_blocking=True)
    return batch


def activate(card: ModelCard, logits: Tensor) -> Tensor:
    """The card's output activation: sigmoid (multi-label) or softmax (one of n)."""
    return torch.softmax(logits, dim=1) if card.output_activation == "softmax" else torch.sigmoid(logits)


def as_label_dicts(card: ModelCard, probs: Tensor) -> list[dict[str, float]]:
    rows = probs.detach().float().cpu().numpy()
    return [{label: round(float(p), 6) for label, p in zip(card.labels, row, strict=True)} for row in rows]


def predict(model: LoadedModel, inputs: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """Run one batch and map each output row to ``{label: probability}``."""
    batch = to_batch(model, inputs)
    with torch.inference_mode():
        probs = activate(model.card, model.module(batch).float())
    return as_label_dicts(model.card, probs)
