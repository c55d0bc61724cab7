"""workers.device_prep: the decode side and the batched device side against the reference.

The reference is :func:`workers.preprocess.preprocess`. ``to_batch(raw_frames(...))``
without decimation (what an accelerator always runs, and the CPU below 2048x2048) is
the same arithmetic, and must agree to float32 rounding (:data:`EXACT`); the CPU's
decimation of large frames within :data:`workers.device_prep.TOLERANCE`.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileDataset

import workers.device_prep
from radq.errors import InstanceError, ModelError, UndecodablePixels
from radq.model_card import FramePolicy, InputSpec, Preprocessing, Window
from radq.settings import BUNDLED_MODEL_DIR
from tests.workers.dicom_files import lut_sequence, write_image
from workers.decode import DecodedImage, read_instance
from workers.device_prep import (
    DECIMATE_PIXELS,
    TOLERANCE,
    RawFrame,
    finish_on_host,
    raw_frames,
    resize,
    to_batch,
    widen,
)
from workers.frames import FrameTransform
from workers.header import InstanceMeta
from workers.preprocess import preprocess

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"  # ../shared/data beside the checkout
CPU = torch.device("cpu")
MAX_PIXELS = 1 << 28
EXACT = 1e-5
"""Without decimation: float32 rounding alone (measured at most 7.2e-7, normalised units)."""
MEAN_TOLERANCE = 0.015
"""Mean difference with decimation over a frame: the worst, a 2500x2048 CR of fine
line pairs, measured 0.0123."""


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Both sides on one torch thread, as a CPU worker's decode processes run them. With
    two, torch's CPU resize once in about 50 runs returned the half of the rows that the
    calling thread computes 3e-5 off (seen after a Grad-CAM test in the same process; on
    one thread, 0 in 90 runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _card(name: str) -> tuple[InputSpec, Preprocessing]:
    card = json.loads((BUNDLED_MODEL_DIR / name / "model.json").read_text())
    return InputSpec(**card["input"]), Preprocessing(**card["preprocessing"])


RECIPES: dict[str, tuple[InputSpec, Preprocessing]] = {
    name: _card(name)
    for name in ("chexnet-densenet121", "headct-resnet18", "radq-smoke", "us-abdomen-smallcnn")
}
RECIPES["min-max, every frame"] = (
    InputSpec(height=96, width=80, channels=1),
    Preprocessing(mean=[0.5], std=[0.25], frame="all"),
)


def _changed(name: str, path: Path, elements: dict[str, object]) -> Path:
    """A shared real file re-written at ``path`` with ``elements`` (None deletes one)."""
    ds: FileDataset = pydicom.dcmread(SHARED / "real" / name)
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with warnings.catch_warnings():  # invalid values are the point of some
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


_RAMP = (np.sqrt(np.arange(2048) / 2047.0) * 4000 + 50).astype(np.uint16).tolist()
_HU = (np.arange(4096) * 3 % 65536).tolist()
SYNTHETIC: dict[str, tuple[str, dict[str, object]]] = {
    "VOI LUT Sequence": ("MR_small.dcm", {"VOILUTSequence": lut_sequence([2048, 100, 16], _RAMP)}),
    "Modality LUT Sequence": ("CT_small.dcm", {
        "ModalityLUTSequence": lut_sequence([4096, 0, 16], _HU, ModalityLUTType="HU"),
        "RescaleSlope": None, "RescaleIntercept": None,
    }),
    "SIGMOID": ("MR_small.dcm", {"VOILUTFunction": "SIGMOID"}),
    "LINEAR_EXACT": ("MR_small.dcm", {"VOILUTFunction": "LINEAR_EXACT"}),
    "window width 1": ("MR_small.dcm", {"WindowCenter": 600, "WindowWidth": 1}),
    "MONOCHROME1 with a window": ("CR2_6247.dcm", {"WindowCenter": 2000, "WindowWidth": 1500}),
    "rescale slope -3": ("CT_small.dcm", {"RescaleSlope": -3, "RescaleIntercept": 100}),
    "rescale slope 0.25": ("MR_small.dcm", {"RescaleSlope": 0.25, "RescaleIntercept": -7.5}),
}  # fmt: skip
"""What the real files lack: LUT sequences, VOI LUT functions, thresholds, negative slopes."""


def _pydicom_files() -> list[Path]:
    """pydicom's bundled files, less those already among the shared ones."""
    shared = {p.name for p in (SHARED / "real").glob("*.dcm")}
    return sorted(p for p in Path(DATA_ROOT, "test_files").glob("*.dcm") if p.name not in shared)


