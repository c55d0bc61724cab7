"""Fidelity: radq's decoded frames and windowing against pydicom's own reference, file by file.

Every file in ``radq/samples/real`` and ``radq/samples/tolerant``, every file of
pydicom's test data present on this machine, and a few files made here for what those
lack (VOI LUT Sequence, Modality LUT Sequence, SIGMOID and LINEAR_EXACT windows, float
pixel data) is checked twice:

- radq's decoded frame equals pydicom's ``pixel_array`` of the same frame index (YCbCr
  as stored, ``as_rgb=False``), exactly, both with the pixel data read with the header and left in the file
  (``defer_size``) and decoded from there;
- radq's :func:`workers.preprocess.windowed` (modality LUT, VOI, MONOCHROME1, before
  resizing) equals pydicom's ``apply_modality_lut`` then ``apply_voi_lut(prefer_lut=True)``,
  both scaled to [0, 1] the same way, within ``rtol=1e-5, atol=1e-6`` (radq computes
  in float32, pydicom in float64). The recipe has no card window: radq's card windows
  deliberately override the file's VOI, and are tested against the standard's formula
  in ``test_preprocess``.

pydicom's ``get_testdata_files("*")`` tries to download some 60 files first (15 s
without a network, and a warning), so the same local places are listed here directly:
the files bundled with pydicom and any already in its download cache. Files that are
not images, or that pydicom itself cannot decode with the installed plugins, are
skipped with the reason; radq must then refuse them with a reason of its own.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import DATA_ROOT
from pydicom.data.download import get_data_dir
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import radq
import workers.header
from radq.errors import InstanceError
from radq.model_card import Preprocessing
from workers.decode import read_instance
from workers.preprocess import chroma_zero, to_channels, windowed

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
MAX_PIXELS = 1 << 28
RTOL, ATOL = 1e-5, 1e-6
"""float32 (radq) against float64 (pydicom) on values scaled to [0, 1]."""
NO_CARD_WINDOW = Preprocessing()
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _local_pydicom_files() -> list[Path]:
    bundled = Path(DATA_ROOT, "test_files")
    cached = get_data_dir()
    found = [*bundled.glob("*"), *(cached.glob("*") if cached.is_dir() else [])]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.name)


def _synthetic(name: str, change: Callable[[FileDataset], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        ds = pydicom.dcmread(SAMPLES / "real" / name)
        change(ds)
        path = folder / f"{Path(name).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return make


def _voi_lut(ds: FileDataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [2048, 100, 16]
    ramp = np.sqrt(np.arange(2048) / 2047.0) * 4000 + 50  # non-linear, not filling 16 bits
    item.add_new("LUTData", "US", ramp.astype(np.uint16).tolist())
    ds.VOILUTSequence = [item]


def _modality_lut(ds: FileDataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", (np.arange(4096) * 3 % 65536).astype(np.uint16).tolist())
    ds.ModalityLUTSequence = [item]


def _voi_function(function: str) -> Callable[[FileDataset], None]:
    def change(ds: FileDataset) -> None:
        ds.VOILUTFunction = function

    return change


def _float_pixels(keyword: str, dtype: str) -> Callable[[FileDataset], None]:
    def change(ds: FileDataset) -> None:
        values = ds.pixel_array.astype(dtype) / 7.0 - 30.5
        del ds.PixelData
        for name in ("BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth"):
            if name in ds:
                delattr(ds, name)
        ds.BitsAllocated = 8 * np.dtype(dtype).itemsize
        setattr(ds, keyword, values.tobytes())

    return change


SYNTHETIC: dict[str, Callable[[Path], Path]] = {
    "MR_voi_lut_sequence": _synthetic("MR_small.dcm", _voi_lut),
    "MR_modality_lut_sequence": _synthetic("MR_small.dcm", _modality_lut),
    "MR_sigmoid": _synthetic("MR_small.dcm", _voi_function("SIGMOID")),
    "MR_linear_exact": _synthetic("MR_small.dcm", _voi_function("LINEAR_EXACT")),
    "MR_float_pixel_data": _synthetic("MR_small.dcm", _float_pixels("FloatPixelData", "float32")),
    "MR_double_float_pixel_data": _synthetic(
        "MR_small.dcm", _float_pixels("DoubleFloatPixelData", "float64")
    ),
}

CASES = [
    *(pytest.param(p, id=f"{p.parent.name}/{p.name}")
      for folder in ("real", "tolerant") for p in sorted((SAMPLES / folder).iterdir())),
    *(pytest.param(p, id=f"pydicom/{p.name}") for p in _local_pydicom_files()),
    *(pytest.param(name, id=f"synthetic/{name}") for name in SYNTHETIC),
]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _path(case: Path | str, folder: Path) -> Path:
    if isinstance(case, Path):
        return case
    path = folder / f"{case}.dcm"
    if not path.exists():
        SYNTHETIC[case](folder).rename(path)
    return path


def _bare_dataset(raw: bytes) -> Dataset:
    """pydicom's own forced read of a dataset without preamble, past any stray bytes."""
    for skip in range(8):
        try:
            ds = pydicom.dcmread(io.BytesIO(raw[skip:]), force=True)
        except Exception:
            continue
        if "SOPClassUID" in ds or any(k in ds for k in PIXEL_KEYWORDS):
            implicit, little = ds.original_encoding
            ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            ds.file_meta.TransferSyntaxUID = ts if little else ExplicitVRBigEndian
            return ds
    raise InvalidDicomError("not DICOM, even read with force=True")


