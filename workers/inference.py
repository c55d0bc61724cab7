"""Batched forward passes: stacked float32 inputs in, label probabilities out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.models.loader import LoadedModel


def predict(model: LoadedModel, inputs: Sequence[np.ndarray]) -> list[dict[str, float]]:
    """Run one batch and map each output row to ``{label: probability}``."""
    batch = torch.from_numpy(np.stack(inputs))
    if model.device.type == "cuda":
        batch = batch.pin_memory().to(model.device, non_blocking=True)
    with torch.inference_mode():
        logits = model.module(batch).float()
        if model.card.output_activation == "softmax":
            probs = torch.softmax(logits, dim=1)
        else:
            probs = torch.sigmoid(logits)
    rows = probs.cpu().numpy()
    labels = model.card.labels
    return [
        {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)} for row in rows
    ]
