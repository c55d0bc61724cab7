"""workers.decode: frames of pixels from the packaged real, tolerant and broken DICOM files."""

from __future__ import annotations

import csv
import struct
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

import radq
import workers.header
from radq.errors import (
    ImageTooLarge,
    InstanceError,
    NoImage,
    NotDicom,
    TruncatedPixelData,
    UndecodablePixels,
    UnsupportedTransferSyntax,
)
from tests.workers.dicom_files import write_float_image, write_image
from workers.decode import read_instance, unsupported_syntax_reason

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
MAX_PIXELS = 256 * 1024 * 1024  # the RADQ_MAX_IMAGE_PIXELS default


def _manifest(root: Path) -> dict[str, dict[str, str]]:
    with (root / "MANIFEST.tsv").open(newline="", encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


MANIFEST = _manifest(SAMPLES)
FILES = sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.glob("*/*") if p.is_file())
READABLE = [f for f in FILES if f.startswith(("real/", "tolerant/"))]
BROKEN = [f for f in FILES if f.startswith("broken/")]

# The manifest leaves the tolerant file's geometry blank: pydicom alone cannot read it.
TOLERANT_SHAPES = {"tolerant/no_meta_no_preamble.dcm": ((128, 128), "int16", "MONOCHROME2")}

EXPECTED_FAILURES: dict[str, tuple[type[InstanceError], str]] = {
    "broken/CT_declares_4096_carries_10_bytes.dcm": (
        TruncatedPixelData,
        "truncated pixel data: expected 33554432 bytes, found 10",
    ),
    "broken/MR_small_cut_in_pixels.dcm": (
        TruncatedPixelData,
        "truncated pixel data: expected 8192 bytes, found 5330",
    ),
    "broken/gzipped_MR.dcm.gz": (
        NotDicom,
        "gzip-compressed file, not DICOM: decompress it before submitting",
    ),
    "broken/random_bytes.bin": (
        NotDicom,
        "not a DICOM file: no DICM preamble and no valid dataset",
    ),
    "broken/readme_named_dcm.dcm": (
        NotDicom,
        "not a DICOM file: no DICM preamble and no valid dataset (starts with text",
    ),
    "broken/structured_report_no_image.dcm": (
        NoImage,
        "no image: SR (Comprehensive SR Storage) has no Pixel Data",
    ),
    "broken/waveform_no_image.dcm": (
        NoImage,
        "no image: ECG (12-lead ECG Waveform Storage) has no Pixel Data",
    ),
    "broken/zero_bytes.dcm": (NotDicom, "empty file (0 bytes)"),
}


def _expected(name: str) -> tuple[tuple[int, ...], np.dtype, str]:
    if name in TOLERANT_SHAPES:
        size, dtype, photometric = TOLERANT_SHAPES[name]
        return size, np.dtype(dtype), photometric
    row = MANIFEST[name]
    rows, cols = int(row["rows"]), int(row["cols"])
    colour = not row["photometric"].startswith("MONOCHROME")
    decoded_dtype = np.dtype(row["pydicom_3_with_pylibjpeg_libjpeg_openjpeg"].split()[-1])
    photometric = row["photometric"] if not colour else "RGB"
    if photometric == "RGB" and row["photometric"].startswith("YBR_FULL"):
        photometric = "YBR_FULL"  # YCbCr stays as stored, at full resolution
    shape = (rows, cols, 3) if colour else (rows, cols)
    return shape, decoded_dtype.newbyteorder("="), photometric


def test_every_sample_is_in_the_manifest() -> None:
    assert set(FILES) == set(MANIFEST)
    assert set(BROKEN) == set(EXPECTED_FAILURES)


def test_packaged_samples_match_shared_data() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    shared = _manifest(SHARED)
    assert (SAMPLES / "MANIFEST.tsv").read_bytes() == (SHARED / "MANIFEST.tsv").read_bytes()
    for name in shared:
        assert (SAMPLES / name).read_bytes() == (SHARED / name).read_bytes(), name


