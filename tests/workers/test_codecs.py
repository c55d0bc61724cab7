"""Which codec decodes first, and whether YCbCr is asked for as stored."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, examples
from pydicom.data.data_manager import DATA_ROOT
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders import JPEGBaseline8BitDecoder, JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder
from pydicom.uid import JPEGLSTransferSyntaxes

import workers.frames  # noqa: F401  (its import puts the fast plugins first, as in every decode)
from workers import gpu_decode
from workers.codecs import asks_rgb, put_before
from workers.decode import read_instance

SAMPLES = Path(__file__).resolve().parents[2] / "radq" / "samples" / "real"


def _syntax(path: Path) -> str:
    with warnings.catch_warnings():  # pydicom's test files include odd ones on purpose
        warnings.simplefilter("ignore")
        try:
            return str(dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        except Exception:
            return ""


def _jpeg_ls_files() -> list[Path]:
    found = [*SAMPLES.glob("*.dcm"), *Path(DATA_ROOT, "test_files").glob("*.dcm")]
    return sorted((p for p in found if _syntax(p) in JPEGLSTransferSyntaxes), key=str)


def test_pillow_decodes_jpeg_baseline_before_pylibjpeg() -> None:
    plugins = list(JPEGBaseline8BitDecoder.available_plugins)
    assert plugins.index("pillow") < plugins.index("pylibjpeg")


def test_charls_decodes_jpeg_ls_before_pylibjpeg() -> None:
    for decoder in (JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder):
        assert list(decoder.available_plugins)[0] == "pyjpegls"


@pytest.mark.parametrize("path", _jpeg_ls_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_charls_gives_pylibjpegs_integers(path: Path) -> None:
    """JPEG-LS (near-lossless too) decodes to exact integers: either codec, the same pixels."""
    charls = pixel_array(path, decoding_plugin="pyjpegls")
    libjpeg = pixel_array(path, decoding_plugin="pylibjpeg")
    assert charls.dtype == libjpeg.dtype and np.array_equal(charls, libjpeg)


def test_a_plugin_put_first_on_purpose_stays_first() -> None:
    gpu_decode.install(0)
    try:
        put_before(JPEGBaseline8BitDecoder, "pillow", "pylibjpeg")
        first = list(JPEGBaseline8BitDecoder.available_plugins)[:3]
        assert first == [gpu_decode.LABEL, "pillow", "pylibjpeg"]
        # nvImageCodec's plugin converts JPEG to RGB however asked: ask it for RGB
        assert asks_rgb(JPEGBaseline8BitDecoder)
    finally:
        gpu_decode.uninstall()
    assert not asks_rgb(JPEGBaseline8BitDecoder)


def test_an_ultrasound_cine_decodes_as_stored_ycbcr_close_to_pylibjpeg() -> None:
    """A real 30-frame YBR_FULL_422 JPEG cine: Pillow's frames, as stored, within the IDCT's
    rounding of pylibjpeg's (libjpeg 9)."""
    path = Path(examples.get_path("ybr_color"))
    image = read_instance(path, max_pixels=1 << 28, frame="all")
    assert image.ycbcr and image.pixels.shape == (30, 240, 320, 3)
    other = pixel_array(path, decoding_plugin="pylibjpeg", as_rgb=False)
    assert np.abs(image.pixels.astype(np.int16) - other).max() <= 3
