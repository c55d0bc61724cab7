"""GPU decode (nvImageCodec): when it is used, that it falls back to the CPU codecs, and on a
GPU host that it gives the CPU codecs' pixels exactly for lossless syntaxes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders import JPEG2000LosslessDecoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from radq.errors import ConfigurationError
from workers import gpu_decode

# Not tests.conftest's SAMPLES: a GPU host runs this file alone (--noconftest), without
# the suite's services and their client libraries.
REAL = Path(__file__).resolve().parents[2] / "radq" / "samples" / "real"
LOSSLESS = [REAL / "examples_jpeg2k.dcm", REAL / "J2K_pixelrep_mismatch.dcm", REAL / "GDCMJ2K_TextGBR.dcm"]
"""Real JPEG 2000 files of radq's samples (lossless and not: each decodes to fixed integers)."""
gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and gpu_decode.installed()), reason="needs a CUDA GPU and nvImageCodec"
)


@pytest.fixture
def gpu_first() -> Iterator[None]:
    gpu_decode.install(0)
    try:
        yield
    finally:
        gpu_decode.uninstall()


def test_off_and_cpu_workers_decode_on_the_cpu() -> None:
    assert gpu_decode.gpu_decode_device("off", "cuda", 0) is None
    assert gpu_decode.gpu_decode_device("auto", "cpu", None) is None


def test_on_refuses_a_cpu_worker() -> None:
    with pytest.raises(ConfigurationError, match="needs a CUDA worker"):
        gpu_decode.gpu_decode_device("on", "cpu", None)


@pytest.mark.skipif(gpu_decode.installed(), reason="nvImageCodec is installed here")
def test_without_nvimagecodec_auto_stays_on_the_cpu_and_on_says_what_to_install() -> None:
    assert gpu_decode.gpu_decode_device("auto", "cuda", 1) is None
    with pytest.raises(ConfigurationError, match=r"pip install 'radq\[gpu-decode\]'"):
        gpu_decode.gpu_decode_device("on", "cuda", None)


@pytest.mark.skipif(not gpu_decode.installed(), reason="needs nvImageCodec")
def test_with_nvimagecodec_a_cuda_worker_decodes_on_its_gpu() -> None:
    assert gpu_decode.gpu_decode_device("auto", "cuda", 1) == 1
    assert gpu_decode.gpu_decode_device("on", "cuda", None) == 0


def test_install_puts_the_gpu_first_and_uninstall_takes_it_out(gpu_first: None) -> None:
    assert gpu_decode.first_plugin(JPEG2000LosslessDecoder) == gpu_decode.LABEL
    gpu_decode.install(0)  # idempotent
    assert list(JPEG2000LosslessDecoder.available_plugins).count(gpu_decode.LABEL) == 1
    gpu_decode.uninstall()
    assert gpu_decode.LABEL not in JPEG2000LosslessDecoder.available_plugins


@pytest.mark.skipif(gpu_decode.installed() and torch.cuda.is_available(), reason="the GPU would decode")
@pytest.mark.parametrize("path", [*LOSSLESS, Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm") or "")], ids=str)
def test_a_frame_the_gpu_cannot_decode_falls_back_to_the_cpu_codec(path: Path) -> None:
    expected = pixel_array(path)
    gpu_decode.install(0)
    try:
        # Here nvImageCodec is missing or has no GPU: the plugin fails, pydicom goes on to the next.
        assert np.array_equal(pixel_array(path), expected)
    finally:
        gpu_decode.uninstall()


def _cr_j2k(tmp: Path) -> Path:
    """A 12-bit 2500x2048 CR, JPEG 2000 lossless (the bench's compressed chest image)."""
    ds = dcmread(REAL / "CR2_6247.dcm")
    rows, cols = 2500, 2048
    yy, xx = np.mgrid[0:rows, 0:cols]
    pixels = ((xx * 3 + yy * 5 + (xx * yy) % 97) % 4096).astype(np.uint16)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.compress(JPEG2000Lossless, pixels)
    path = tmp / "cr_j2k.dcm"
    ds.save_as(path)
    return path


@gpu
def test_the_gpu_decodes_lossless_jpeg_2000_to_the_cpu_codecs_pixels(tmp_path: Path, gpu_first: None) -> None:
    for path in [*LOSSLESS, _cr_j2k(tmp_path)]:
        gpu_decode.uninstall()
        expected = pixel_array(path)
        gpu_decode.install(0)
        decoded = pixel_array(path, decoding_plugin=gpu_decode.LABEL)  # the GPU alone, no fallback
        assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected), path.name


@gpu
def test_the_gpu_decodes_jpeg_baseline_within_two_grey_levels(gpu_first: None) -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm") or "")
    assert dcmread(path).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    gpu_decode.uninstall()
    expected = pixel_array(path).astype(np.int16)
    gpu_decode.install(0)
    decoded = pixel_array(path, decoding_plugin=gpu_decode.LABEL).astype(np.int16)
    # Baseline JPEG's IDCT and colour conversion round differently between codecs.
    assert decoded.shape == expected.shape and np.abs(decoded - expected).max() <= 2