@pytest.mark.parametrize("name", READABLE)
def test_readable_files_decode_one_frame(name: str) -> None:
    shape, dtype, photometric = _expected(name)
    image = read_instance(SAMPLES / name, max_pixels=MAX_PIXELS)
    assert image.pixels.shape == (1, *shape)
    assert image.pixels.dtype == dtype and image.pixels.dtype.isnative
    assert image.photometric == photometric
    assert image.meta.sop_instance_uid
    assert image.meta.transfer_syntax_uid


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_fail_with_a_precise_reason(name: str) -> None:
    error, reason = EXPECTED_FAILURES[name]
    with pytest.raises(InstanceError) as info:
        read_instance(SAMPLES / name, max_pixels=MAX_PIXELS)
    assert type(info.value) is error
    assert reason in info.value.reason


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_bare_dataset_without_pixels_names_its_kind(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    with pytest.raises(NoImage, match="no image: RTPLAN"):
        read_instance(Path(path), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"])
def test_pydicom_bundled_files_match_pixel_array(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not bundled with this pydicom")
    image = read_instance(Path(path), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(image.pixels[0], pydicom.dcmread(path).pixel_array)


@pytest.mark.parametrize(("frame", "index"), [("middle", 7), ("first", 0)])
def test_multiframe_yields_the_chosen_frame(frame: str, index: int) -> None:
    path = SAMPLES / "real/rtdose.dcm"
    image = read_instance(path, max_pixels=MAX_PIXELS, frame=frame)  # type: ignore[arg-type]
    assert image.pixels.shape == (1, 10, 10)
    assert (image.frame_indices, image.frames) == ((index,), 15)
    np.testing.assert_array_equal(image.pixels[0], pydicom.dcmread(path).pixel_array[index])


def test_pixel_limit_names_dimensions_and_setting() -> None:
    with pytest.raises(ImageTooLarge) as info:
        read_instance(SAMPLES / "real/CT_small.dcm", max_pixels=1000)
    assert "128 rows x 128 columns" in info.value.reason
    assert "limit of 1000 (RADQ_MAX_IMAGE_PIXELS)" in info.value.reason


def test_huge_declared_compressed_image_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SAMPLES / "real/JPEG2000.dcm")
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageTooLarge, match="60000 rows x 60000 columns x 1 frame"):
        read_instance(tmp_path / "huge.dcm", max_pixels=MAX_PIXELS)


def test_transfer_syntax_without_decoder(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SAMPLES / "real/JPEG2000.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(UnsupportedTransferSyntax) as info:
        read_instance(tmp_path / "video.dcm", max_pixels=MAX_PIXELS)
    assert info.value.reason.startswith(
        "unsupported transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2 Main Profile / Main Level)"
    )


def test_missing_codec_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(UnsupportedTransferSyntax) as info:
        read_instance(SAMPLES / "real/examples_jpeg2k.dcm", max_pixels=MAX_PIXELS)
    assert info.value.reason == (
        "unsupported transfer syntax 1.2.840.10008.1.2.4.90 (JPEG 2000 Image Compression "
        "(Lossless Only)): install pylibjpeg and pylibjpeg-openjpeg"
    )


@pytest.mark.parametrize(
    ("uid", "package"),
    [
        ("1.2.840.10008.1.2.4.50", "pylibjpeg-libjpeg"),
        ("1.2.840.10008.1.2.4.70", "pylibjpeg-libjpeg"),
        ("1.2.840.10008.1.2.4.80", "pyjpegls"),
        ("1.2.840.10008.1.2.4.91", "pylibjpeg-openjpeg"),
        ("1.2.840.10008.1.2.4.201", "pylibjpeg-openjpeg"),
        ("1.2.840.10008.1.2.5", "pylibjpeg-rle"),
        ("1.2.3.4", "unknown or private transfer syntax"),
    ],
)
def test_unsupported_reason_per_family(uid: str, package: str) -> None:
    reason = unsupported_syntax_reason(uid)
    assert reason.startswith(f"unsupported transfer syntax {uid} (")
    assert package in reason


def test_codec_failure_is_undecodable(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SAMPLES / "real/SC_rgb_jpeg_gdcm.dcm")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 4 + b"\xff\xd9"])
    ds.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(UndecodablePixels) as info:
        read_instance(tmp_path / "corrupt.dcm", max_pixels=MAX_PIXELS)
    assert info.value.reason.startswith("could not decode pixel data (JPEG Lossless, ")
    assert "\n" not in info.value.reason


def test_palette_colour_becomes_rgb() -> None:
    path = get_testdata_file("examples_palette.dcm", download=False)
    if path is None:
        pytest.skip("examples_palette.dcm not bundled with this pydicom")
    image = read_instance(Path(path), max_pixels=MAX_PIXELS)
    assert image.pixels.shape == (1, 350, 800, 3)
    assert image.photometric == "RGB" and image.bits_stored == 16


def test_pydicom_warnings_become_notes_per_thread() -> None:
    names = ["real/MR_small_padded.dcm", "real/MR_small.dcm"] * 8
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda n: read_instance(SAMPLES / n, max_pixels=MAX_PIXELS), names))
    for name, image in zip(names, images, strict=True):
        padded = any("excess padding" in note for note in image.notes)
        assert padded == name.endswith("padded.dcm"), (name, image.notes)