FILES = [
    *(pytest.param(p, id=f"shared/{p.name}") for p in sorted((SHARED / "real").glob("*.dcm"))),
    *(pytest.param(p, id=f"pydicom/{p.name}") for p in _pydicom_files()),
    *(pytest.param(name, id=f"synthetic/{name}") for name in SYNTHETIC),
]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@cache
def _read(path: Path, frame: FramePolicy) -> DecodedImage | str:
    try:
        with warnings.catch_warnings():  # pydicom's warnings on tolerated files: not ours
            warnings.simplefilter("ignore")
            return read_instance(path, max_pixels=MAX_PIXELS, frame=frame)
    except InstanceError as exc:
        return exc.reason


def _image(case: Path | str, folder: Path, frame: FramePolicy) -> DecodedImage:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    path = case if isinstance(case, Path) else folder / f"{case}.dcm"
    if isinstance(case, str) and not path.exists():
        name, elements = SYNTHETIC[case]
        _changed(name, path.with_suffix(".tmp"), elements).rename(path)  # whole, or not there
    image = _read(path, frame)
    if isinstance(image, str):
        pytest.skip(f"not decodable: {image}")
    return image


def _outcome(make: Callable[[], np.ndarray]) -> np.ndarray | tuple[type[Exception], str]:
    try:
        return make()
    except (InstanceError, ModelError) as exc:
        return type(exc), str(exc)


def _deviation(
    image: DecodedImage, spec: InputSpec, recipe: Preprocessing, *, decimate: bool | None = None
) -> np.ndarray:
    """|to_batch(raw_frames) - preprocess| per value, after checking that both fail alike."""
    expected = _outcome(lambda: preprocess(image, spec, recipe))
    got = _outcome(
        lambda: to_batch(raw_frames(image, spec, recipe), spec, recipe, CPU, decimate=decimate).numpy()
    )
    if isinstance(expected, tuple) or isinstance(got, tuple):
        assert got == expected  # the same exception type and reason
        return np.zeros(1)
    assert got.shape == expected.shape and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(np.isnan(got), np.isnan(expected))  # float colour may carry NaN
    return np.abs(np.nan_to_num(got) - np.nan_to_num(expected))


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("case", FILES)
def test_real_files_match_the_reference(case: Path | str, recipe: str, synthetic_dir: Path) -> None:
    spec, prep = RECIPES[recipe]
    image = _image(case, synthetic_dir, prep.frame)
    assert np.prod(image.pixels.shape[1:3]) < DECIMATE_PIXELS  # the CPU's default: no decimation
    assert _deviation(image, spec, prep).max() <= EXACT


@pytest.mark.parametrize("case", [p for p in FILES if p.id in {
    "shared/CT_small.dcm", "shared/MR_small_expb.dcm", "shared/CR2_6247.dcm", "shared/rtdose.dcm",
    "shared/examples_rgb_color.dcm", "pydicom/SC_rgb_rle_16bit.dcm",
}])  # fmt: skip
def test_fast_path_ships_the_decoded_integers(case: Path, synthetic_dir: Path) -> None:
    image = _image(case, synthetic_dir, "middle")
    spec, recipe = RECIPES["radq-smoke"]
    (frame,) = raw_frames(image, spec, recipe)
    assert not frame.windowed and frame.pixels.dtype.kind in "iu"
    assert frame.pixels.dtype.itemsize == image.pixels.dtype.itemsize
    assert np.shares_memory(frame.pixels, image.pixels)  # not even an integer copy
    assert frame.invert == (image.photometric == "MONOCHROME1")
    assert frame.colour == (image.pixels.ndim == 4)


