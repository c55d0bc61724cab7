"""workers.preprocess: windowing, colour, resize and normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

import radq
from radq.errors import ModelError, UndecodablePixels
from radq.model_card import InputSpec, Preprocessing, Window
from workers.decode import DecodedImage, read_instance
from workers.header import InstanceMeta
from workers.preprocess import preprocess

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
PLAIN = Preprocessing(mean=[0.5], std=[0.25])
CT_WINDOW = Preprocessing(windows={"CT": Window(center=40, width=80)}, mean=[0.5], std=[0.25])


def _image(pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
           **fields: object) -> DecodedImage:  # fmt: skip
    meta = InstanceMeta("1.2.3", "1.2", "1.2.3.4", modality, None, None, photometric, None)
    defaults: dict[str, object] = {
        "rescale_slope": 1.0, "rescale_intercept": 0.0, "window": None, "voi_lut": None,
    }  # fmt: skip
    defaults.update(fields)
    return DecodedImage(meta=meta, pixels=pixels, photometric=photometric, notes=[], **defaults)  # type: ignore[arg-type]


def _same_size(image: DecodedImage, channels: Literal[1, 3] = 1) -> InputSpec:
    height, width = image.pixels.shape[:2]
    return InputSpec(height=height, width=width, channels=channels)


def _reference_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out branch by branch, in float64."""
    x = x.astype(np.float64)
    low = x <= center - 0.5 - (width - 1) / 2
    high = x > center - 0.5 + (width - 1) / 2
    mid = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.where(low, 0.0, np.where(high, 1.0, mid))


@pytest.mark.parametrize(
    "name",
    ["real/CT_small.dcm", "real/MR_small.dcm", "real/CR2_6247.dcm",
     "real/examples_rgb_color.dcm", "real/rtdose.dcm", "real/examples_jpeg2k.dcm"],
)  # fmt: skip
@pytest.mark.parametrize("channels", [1, 3])
def test_real_files_give_model_shaped_float32(name: str, channels: Literal[1, 3]) -> None:
    image = read_instance(SAMPLES / name, max_pixels=1 << 28)
    out = preprocess(image, InputSpec(height=48, width=40, channels=channels), CT_WINDOW)
    assert out.shape == (channels, 48, 40)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.isfinite(out).all()
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # [0, 1] normalised by 0.5/0.25


def test_card_window_matches_the_standard_formula() -> None:
    stored = np.array([[0, 1000, 1024, 1030], [1063, 1064, 1070, 1102], [1103, 1104, 3000, 500]],
                      dtype=np.int16)  # fmt: skip
    image = _image(stored, rescale_intercept=-1024.0, window=(500.0, 2000.0))  # card wins
    out = preprocess(image, _same_size(image), CT_WINDOW)
    expected = (_reference_window(stored - 1024.0, 40, 80) - 0.5) / 0.25
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_file_window_is_used_without_a_card_window() -> None:
    stored = np.arange(0, 2400, 100, dtype=np.uint16).reshape(4, 6)
    image = _image(stored, modality="MR", window=(600.0, 1600.0))
    out = preprocess(image, _same_size(image), CT_WINDOW)
    np.testing.assert_allclose(out[0], (_reference_window(stored, 600, 1600) - 0.5) / 0.25,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("function", "reference"),
    [
        ("LINEAR_EXACT", lambda x: np.clip((x - 600) / 1600 + 0.5, 0, 1)),
        ("SIGMOID", lambda x: 1 / (1 + np.exp(-4 * (x - 600) / 1600))),
    ],
)
def test_file_voi_lut_functions(function: str, reference: object) -> None:
    stored = np.arange(0, 2400, 100, dtype=np.uint16).reshape(4, 6)
    image = _image(stored, modality="MR", window=(600.0, 1600.0), window_function=function)
    out = preprocess(image, _same_size(image), PLAIN)
    np.testing.assert_allclose(out[0], (reference(stored.astype(float)) - 0.5) / 0.25, atol=1e-5)  # type: ignore[operator]