@pytest.mark.parametrize(
    "name", ["broken/MR_small_cut_in_pixels.dcm", "broken/CT_declares_4096_carries_10_bytes.dcm"]
)
def test_truncation_reason_is_the_same_when_pixels_stay_in_the_file(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers.header, "DEFER_SIZE", 8)  # every pixel data element deferred
    with pytest.raises(TruncatedPixelData) as info:
        read_instance(SAMPLES / name, max_pixels=MAX_PIXELS)
    assert info.value.reason == EXPECTED_FAILURES[name][1]


def test_truncated_large_file_reports_bytes_without_reading_them(tmp_path: Path) -> None:
    path = write_image(tmp_path / "cut.dcm", np.ones((2048, 2048), dtype=np.uint16))  # 8 MiB of pixels
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 5 * 2**20)
    with pytest.raises(TruncatedPixelData) as info:
        read_instance(path, max_pixels=MAX_PIXELS)
    assert info.value.reason == "truncated pixel data: expected 8388608 bytes, found 3145728"


def _frames(count: int, size: int) -> np.ndarray:
    """Frames whose values identify them: frame f holds f*100 + a small gradient."""
    gradient = np.add.outer(np.arange(size), np.arange(size)) % 50
    return (np.arange(count)[:, None, None] * 100 + gradient).astype(np.uint16)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["native", "rle"])
@pytest.mark.parametrize(("frame", "frames_held"), [("middle", 3), ("first", 3), ("max", 5), ("all", 9)])
def test_memory_is_bounded_by_the_frames_asked_for(
    tmp_path: Path, syntax: UID, frame: str, frames_held: int
) -> None:
    # 64 frames of 512 KiB: a whole-object decode would allocate 32 MiB at least.
    # A frame costs about twice its size while decoded (codec output, then array);
    # "all" keeps 4 frames here (max_frames=4).
    stack = _frames(64, 512)
    path = write_image(tmp_path / "cine.dcm", stack, syntax=syntax)
    tracemalloc.start()
    try:
        image = read_instance(path, max_pixels=MAX_PIXELS, frame=frame, max_frames=4)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < frames_held * stack[0].nbytes, f"{frame}: peak {peak} bytes"
    expected = {
        "middle": stack[32:33], "first": stack[:1], "max": stack[-1:], "all": stack[[0, 21, 42, 63]],
    }[frame]  # fmt: skip
    np.testing.assert_array_equal(image.pixels, expected)