@pytest.mark.parametrize("name", ["VOI LUT Sequence", "Modality LUT Sequence"])
def test_lut_sequences_fall_back_to_the_reference_windowing(name: str, synthetic_dir: Path) -> None:
    image = _image(name, synthetic_dir, "middle")
    spec, recipe = RECIPES["us-abdomen-smallcnn"]  # no card window: the file's LUT applies
    (frame,) = raw_frames(image, spec, recipe)
    assert frame.windowed and frame.pixels.dtype == np.float32 and frame.pixels.shape[0] == 1
    assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0


def test_non_finite_float_pixels_fall_back(tmp_path: Path) -> None:
    values = np.linspace(-100.0, 300.0, 8 * 5, dtype=np.float32).reshape(8, 5)
    spec = InputSpec(height=8, width=5)
    recipe = Preprocessing(mean=[0.0], std=[1.0])
    assert not raw_frames(_synthetic_image(values, modality="PT"), spec, recipe)[0].windowed
    values[3, 3] = np.inf  # counted as 0 by the reference
    image = _synthetic_image(values, modality="PT")
    (frame,) = raw_frames(image, spec, recipe)
    assert frame.windowed
    np.testing.assert_allclose(
        to_batch([frame], spec, recipe, CPU)[0].numpy(), preprocess(image, spec, recipe)[0]
    )


