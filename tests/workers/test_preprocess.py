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
from tests.workers.dicom_files import write_float_image, write_image
from workers.decode import DecodedImage, read_instance
from workers.frames import FrameTransform
from workers.header import InstanceMeta
from workers.preprocess import preprocess, windowed

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
PLAIN = Preprocessing(mean=[0.5], std=[0.25])
CT_WINDOW = Preprocessing(windows={"CT": Window(center=40, width=80)}, mean=[0.5], std=[0.25])


def _image(pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
           **fields: object) -> DecodedImage:  # fmt: skip
    """One frame (pixels without the frame axis); rescale/window keywords become its transform."""
    meta = InstanceMeta("1.2.3", "1.2", "1.2.3.4", modality, None, None, photometric, None)
    names = ("rescale_slope", "rescale_intercept", "window", "window_function")
    transform = FrameTransform(**{k: fields.pop(k) for k in names if k in fields})  # type: ignore[arg-type]
    return DecodedImage(meta=meta, pixels=pixels[np.newaxis], photometric=photometric, notes=[],
                        transforms=[transform], **fields)  # type: ignore[arg-type]  # fmt: skip


def _same_size(image: DecodedImage, channels: Literal[1, 3] = 1) -> InputSpec:
    height, width = image.pixels.shape[1:3]
    return InputSpec(height=height, width=width, channels=channels)


def _one(image: DecodedImage, spec: InputSpec, recipe: Preprocessing) -> np.ndarray:
    """The single (C, H, W) input preprocess makes of a one-frame image."""
    out = preprocess(image, spec, recipe)
    assert out.shape == (1, spec.channels, spec.height, spec.width)
    return out[0]


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
    assert out.shape == (1, channels, 48, 40)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.isfinite(out).all()
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # [0, 1] normalised by 0.5/0.25


def test_card_window_matches_the_standard_formula() -> None:
    stored = np.array([[0, 1000, 1024, 1030], [1063, 1064, 1070, 1102], [1103, 1104, 3000, 500]],
                      dtype=np.int16)  # fmt: skip
    image = _image(stored, rescale_intercept=-1024.0, window=(500.0, 2000.0))  # card wins
    out = _one(image, _same_size(image), CT_WINDOW)
    expected = (_reference_window(stored - 1024.0, 40, 80) - 0.5) / 0.25
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_file_window_is_used_without_a_card_window() -> None:
    stored = np.arange(0, 2400, 100, dtype=np.uint16).reshape(4, 6)
    image = _image(stored, modality="MR", window=(600.0, 1600.0))
    out = _one(image, _same_size(image), CT_WINDOW)
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
    out = _one(image, _same_size(image), PLAIN)
    np.testing.assert_allclose(out[0], (reference(stored.astype(float)) - 0.5) / 0.25, atol=1e-5)  # type: ignore[operator]


def test_a_one_wide_sigmoid_window_saturates_without_overflow() -> None:
    """Width 1: exp's argument reaches 4 x 1200 far from the centre, past float32's range;
    the values saturate at 0 and 1, with no overflow warning (the suite makes it an error)."""
    stored = np.arange(0, 2400, 100, dtype=np.uint16).reshape(4, 6)
    image = _image(stored, modality="MR", window=(1200.0, 1.0), window_function="SIGMOID")
    out = _one(image, _same_size(image), PLAIN)
    expected = np.where(stored > 1200, 1.0, np.where(stored < 1200, 0.0, 0.5))
    np.testing.assert_allclose(out[0], (expected - 0.5) / 0.25, atol=1e-5)


def test_file_voi_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first maps input 10, 8 bits
    item.add_new("LUTData", "US", [0, 50, 100, 200])
    ds = Dataset()
    ds.VOILUTSequence = [item]
    stored = np.array([[5, 10, 11], [12, 13, 99]], dtype=np.uint16)
    image = _image(stored, modality="MR", voi_lut=ds, window=(0.0, 1.0))  # LUT wins
    out = _one(image, _same_size(image), PLAIN)
    expected = np.array([[0, 0, 50], [100, 200, 200]]) / 200.0
    np.testing.assert_allclose(out[0], (expected - 0.5) / 0.25, atol=1e-5)


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    image = _image(stored, modality="CR", photometric="MONOCHROME1")
    out = _one(image, _same_size(image), PLAIN)[0]
    assert np.unravel_index(out.argmin(), out.shape) == (1, 1)  # brightest stored value
    np.testing.assert_allclose(out, ((1 - stored / 4095.0) - 0.5) / 0.25, atol=1e-5)