def test_all_frames_beyond_the_limit_are_sampled_evenly_with_a_note() -> None:
    image = read_instance(SAMPLES / "real/rtdose.dcm", max_pixels=MAX_PIXELS, frame="all", max_frames=4)
    assert image.frame_indices == (0, 5, 9, 14) and image.frames == 15
    every = pydicom.dcmread(SAMPLES / "real/rtdose.dcm").pixel_array
    np.testing.assert_array_equal(image.pixels, every[[0, 5, 9, 14]])
    assert "4 of 15 frames inferred, sampled evenly (max_frames=4)" in image.notes
    assert len(image.transforms) == 4


def test_max_is_noted_and_keeps_one_transform() -> None:
    image = read_instance(SAMPLES / "real/rtdose.dcm", max_pixels=MAX_PIXELS, frame="max")
    assert image.pixels.shape == (1, 10, 10) and image.frame_indices == tuple(range(15))
    assert "input is the maximum of the stored values over all 15 frames" in image.notes
    assert len(image.transforms) == 1


@pytest.mark.parametrize(("frame", "allowed"), [("middle", True), ("max", True), ("all", False)])
def test_pixel_limit_counts_the_frames_decoded_at_once(frame: str, allowed: bool) -> None:
    path = SAMPLES / "real/rtdose.dcm"  # 15 frames of 10 x 10
    if allowed:
        read_instance(path, max_pixels=100, frame=frame)  # type: ignore[arg-type]
        return
    with pytest.raises(ImageTooLarge, match=r"10 rows x 10 columns x 15 frame\(s\) x 1 sample\(s\) = 1500"):
        read_instance(path, max_pixels=100, frame=frame)  # type: ignore[arg-type]


def test_max_frames_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        read_instance(SAMPLES / "real/rtdose.dcm", max_pixels=MAX_PIXELS, frame="all", max_frames=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_pixel_data_decodes(tmp_path: Path, dtype: str) -> None:
    values = np.linspace(-3.5, 1e4, 12 * 10, dtype=dtype).reshape(12, 10)
    values[0, 0] = np.nan
    path = write_float_image(tmp_path / "float.dcm", values)
    image = read_instance(path, max_pixels=MAX_PIXELS)
    assert image.pixels.dtype == np.dtype(dtype) and image.pixels.shape == (1, 12, 10)
    np.testing.assert_array_equal(image.pixels[0], values)


def _without_scan(frame: bytes) -> bytes:
    """A JPEG-LS codestream up to its frame header, then a scan header no codec accepts."""
    at = 2
    while frame[at + 1] != 0xF7:  # SOF55
        at += 2 + struct.unpack(">H", frame[at + 2 : at + 4])[0]
    at += 2 + struct.unpack(">H", frame[at + 2 : at + 4])[0]
    return frame[:at] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + bytes(range(256)) * 4 + b"\xff\xd9"


def test_codec_failure_names_each_plugins_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SAMPLES / "real" / "JPEGLSNearLossless_16.dcm")
    ds.PixelData = encapsulate([_without_scan(next(generate_frames(ds.PixelData, number_of_frames=1)))])
    path = tmp_path / "bad_scan.dcm"
    ds.save_as(path)
    with pytest.raises(UndecodablePixels) as info:
        read_instance(path, max_pixels=MAX_PIXELS)
    reason = info.value.reason
    assert reason.startswith("could not decode pixel data (JPEG-LS Lossy (Near-Lossless) Image Compression)")
    assert "pyjpegls: Decoding error" in reason and "pylibjpeg: libjpeg error" in reason
    assert "\n" not in reason


def test_libjpeg_turbo_decodes_the_extended_file_libjpeg_9_refuses() -> None:
    """pydicom's JPEG-lossy.dcm: libjpeg 9 stops at a misplaced marker; libjpeg-turbo decodes it
    to the very pixels of the same scan in radq's JPGExtended.dcm."""
    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    if path is None:
        pytest.skip("JPEG-lossy.dcm not bundled with this pydicom")
    pytest.importorskip("imagecodecs")
    image = read_instance(Path(path), max_pixels=MAX_PIXELS)
    same = read_instance(SAMPLES / "real" / "JPGExtended.dcm", max_pixels=MAX_PIXELS)
    assert np.array_equal(image.pixels, same.pixels)