def _generated_cr(folder: Path, fine_detail: bool, **elements: object) -> DecodedImage:
    """A 2500x2048 12-bit MONOCHROME1 CR: smooth anatomy-like shading, optionally line pairs."""
    rows, cols = 2500, 2048
    y, x = np.mgrid[0:rows, 0:cols]
    stored = 2000 + 1500 * np.sin(x / 37.0) * np.cos(y / 53.0)
    if fine_detail:  # period 2 x 3 pixels: what a box filter and the reference's filter treat apart
        stored[::2, ::3] = 4095
    else:
        stored += np.random.default_rng(0).normal(0, 40, size=stored.shape)  # quantum noise
    path = folder / f"cr-{fine_detail}-{len(elements)}.dcm"
    write_image(path, np.clip(stored, 0, 4095).astype(np.uint16), photometric="MONOCHROME1",
                bits_stored=12, modality="CR", **elements)  # fmt: skip
    return read_instance(path, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("fine_detail", [False, True], ids=["smooth", "line_pairs"])
@pytest.mark.parametrize("recipe", ["chexnet-densenet121", "radq-smoke", "min-max, every frame"])
def test_large_cr_matches_the_reference(tmp_path: Path, recipe: str, fine_detail: bool) -> None:
    image = _generated_cr(tmp_path, fine_detail, WindowCenter=2000, WindowWidth=3000)
    spec, prep = RECIPES[recipe]
    (frame,) = raw_frames(image, spec, prep)
    assert frame.pixels.dtype == np.uint16 and frame.invert and frame.windows == ((2000.0, 3000.0, "LINEAR"),)
    assert _deviation(image, spec, prep, decimate=False).max() <= EXACT
    decimated = _deviation(image, spec, prep)  # the CPU's default for this size
    # Decimation is the whole difference: for the smooth image at most 0.026, mean 0.008;
    # for the line pairs, the worst case, 0.053 and 0.012 (chexnet: std 0.229).
    assert decimated.max() <= TOLERANCE and decimated.mean() <= MEAN_TOLERANCE


def test_the_cpu_decimates_large_frames_alone(tmp_path: Path) -> None:
    spec, recipe = RECIPES["chexnet-densenet121"]
    large = raw_frames(_generated_cr(tmp_path, False), spec, recipe)
    default = to_batch(large, spec, recipe, CPU)
    assert torch.equal(default, to_batch(large, spec, recipe, CPU, decimate=True))
    assert not torch.equal(default, to_batch(large, spec, recipe, CPU, decimate=False))
    small = [RawFrame(np.random.default_rng(0).random((1, 2040, 2040), dtype=np.float32), windowed=True)]
    default = to_batch(small, spec, recipe, CPU)
    assert torch.equal(default, to_batch(small, spec, recipe, CPU, decimate=False))
    assert not torch.equal(default, to_batch(small, spec, recipe, CPU, decimate=True))


def test_decimated_resize_keeps_the_geometry() -> None:
    """An edge lands where the reference puts it, also when blocks do not divide the size.

    Resizing the pooled image to the target size instead (its extent then rounded to
    whole blocks, sampled from shifted positions) differs by 0.063 to 0.11 at most,
    6.7e-4 to 1.1e-3 on average.
    """
    for rows, cols in ((2500, 2048), (2501, 2047), (1000, 3000), (2999, 2999)):
        planes = torch.zeros(1, 1, rows, cols)
        planes[..., rows // 3 :, :] = 1.0
        planes[..., :, cols // 2 :] = 1.0 - planes[..., :, cols // 2 :]
        exact = resize(planes, 224, 200, decimate=False)
        decimated = resize(planes, 224, 200, decimate=True)
        assert decimated.shape == exact.shape == (1, 1, 224, 200)
        assert float((decimated - exact).abs().max()) < 0.04  # measured at most 0.033
        assert float((decimated - exact).abs().mean()) < 4e-4  # and 2.7e-4


def _synthetic_image(pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                     transform: FrameTransform | None = None, **fields: object) -> DecodedImage:  # fmt: skip
    """Frames (F, H, W[, 3]) or one frame (H, W) with no file behind them."""
    meta = InstanceMeta("1.2.3", "1.2", "1.2.3.4", modality, None, None, photometric, None)
    frames = (
        pixels if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] != 3) else pixels[np.newaxis]
    )
    return DecodedImage(meta=meta, pixels=frames, photometric=photometric, notes=[],
                        transforms=[transform or FrameTransform()], **fields)  # type: ignore[arg-type]  # fmt: skip


def test_a_mixed_batch_keeps_its_order(synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes, dtypes, colour, fallbacks and windows interleaved; small chunks to split groups."""
    rng = np.random.default_rng(7)
    images = [
        _image(SHARED / "real/CT_small.dcm", synthetic_dir, "middle"),  # int16, card window
        _image(SHARED / "real/MR_small.dcm", synthetic_dir, "middle"),  # int16, file window
        _image(SHARED / "real/CR2_6247.dcm", synthetic_dir, "middle"),  # uint16 MONOCHROME1
        _image(SHARED / "real/examples_rgb_color.dcm", synthetic_dir, "middle"),  # uint8 colour
        _image(SHARED / "real/rtdose.dcm", synthetic_dir, "all"),  # 15 frames of uint32
        _image("VOI LUT Sequence", synthetic_dir, "middle"),  # fallback
        _image("SIGMOID", synthetic_dir, "middle"),
        _image("window width 1", synthetic_dir, "middle"),
        _synthetic_image(rng.integers(0, 4096, (3, 64, 64), dtype=np.uint16), modality="MR",
                         photometric="MONOCHROME1", transform=FrameTransform(2.0, -5.0, (3000.0, 4000.0))),
        _synthetic_image(np.full((64, 64), 9, dtype=np.int16), modality="OT"),  # constant: zeros
        _synthetic_image(rng.integers(-128, 128, (64, 64), dtype=np.int8), modality="OT"),
    ]  # fmt: skip
    monkeypatch.setattr(workers.device_prep, "CPU_CHUNK_VALUES", 3 * 64 * 64)
    for recipe in ("radq-smoke", "headct-resnet18", "chexnet-densenet121"):
        spec, prep = RECIPES[recipe]
        rows = [(i, f) for i, image in enumerate(images) for f in raw_frames(image, spec, prep)]
        expected = [row for image in images for row in preprocess(image, spec, prep)]
        order = rng.permutation(len(rows))
        batch = to_batch([rows[i][1] for i in order], spec, prep, CPU).numpy()
        assert batch.shape == (len(rows), spec.channels, spec.height, spec.width)
        for position, i in enumerate(order):
            np.testing.assert_allclose(batch[position], expected[i], rtol=0, atol=EXACT,
                                       err_msg=f"{recipe}: row {i} of image {rows[i][0]}")  # fmt: skip


def test_frames_survive_pickling(synthetic_dir: Path) -> None:
    spec, recipe = RECIPES["headct-resnet18"]
    images = [
        _image(SHARED / "real/CT_small.dcm", synthetic_dir, "middle"),
        _image("VOI LUT Sequence", synthetic_dir, "middle"),
    ]
    frames = [f for image in images for f in raw_frames(image, spec, recipe)]
    copies: list[RawFrame] = pickle.loads(pickle.dumps(frames))
    assert [f.pixels.dtype for f in copies] == [f.pixels.dtype for f in frames]
    torch.testing.assert_close(to_batch(copies, spec, recipe, CPU), to_batch(frames, spec, recipe, CPU))


def test_empty_batch() -> None:
    spec, recipe = RECIPES["radq-smoke"]
    assert to_batch([], spec, recipe, CPU).shape == (0, 1, 224, 224)


def test_uint16_crosses_to_an_accelerator_as_int16_bits() -> None:
    values = np.array([[0, 1, 32767], [32768, 40000, 65535]], dtype=np.uint16)
    raw = torch.from_numpy(values.view(np.int16))  # what _upload sends off the CPU
    widened = widen(raw, unsigned16=True)
    assert widened.dtype == torch.float32
    np.testing.assert_array_equal(widened.numpy(), values.astype(np.float32))


HEAD_CT = Preprocessing(channel_windows=[Window(center=40, width=80)] * 3, mean=[0.0], std=[1.0])
BAD: dict[str, tuple[Callable[[], DecodedImage], InputSpec, Preprocessing, type[Exception], str]] = {
    "mean does not fit": (
        lambda: _synthetic_image(np.zeros((4, 4), np.int16)), InputSpec(height=4, width=4, channels=3),
        Preprocessing(mean=[0.1, 0.2], std=[1.0]), ModelError, "preprocessing.mean has 2 values",
    ),
    "std has a zero": (
        lambda: _synthetic_image(np.zeros((4, 4), np.int16)), InputSpec(height=4, width=4),
        Preprocessing.model_construct(mean=[0.5], std=[0.0], windows={}, channel_windows=[]),
        ModelError, "must not contain 0",
    ),
    "channel windows do not fit": (
        lambda: _synthetic_image(np.zeros((4, 4), np.int16)), InputSpec(height=4, width=4, channels=1),
        HEAD_CT, ModelError, "channel_windows gives 3 channels for a 1-channel model",
    ),
    "rescale past float32": (
        lambda: _synthetic_image(np.array([[0, 4095]], np.uint16), transform=FrameTransform(1e37, 0.0)),
        InputSpec(height=4, width=4), Preprocessing(), UndecodablePixels, "pixel values out of range",
    ),
    "rescale to infinity": (
        lambda: _synthetic_image(np.array([[-3, 4095]], np.int16), transform=FrameTransform(3e37, -8e37)),
        InputSpec(height=4, width=4), Preprocessing(), UndecodablePixels, "pixel values out of range",
    ),
    "VOI LUT with 9-bit entries": (
        lambda: _synthetic_image(np.zeros((2, 2), np.uint16), modality="MR",
                                 voi_lut=_dataset(VOILUTSequence=lut_sequence([2, 0, 9], [0, 1]))),
        InputSpec(height=2, width=2), Preprocessing(), UndecodablePixels, "unusable VOI LUT Sequence",
    ),
    "Modality LUT shorter than declared": (
        lambda: _synthetic_image(np.zeros((2, 2), np.uint16), modality="MR",
                                 modality_lut=_dataset(ModalityLUTSequence=lut_sequence([4096, 0, 16], [7]))),
        InputSpec(height=2, width=2), Preprocessing(), UndecodablePixels, "unusable Modality LUT Sequence",
    ),
}  # fmt: skip


def _dataset(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_the_reference_reason(case: str) -> None:
    make, spec, recipe, error, reason = BAD[case]
    with pytest.raises(error, match=reason) as expected:
        preprocess(make(), spec, recipe)
    with pytest.raises(error) as got:
        raw_frames(make(), spec, recipe)
    assert str(got.value) == str(expected.value)


MUTATIONS: dict[str, dict[str, object]] = {
    "slope 1e30": {"RescaleSlope": "1e30"},
    "slope 5e34 (values past the float32 limit)": {"RescaleSlope": "5e34"},
    "slope -3e35 (values overflow)": {"RescaleSlope": "-3e35"},
    "slope 3.4e38": {"RescaleSlope": "3.4e38"},
    "slope 1e-30": {"RescaleSlope": "1e-30"},
    "intercept 1e38": {"RescaleIntercept": "1e38"},
    "intercept -1e308": {"RescaleIntercept": "-1e308"},
    "window width 1e-30": {"WindowWidth": "1e-30"},
    "window width 1e308": {"WindowWidth": "1e308"},
    "window center -1e308": {"WindowCenter": "-1e308"},
    "bogus VOI LUT function": {"VOILUTFunction": "BOGUS"},
    "VOI LUT declares more than it holds": {"VOILUTSequence": lut_sequence([0, 0, 16], [0, 1])},
    "VOI LUT without data": {"VOILUTSequence": lut_sequence([4, 65535, 16], None)},
    "Modality LUT of 0 bits": {"ModalityLUTSequence": lut_sequence([0, 0, 0], [], ModalityLUTType="HU")},
}
"""Values hostile files carry (as in test_hostile_input) that still decode."""


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "CR2_6247.dcm"])
@pytest.mark.parametrize("recipe", ["radq-smoke", "us-abdomen-smallcnn"])
def test_hostile_values_fail_or_match_alike(
    name: str, mutation: str, recipe: str, synthetic_dir: Path
) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    path = _changed(name, synthetic_dir / f"{name}-{mutation}.dcm", MUTATIONS[mutation])
    image = _read(path, RECIPES[recipe][1].frame)
    if isinstance(image, str):
        pytest.skip(f"not decodable: {image}")
    spec, prep = RECIPES[recipe]
    assert _deviation(image, spec, prep, decimate=False).max() <= EXACT


@pytest.mark.parametrize("channels", [1, 3])
def test_colour_to_luminance_or_three_channels(channels: Literal[1, 3]) -> None:
    rgb = np.random.default_rng(1).integers(0, 4096, size=(2, 40, 30, 3), dtype=np.uint16)
    image = _synthetic_image(rgb, modality="US", photometric="RGB", bits_stored=12)
    spec = InputSpec(height=16, width=12, channels=channels)
    recipe = Preprocessing(mean=[0.5], std=[0.25])
    frames = raw_frames(image, spec, recipe)
    assert [f.colour and f.scale == 4095.0 for f in frames] == [True, True]
    np.testing.assert_allclose(to_batch(frames, spec, recipe, CPU).numpy(), preprocess(image, spec, recipe),
                               rtol=0, atol=EXACT)  # fmt: skip


def test_decode_side_never_imports_torch() -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from radq.model_card import InputSpec, Preprocessing\n"
        "from workers.decode import read_instance\n"
        "from workers.device_prep import raw_frames\n"
        f"image = read_instance(Path({str(SHARED / 'real/CT_small.dcm')!r}), max_pixels=1 << 20)\n"
        "raw_frames(image, InputSpec(height=8, width=8), Preprocessing())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("recipe", ["chexnet-densenet121", "radq-smoke"])
def test_finished_on_the_host_is_the_batch_the_inference_thread_makes(tmp_path: Path, recipe: str) -> None:
    """What a CPU worker's decode processes send (RADQ_PREPROCESS_IN_DECODERS) is the very
    input the inference thread would have made, also mixed with unfinished frames."""
    spec, prep = RECIPES[recipe]
    cr = raw_frames(_generated_cr(tmp_path, False, WindowCenter=2000, WindowWidth=3000), spec, prep)
    ct = raw_frames(_image(SHARED / "real" / "CT_small.dcm", tmp_path, prep.frame), spec, prep)
    finished = finish_on_host(cr, spec, prep)
    assert all(f.ready and f.pixels.shape == (spec.channels, spec.height, spec.width) for f in finished)
    assert sum(f.pixels.nbytes for f in finished) < sum(f.pixels.nbytes for f in cr) / 10
    finished = pickle.loads(pickle.dumps(finished, protocol=5))  # as it crosses from the process
    expected = to_batch([*cr, *ct], spec, prep, CPU)
    assert torch.equal(to_batch([*finished, *ct], spec, prep, CPU), expected)


def test_a_cuda_worker_s_decoders_finish_only_frames_above_the_threshold(tmp_path: Path) -> None:
    """RADQ_HOST_PREPROCESS_PIXELS: a large CR leaves its decode process finished (small),
    a CT slice below the threshold raw, and the batch is the one the device would make."""
    from db.status import StorageKind
    from db.work import Claimed
    from radq.model_card import discover_cards
    from workers.prepare import load

    _, card = discover_cards(BUNDLED_MODEL_DIR)["radq-smoke"]
    _generated_cr(tmp_path, False, WindowCenter=2000, WindowWidth=3000)
    files = [tmp_path / "cr-False-2.dcm", SHARED / "real" / "CT_small.dcm"]
    frames = []
    for finish_pixels in (None, 1 << 20):
        loaded = [
            load(
                Claimed(i, "job", f.name, StorageKind.PATH, str(f), 0),
                f,
                b"k" * 32,
                [card],
                MAX_PIXELS,
                finish_pixels=finish_pixels,
            )  # fmt: skip
            for i, f in enumerate(files)
        ]
        assert all(not p.status for p in loaded), [p.reason for p in loaded]
        frames.append([p.inputs[card.name][0] for p in loaded])
    (raw_cr, raw_ct), (cr, ct) = frames
    assert cr.ready and cr.pixels.nbytes < raw_cr.pixels.nbytes / 10
    assert not ct.ready and np.array_equal(ct.pixels, raw_ct.pixels)
    spec, prep = card.input, card.preprocessing
    assert torch.equal(to_batch([cr, ct], spec, prep, CPU), to_batch([raw_cr, raw_ct], spec, prep, CPU))


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    "windows",
    [
        ((40.0, 80.0, "LINEAR"),),
        ((40.0, 80.0, "LINEAR"), (600.0, 3.0, "LINEAR_EXACT"), (300.0, 8.0, "LINEAR")),
    ],
)
def test_folded_windows_keep_float32_rounding_off_narrow_windows(
    invert: bool, windows: tuple[tuple[float, float, str], ...]
) -> None:
    # Stored values around a brain window (HU 0-80 at intercept -1024) and narrow windows
    # at 600 and 300: folded into x * scale + offset, the two terms are ~300-850 for the
    # narrow ones, where float32 keeps ~6e-5 of rounding; radq's folding must not.
    stored = np.arange(900, 1800, dtype=np.int16).reshape(30, 30)
    frame = RawFrame(stored, slope=1.0, intercept=-1024.0, windows=windows, invert=invert)
    spec = InputSpec(height=30, width=30, channels=len(windows))
    got = to_batch([frame], spec, Preprocessing(mean=[0.0], std=[1.0]), CPU).numpy()[0]
    hu = stored.astype(np.float64) - 1024.0
    expected = []
    for center, width, function in windows:
        if function == "LINEAR_EXACT":
            plane = np.clip((hu - center) / width + 0.5, 0.0, 1.0)
        else:
            plane = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
        expected.append(1.0 - plane if invert else plane)
    assert np.abs(got - np.array(expected)).max() <= 1e-6