@cache
def _reference(path: Path) -> tuple[Dataset, int, np.ndarray] | str:
    """pydicom's dataset, middle frame index and that frame, or why there are none."""
    with warnings.catch_warnings():  # pydicom warns where it tolerates (padding, bad VRs)
        warnings.simplefilter("ignore")
        return _read_reference(path)


def _read_reference(path: Path) -> tuple[Dataset, int, np.ndarray] | str:
    ds: Dataset
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        try:
            ds = _bare_dataset(path.read_bytes())
        except InvalidDicomError:
            return "not DICOM (pydicom: InvalidDicomError)"
    except Exception as exc:
        return f"pydicom cannot read it: {type(exc).__name__}"
    if not any(k in ds for k in PIXEL_KEYWORDS):
        return f"no pixel data ({UID(ds.get('SOPClassUID', '')).name or 'unknown SOP class'})"
    try:
        index = int(ds.get("NumberOfFrames") or 1) // 2
        frame = pixel_array(ds, index=index, as_rgb=False)  # YCbCr as stored, as radq decodes it
    except Exception as exc:
        message = " ".join(str(exc).split())
        return f"pydicom cannot decode it: {type(exc).__name__}: {message}"[:240]
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
    return ds, index, frame


def _reference_or_skip(path: Path) -> tuple[Dataset, int, np.ndarray]:
    reference = _reference(path)
    if isinstance(reference, str):
        pytest.skip(reference)
    return reference


