"""Grad-CAM on a batch equals Grad-CAM image by image, and thresholds select labels."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from radq.settings import BUNDLED_MODEL_DIR
from workers.gradcam import Explained, explain, to_png
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


def test_streams_explaining_at_once_on_one_model_get_their_own_maps(model: LoadedModel) -> None:
    # A CPU worker's inference streams share the model: each one's forward pass fires the
    # other's hook, and a map must come from its own batch (it once failed the batch).
    inputs = _inputs(6)
    batches = [to_batch(model, inputs[:3]), to_batch(model, inputs[3:])]
    alone = [explain(model, b, threshold=0.0) for b in batches]
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    got: list[list[Explained]] = [[], []]

    def run(i: int) -> None:
        try:
            for _ in range(15):
                start.wait()
                got[i].append(explain(model, batches[i], threshold=0.0))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for explained in got[i]:
            assert explained.probabilities == alone[i].probabilities
            for row, maps in enumerate(explained.saliency):
                for label, m in maps.items():
                    np.testing.assert_allclose(m, alone[i].saliency[row][label], atol=1e-4)


def test_png_is_8_bit_grayscale_of_the_map() -> None:
    ramp = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    image = Image.open(io.BytesIO(to_png(ramp)))
    assert image.mode == "L" and image.size == (224, 224)
    pixels = np.asarray(image)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