def test_real_monochrome1_file_is_inverted() -> None:
    image = read_instance(SAMPLES / "real/CR2_6247.dcm", max_pixels=1 << 20)
    image.transforms = [FrameTransform()]  # no window: min-max
    out = _one(image, _same_size(image), PLAIN)[0]
    assert out.flat[image.pixels[0].argmax()] == pytest.approx(-2.0)
    assert out.flat[image.pixels[0].argmin()] == pytest.approx(2.0)


def test_constant_image_is_finite() -> None:
    image = _image(np.full((8, 8), 7, dtype=np.int16), modality="MR")
    out = _one(image, InputSpec(height=4, width=4, channels=3), PLAIN)
    np.testing.assert_array_equal(out, np.full((3, 4, 4), -2.0, dtype=np.float32))


def test_rgb_is_scaled_by_bit_depth_and_normalised_per_channel() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = _image(rgb, modality="US", photometric="RGB", bits_stored=8)
    recipe = Preprocessing(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    out = _one(image, _same_size(image, 3), recipe)
    for c in range(3):
        expected = (rgb[..., c] / 255.0 - recipe.mean[c]) / recipe.std[c]
        np.testing.assert_allclose(out[c], expected, atol=1e-5)


def test_rgb_to_one_channel_uses_luminance() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = _image(rgb, modality="US", photometric="RGB", bits_stored=8)
    out = _one(image, _same_size(image, 1), Preprocessing(mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(out[0], rgb @ np.array([0.299, 0.587, 0.114]) / 255.0, atol=1e-5)


def test_grayscale_is_replicated_into_three_channels() -> None:
    image = read_instance(SAMPLES / "real/MR_small.dcm", max_pixels=1 << 20)
    out = _one(image, InputSpec(height=32, width=32, channels=3), PLAIN)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_resize_is_antialiased_bilinear() -> None:
    values = np.random.default_rng(2).random((40, 30), dtype=np.float32)
    image = _image(values, modality="MR", window=(0.5, 2.0), window_function="LINEAR_EXACT")
    out = _one(image, InputSpec(height=16, width=12), Preprocessing(mean=[0.0], std=[1.0]))
    windowed = torch.from_numpy(np.clip((values - 0.5) / 2.0 + 0.5, 0, 1))[None, None]
    expected = torch.nn.functional.interpolate(
        windowed, size=(16, 12), mode="bilinear", antialias=True, align_corners=False
    )[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6)


def test_mean_std_must_fit_the_channels() -> None:
    image = _image(np.zeros((4, 4), dtype=np.int16))
    with pytest.raises(ModelError, match="preprocessing.mean has 2 values; expected 1 or 3"):
        preprocess(image, InputSpec(height=4, width=4, channels=3),
                   Preprocessing(mean=[0.1, 0.2], std=[1.0, 1.0]))  # fmt: skip


def test_modality_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [100, 400, 300])
    ds = Dataset()
    ds.ModalityLUTSequence = [item]
    image = _image(np.array([[0, 1, 2, 7]], dtype=np.uint16), modality="OT", modality_lut=ds)
    out = _one(image, _same_size(image), Preprocessing(mean=[0.0], std=[1.0]))
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


HEAD_CT = Preprocessing(
    channel_windows=[Window(center=40, width=80), Window(center=80, width=200),
                     Window(center=600, width=2800)],
    mean=[0.0], std=[1.0],
)  # fmt: skip


def test_channel_windows_match_a_hand_computed_reference() -> None:
    hu = np.array([[-1024, 0, 20, 40], [80, 200, 1000, 3000]])
    image = _image((hu + 1024).astype(np.int16), rescale_intercept=-1024.0, window=(500.0, 2000.0))
    out = windowed(image, HEAD_CT)
    # (HU - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1] (PS3.3 C.11.2.1.2.1), by hand:
    brain = [[0.0, 0.0, 0.253165, 0.506329], [1.0, 1.0, 1.0, 1.0]]  # 40/80
    subdural = [[0.0, 0.100503, 0.201005, 0.301508], [0.502513, 1.0, 1.0, 1.0]]  # 80/200
    bone = [[0.0, 0.285816, 0.292962, 0.300107], [0.314398, 0.357270, 0.643087, 1.0]]  # 600/2800
    np.testing.assert_allclose(out, np.array([brain, subdural, bone]), atol=1e-6)
    model_input = _one(image, _same_size(image, 3), HEAD_CT)
    np.testing.assert_allclose(model_input, out, atol=1e-6)


def test_channel_windows_invert_monochrome1() -> None:
    hu = np.array([[0, 40, 80]], dtype=np.int16)
    image = _image(hu, photometric="MONOCHROME1")
    out = windowed(image, HEAD_CT)
    np.testing.assert_allclose(out[0], [[1.0, 1 - 0.506329, 0.0]], atol=1e-6)


def test_channel_windows_do_not_apply_to_colour() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    image = _image(rgb, modality="CT", photometric="RGB", bits_stored=8)
    np.testing.assert_allclose(windowed(image, HEAD_CT), np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)


def test_channel_windows_must_fit_the_model() -> None:
    image = _image(np.zeros((4, 4), dtype=np.int16))
    with pytest.raises(ModelError, match="channel_windows gives 3 channels for a 1-channel model"):
        preprocess(image, InputSpec(height=4, width=4, channels=1), HEAD_CT)


def test_every_frame_becomes_an_input_in_order() -> None:
    path = SAMPLES / "real/rtdose.dcm"
    spec = InputSpec(height=8, width=8, channels=3)
    every = preprocess(read_instance(path, max_pixels=1 << 20, frame="all"), spec, PLAIN)
    assert every.shape == (15, 3, 8, 8) and every.dtype == np.float32 and every.flags.c_contiguous
    first = preprocess(read_instance(path, max_pixels=1 << 20, frame="first"), spec, PLAIN)
    middle = preprocess(read_instance(path, max_pixels=1 << 20, frame="middle"), spec, PLAIN)
    np.testing.assert_array_equal(every[:1], first)
    np.testing.assert_array_equal(every[7:8], middle)
    assert not np.array_equal(every[0], every[7])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_pixel_data_is_min_maxed_or_card_windowed(tmp_path: Path, dtype: str) -> None:
    values = np.linspace(-100.0, 300.0, 8 * 5, dtype=dtype).reshape(8, 5)
    values[3, 3] = np.inf  # not finite: counted as 0
    image = read_instance(write_float_image(tmp_path / "f.dcm", values, modality="PT"), max_pixels=1 << 20)
    finite = np.where(np.isfinite(values), values, 0.0)
    plain = _one(image, _same_size(image), Preprocessing(mean=[0.0], std=[1.0]))
    np.testing.assert_allclose(plain[0], (finite + 100) / 400, atol=1e-6)
    card = Preprocessing(windows={"PT": Window(center=100, width=201)}, mean=[0.0], std=[1.0])
    windowed_card = _one(image, _same_size(image), card)
    np.testing.assert_allclose(windowed_card[0], _reference_window(finite, 100, 201), atol=1e-6)


def _write_cr(path: Path, stored: np.ndarray) -> DecodedImage:
    write_image(path, stored, photometric="MONOCHROME1", bits_stored=12, modality="CR")
    return read_instance(path, max_pixels=1 << 28)


def test_large_cr_is_resized_with_antialiasing(tmp_path: Path) -> None:
    rows, cols = 2500, 2048
    y, x = np.mgrid[0:rows, 0:cols]
    stored = (2000 + 1500 * np.sin(x / 37.0) * np.cos(y / 53.0)).astype(np.uint16)
    stored[::2, ::3] = 4095  # fine detail that bilinear sampling alone would alias
    image = _write_cr(tmp_path / "cr.dcm", stored)
    assert image.pixels.shape == (1, rows, cols) and image.photometric == "MONOCHROME1"
    out = _one(image, InputSpec(height=224, width=224), Preprocessing(mean=[0.0], std=[1.0]))
    displayed = 1.0 - (stored - stored.min()) / float(stored.max() - stored.min())  # float64
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(displayed)[None, None], size=(224, 224), mode="bilinear",
        antialias=True, align_corners=False,
    )[0].numpy()  # fmt: skip
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_high_frequency_checkerboard_averages_instead_of_aliasing(tmp_path: Path) -> None:
    checkerboard = (np.indices((2500, 2048)).sum(axis=0) % 2 * 4095).astype(np.uint16)
    image = _write_cr(tmp_path / "checker.dcm", checkerboard)
    out = _one(image, InputSpec(height=224, width=224), Preprocessing(mean=[0.0], std=[1.0]))
    assert abs(float(out.mean()) - 0.5) < 1e-3
    assert float(np.abs(out - 0.5).max()) < 0.005  # plain bilinear sampling: 0.42