@pytest.mark.parametrize("defer", [False, True], ids=["in_memory", "deferred"])
@pytest.mark.parametrize("case", CASES)
def test_decoded_frame_equals_pydicom(
    case: Path | str, defer: bool, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _path(case, synthetic_dir)
    ds, index, expected = _reference_or_skip(path)
    if defer:  # every pixel data element left in the file and decoded from there
        monkeypatch.setattr(workers.header, "DEFER_SIZE", 64)
    image = read_instance(path, max_pixels=MAX_PIXELS)
    assert image.frame_indices == (index,)
    assert image.pixels.shape == (1, *expected.shape)
    assert image.pixels.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(image.pixels[0], expected)


def _scaled_reference(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """pydicom's modality LUT and VOI output, scaled to [0, 1] as displayed; (C, H, W)."""
    if frame.ndim == 3:  # colour: no VOI; by the stored (or palette) bit depth
        bits = 8 * frame.dtype.itemsize if ds.PhotometricInterpretation == "PALETTE COLOR" else ds.BitsStored
        return np.moveaxis(frame / (2.0**bits - 1), -1, 0)
    values = apply_voi_lut(apply_modality_lut(frame, ds), ds, prefer_lut=True).astype(np.float64)
    if ds.get("VOILUTSequence"):  # by the table's own extremes
        table = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        low, high = table.min(), table.max()
    elif "WindowCenter" in ds:  # by the window's output range, found by windowing extremes
        with np.errstate(over="ignore"):
            low, high = apply_voi_lut(np.array([-1e30, 1e30]), ds, prefer_lut=True)
    else:  # no VOI: min-max
        low, high = values.min(), values.max()
    out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out[np.newaxis]


@pytest.mark.parametrize("case", CASES)
def test_windowed_equals_pydicom_modality_and_voi(case: Path | str, synthetic_dir: Path) -> None:
    path = _path(case, synthetic_dir)
    ds, _, frame = _reference_or_skip(path)
    image = read_instance(path, max_pixels=MAX_PIXELS)
    out = windowed(image, NO_CARD_WINDOW)
    assert out.dtype == np.float32
    expected = _scaled_reference(ds, frame)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    assert out.min() >= 0.0 and out.max() <= 1.0


def _photometric(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("PhotometricInterpretation", ""))
    except Exception:
        return ""


YCBCR_CASES = [
    c for c in CASES if isinstance(c.values[0], Path) and _photometric(c.values[0]).startswith("YBR_FULL")
]


@pytest.mark.parametrize("case", YCBCR_CASES)
def test_ycbcr_becomes_pydicoms_rgb_or_its_luminance(case: Path) -> None:
    """YCbCr stays as stored through decoding; preprocessing then gives a 3-channel model
    pydicom's RGB (which rounds to integers, so within half a level) and a 1-channel one Y."""
    ds, index, stored = _reference_or_skip(case)
    image = read_instance(case, max_pixels=MAX_PIXELS)
    assert image.ycbcr and image.photometric == "YBR_FULL"
    planes = windowed(image, NO_CARD_WINDOW)
    rgb = to_channels(planes, 3, True, chroma_zero(image))
    expected = np.moveaxis(pixel_array(ds, index=index), -1, 0) / 255.0  # as_rgb: pydicom converts
    np.testing.assert_allclose(rgb, expected, rtol=0, atol=0.5 / 255 + 1e-6)
    luminance = to_channels(planes, 1, True, chroma_zero(image))
    np.testing.assert_array_equal(luminance[0], stored[..., 0] / np.float32(255))


@pytest.mark.parametrize("case", CASES)
def test_files_pydicom_cannot_decode_are_refused_with_a_reason(case: Path | str, synthetic_dir: Path) -> None:
    path = _path(case, synthetic_dir)
    reference = _reference(path)
    if not isinstance(reference, str):
        pytest.skip("pydicom decodes it")
    with pytest.raises(InstanceError) as info:
        read_instance(path, max_pixels=MAX_PIXELS)
    assert info.value.reason and "\n" not in info.value.reason


MULTI_FRAME = [c for c in CASES if isinstance(c.values[0], Path) and c.values[0].name in {
    "rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_32bit_2frame.dcm", "examples_ybr_color.dcm",
}]  # fmt: skip


@pytest.mark.parametrize("defer", [False, True], ids=["in_memory", "deferred"])
@pytest.mark.parametrize("case", MULTI_FRAME)
def test_frame_policies_equal_pydicom_frames(
    case: Path, defer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, _, _ = _reference_or_skip(case)
    every = pixel_array(ds, as_rgb=False)
    if defer:
        monkeypatch.setattr(workers.header, "DEFER_SIZE", 64)
    first = read_instance(case, max_pixels=MAX_PIXELS, frame="first")
    np.testing.assert_array_equal(first.pixels, every[:1])
    everything = read_instance(case, max_pixels=MAX_PIXELS, frame="all")
    assert everything.frame_indices == tuple(range(len(every)))
    np.testing.assert_array_equal(everything.pixels, every)
    maximum = read_instance(case, max_pixels=MAX_PIXELS, frame="max")
    np.testing.assert_array_equal(maximum.pixels, every.max(axis=0, keepdims=True))
    sampled = read_instance(case, max_pixels=MAX_PIXELS, frame="all", max_frames=1)
    np.testing.assert_array_equal(sampled.pixels, every[len(every) // 2][np.newaxis])