def test_file_voi_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first maps input 10, 8 bits
    item.add_new("LUTData", "US", [0, 50, 100, 200])
    ds = Dataset()
    ds.VOILUTSequence = [item]
    stored = np.array([[5, 10, 11], [12, 13, 99]], dtype=np.uint16)
    image = _image(stored, modality="MR", voi_lut=ds, window=(0.0, 1.0))  # LUT wins
    out = preprocess(image, _same_size(image), PLAIN)
    expected = np.array([[0, 0, 50], [100, 200, 200]]) / 200.0
    np.testing.assert_allclose(out[0], (expected - 0.5) / 0.25, atol=1e-5)


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    image = _image(stored, modality="CR", photometric="MONOCHROME1")
    out = preprocess(image, _same_size(image), PLAIN)[0]
    assert np.unravel_index(out.argmin(), out.shape) == (1, 1)  # brightest stored value
    np.testing.assert_allclose(out, ((1 - stored / 4095.0) - 0.5) / 0.25, atol=1e-5)


def test_real_monochrome1_file_is_inverted() -> None:
    image = read_instance(SAMPLES / "real/CR2_6247.dcm", max_pixels=1 << 20)
    image.window = None
    out = preprocess(image, _same_size(image), PLAIN)[0]
    assert out.flat[image.pixels.argmax()] == pytest.approx(-2.0)
    assert out.flat[image.pixels.argmin()] == pytest.approx(2.0)


def test_constant_image_is_finite() -> None:
    image = _image(np.full((8, 8), 7, dtype=np.int16), modality="MR")
    out = preprocess(image, InputSpec(height=4, width=4, channels=3), PLAIN)
    np.testing.assert_array_equal(out, np.full((3, 4, 4), -2.0, dtype=np.float32))


def test_rgb_is_scaled_by_bit_depth_and_normalised_per_channel() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = _image(rgb, modality="US", photometric="RGB", bits_stored=8)
    recipe = Preprocessing(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    out = preprocess(image, _same_size(image, 3), recipe)
    for c in range(3):
        expected = (rgb[..., c] / 255.0 - recipe.mean[c]) / recipe.std[c]
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


def test_rgb_to_one_channel_uses_luminance() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = _image(rgb, modality="US", photometric="RGB", bits_stored=8)
    out = preprocess(image, _same_size(image, 1), Preprocessing(mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(out[0], rgb @ np.array([0.299, 0.587, 0.114]) / 255.0, atol=1e-5)


def test_grayscale_is_replicated_into_three_channels() -> None:
    image = read_instance(SAMPLES / "real/MR_small.dcm", max_pixels=1 << 20)
    out = preprocess(image, InputSpec(height=32, width=32, channels=3), PLAIN)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_resize_is_antialiased_bilinear() -> None:
    values = np.random.default_rng(2).random((40, 30), dtype=np.float32)
    image = _image(values, modality="MR", window=(0.5, 2.0), window_function="LINEAR_EXACT")
    out = preprocess(image, InputSpec(height=16, width=12), Preprocessing(mean=[0.0], std=[1.0]))
    windowed = torch.from_numpy(np.clip((values - 0.5) / 2.0 + 0.5, 0, 1))[None, None]
    expected = torch.nn.functional.interpolate(
        windowed, size=(16, 12), mode="bilinear", antialias=True, align_corners=False
    )[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6)


def test_mean_std_must_fit_the_channels() -> None:
    image = _image(np.zeros((4, 4), dtype=np.int16))
    with pytest.raises(ModelError, match="preprocessing.mean has 2 values; expected 1 or 3"):
        preprocess(image, InputSpec(height=4, width=4, channels=3),
                   Preprocessing(mean=[0.1, 0.2], std=[1.0]))  # fmt: skip


def test_modality_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [100, 400, 300])
    ds = Dataset()
    ds.ModalityLUTSequence = [item]
    image = _image(np.array([[0, 1, 2, 7]], dtype=np.uint16), modality="OT", modality_lut=ds)
    out = preprocess(image, _same_size(image), Preprocessing(mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(out[0], [[0.0, 1.0, 2 / 3, 2 / 3]], atol=1e-6)


def test_malformed_voi_lut_fails_the_file() -> None:
    item = Dataset()
    item.LUTDescriptor = [2, 0, 9]  # 9 bits per entry is not allowed
    item.add_new("LUTData", "US", [0, 1])
    ds = Dataset()
    ds.VOILUTSequence = [item]
    image = _image(np.zeros((2, 2), dtype=np.uint16), modality="MR", voi_lut=ds)
    with pytest.raises(UndecodablePixels, match="unusable VOI LUT Sequence"):
        preprocess(image, _same_size(image), PLAIN)
