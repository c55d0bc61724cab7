"""Grad-CAM on a batch equals Grad-CAM image by image, and thresholds select labels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from radq.settings import BUNDLED_MODEL_DIR
from workers.gradcam import explain, to_png
from workers.inference import predict, to_batch
from workers.models.loader import LoadedModel, load_model


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(BUNDLED_MODEL_DIR / "radq-smoke", torch.device("cpu"))


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(0, 1, (1, 224, 224)).astype(np.float32) for _ in range(n)]


def test_batched_maps_equal_single_image_maps(model: LoadedModel) -> None:
    inputs = _inputs(4)
    batched = explain(model, to_batch(model, inputs), threshold=0.0)
    assert batched.probabilities == predict(model, inputs)
    for i, x in enumerate(inputs):
        alone = explain(model, to_batch(model, [x]), threshold=0.0)
        assert set(alone.saliency[0]) == set(model.card.labels)
        for label, m in alone.saliency[0].items():
            assert m.shape == (224, 224) and m.dtype == np.float32
            assert m.min() >= 0.0 and m.max() <= 1.0
            np.testing.assert_allclose(batched.saliency[i][label], m, atol=1e-4)


def test_threshold_selects_labels(model: LoadedModel) -> None:
    inputs = _inputs(3)
    probs = predict(model, inputs)
    threshold = float(np.median([p for row in probs for p in row.values()]))
    explained = explain(model, to_batch(model, inputs), threshold)
    for row, maps in zip(probs, explained.saliency, strict=True):
        assert set(maps) == {label for label, p in row.items() if p >= threshold}
    assert explain(model, to_batch(model, inputs), 1.0).saliency == [{}, {}, {}]


def test_png_is_8_bit_grayscale_of_the_map() -> None:
    ramp = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    image = Image.open(io.BytesIO(to_png(ramp)))
    assert image.mode == "L" and image.size == (224, 224)
    pixels = np.asarray(image)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
