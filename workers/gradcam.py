"""Grad-CAM saliency maps, computed on the same batch as the predictions.

One forward pass with the target layer's activations kept, then one backward pass per
label that some image of the batch scores above the threshold. In eval mode the images
of a batch do not interact, so summing a label's logits over the selected images gives
each image its own gradient (Selvaraju et al., 2017). Inference streams share a model:
each call keeps the activations of its own thread's forward pass, and takes gradients
with respect to them alone (no parameter gradients accumulate).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from radq.errors import ModelError
from workers.inference import activate, as_label_dicts
from workers.models.loader import LoadedModel

DEFAULT_LAYERS = {
    "radq-smallcnn": "features",
    "densenet121": "features",
    "resnet18": "layer4",
    "resnet50": "layer4",
}
"""The layer whose activations Grad-CAM weighs, per architecture (last convolutional stage)."""


@dataclass
class Explained:
    probabilities: list[dict[str, float]]
    saliency: list[dict[str, np.ndarray]]
    """Per image, label to a map in [0, 1] of the model's input size (float32, H x W)."""


def _target_layer(model: LoadedModel) -> nn.Module:
    name = model.card.gradcam_layer or DEFAULT_LAYERS.get(model.card.architecture)
    if not name:
        raise ModelError(f"{model.card.name}: no gradcam_layer in the card for {model.card.architecture}")
    try:
        return model.module.get_submodule(name)
    except AttributeError:
        raise ModelError(f"{model.card.name}: gradcam_layer {name!r} is not a submodule") from None


def _normalised_cam(activations: Tensor, grad: Tensor, size: torch.Size) -> Tensor:
    """Gradient-weighted activations, ReLU, upsampled to the input size, peak scaled to 1."""
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), cam)


def explain(model: LoadedModel, batch: Tensor, threshold: float, rows: int | None = None) -> Explained:
    """Predict a batch and, for every (image, label) at or above ``threshold``, a saliency map.

    ``batch`` is (B, C, H, W) on the model's device; gradients run in float32. Only its
    first ``rows`` images (default all) are real, the rest pad a partial batch to the
    batch size: padding is neither explained nor returned.
    """
    rows = batch.shape[0] if rows is None else rows
    layer = _target_layer(model)
    captured: list[Tensor] = []
    caller = threading.get_ident()

    def keep(_: nn.Module, __: object, output: Tensor) -> None:
        if threading.get_ident() == caller:  # another stream's forward pass fires this hook too
            captured.append(output)

    maps: list[dict[str, np.ndarray]] = [{} for _ in range(rows)]
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model.module(batch).float()
            probs = activate(model.card, logits)
            selected = probs.detach() >= threshold
            selected[rows:] = False
            activations = captured[-1]
            labels = [k for k in range(logits.shape[1]) if bool(selected[:, k].any())]
            for n, k in enumerate(labels):
                score = (logits[:, k] * selected[:, k]).sum()
                (grad,) = torch.autograd.grad(score, activations, retain_graph=n < len(labels) - 1)
                cam = _normalised_cam(activations, grad, batch.shape[-2:]).cpu().numpy()
                for i in torch.nonzero(selected[:, k]).flatten().tolist():
                    maps[i][model.card.labels[k]] = cam[i].astype(np.float32)
    finally:
        handle.remove()
    return Explained(probabilities=as_label_dicts(model.card, probs[:rows]), saliency=maps)


PNG_LEVEL = 1
"""zlib level of the maps' PNGs: a 224x224 map takes 0.84 ms at 1 against 2.96 at Pillow's
default 6, for 11.6 KiB instead of 9.0 (bilinear 7x7 maps, a one-off timing): a job that
asks for maps writes several per image, and they were most of the worker's CPU per image."""


def to_8bit(saliency: np.ndarray) -> np.ndarray:
    """A [0, 1] map as the 8-bit levels its PNG holds (white = most salient)."""
    return np.round(np.clip(saliency, 0, 1) * 255).astype(np.uint8)


def to_png(saliency: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a [0, 1] map, or of one already made 8-bit by :func:`to_8bit`."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    levels = saliency if saliency.dtype == np.uint8 else to_8bit(saliency)
    Image.fromarray(levels, mode="L").save(buf, "PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()
