"""Which codec decodes first, and whether YCbCr is asked for as stored."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, examples
from pydicom.data.data_manager import DATA_ROOT
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders import (
    JPEG2000LosslessDecoder,
    JPEGBaseline8BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLSLosslessDecoder,
    JPEGLSNearLosslessDecoder,
)
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLossless, JPEGLosslessSV1, JPEGLSTransferSyntaxes

import workers.frames  # noqa: F401  (its import puts the fast plugins first, as in every decode)
import workers.header
from db.status import StorageKind
from db.work import Claimed
from radq.model_card import cards_in
from radq.settings import BUNDLED_MODEL_DIR
from workers import gpu_decode
from workers.codecs import IMAGECODECS_PLUGIN, asks_rgb, put_before
from workers.decode import decode, read_instance
from workers.header import read_header
from workers.prepare import load

SAMPLES = Path(__file__).resolve().parents[2] / "radq" / "samples" / "real"


def _syntax(path: Path) -> str:
    with warnings.catch_warnings():  # pydicom's test files include odd ones on purpose
        warnings.simplefilter("ignore")
        try:
            return str(dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        except Exception:
            return ""


def _files_of(syntaxes: list[UID]) -> list[Path]:
    found = [*SAMPLES.glob("*.dcm"), *Path(DATA_ROOT, "test_files").glob("*.dcm")]
    return sorted((p for p in found if _syntax(p) in syntaxes), key=str)


def _order(decoder: Decoder) -> list[str]:
    """The plugins in the order pydicom tries them (``available_plugins`` is sorted by name)."""
    return list(decoder._available)


def test_pillow_decodes_jpeg_baseline_before_pylibjpeg() -> None:
    plugins = _order(JPEGBaseline8BitDecoder)
    assert plugins.index("pillow") < plugins.index("pylibjpeg")  # pydicom adds pylibjpeg first


def test_charls_decodes_jpeg_ls_before_pylibjpeg() -> None:
    for decoder in (JPEGLSLosslessDecoder, JPEGLSNearLosslessDecoder):
        assert _order(decoder)[:2] == ["pyjpegls", "pylibjpeg"]


@pytest.mark.parametrize("path", _files_of(JPEGLSTransferSyntaxes), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_charls_gives_pylibjpegs_integers(path: Path) -> None:
    """JPEG-LS (near-lossless too) decodes to exact integers: either codec, the same pixels."""
    charls = pixel_array(path, decoding_plugin="pyjpegls")
    libjpeg = pixel_array(path, decoding_plugin="pylibjpeg")
    assert charls.dtype == libjpeg.dtype and np.array_equal(charls, libjpeg)


def test_a_plugin_put_first_on_purpose_stays_first() -> None:
    gpu_decode.install(0)
    try:
        put_before(JPEGBaseline8BitDecoder, "pillow", "pylibjpeg")
        assert _order(JPEGBaseline8BitDecoder)[:3] == [gpu_decode.LABEL, "pillow", "pylibjpeg"]
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


def _jpeg_lossless(tmp: Path, name: str, predictor: int, bits: int) -> tuple[Path, np.ndarray]:
    """A real sample's pixels re-encoded as JPEG lossless by libjpeg-turbo: process 14 with
    ``predictor`` (SV1 when 1), ``bits`` bits; the pixels as pydicom read them before."""
    imagecodecs = pytest.importorskip("imagecodecs")
    ds = dcmread(SAMPLES / name)
    pixels = ds.pixel_array
    if bits < 16:  # fit the samples to ``bits`` unsigned bits
        pixels = (pixels.astype(np.int64) - int(pixels.min())).clip(0, 2**bits - 1).astype(np.uint16)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    coded = pixels.view(np.uint16) if pixels.dtype == np.int16 else pixels  # signed: the bit pattern
    stream = imagecodecs.jpeg8_encode(coded, lossless=True, predictor=predictor, bitspersample=bits)
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1 if predictor == 1 else JPEGLossless
    path = tmp / f"{name}-p{predictor}-{bits}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pixels


@pytest.mark.parametrize(
    ("name", "predictor", "bits"),
    [("CT_small.dcm", 1, 16), ("CT_small.dcm", 7, 16), ("CR2_6247.dcm", 1, 12), ("MR_small.dcm", 4, 12)],
)
def test_jpeg_lossless_decodes_first_with_libjpeg_turbo_to_the_exact_pixels(
    tmp_path: Path, name: str, predictor: int, bits: int
) -> None:
    """Signed CT, 12-bit CR and MR, both process 14 syntaxes: libjpeg-turbo (first in line)
    and pylibjpeg both give back the pixels encoded, and so does radq's decode."""
    path, pixels = _jpeg_lossless(tmp_path, name, predictor, bits)
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    decoder = JPEGLosslessSV1Decoder if syntax == JPEGLosslessSV1 else JPEGLosslessDecoder
    assert _order(decoder)[0] == IMAGECODECS_PLUGIN
    turbo = pixel_array(path, decoding_plugin=IMAGECODECS_PLUGIN)
    libjpeg = pixel_array(path, decoding_plugin="pylibjpeg")
    assert turbo.dtype == libjpeg.dtype and np.array_equal(turbo, libjpeg)
    assert np.array_equal(read_instance(path, max_pixels=1 << 28).pixels[0], pixels)


def test_lossy_extended_and_lossless_colour_match_pylibjpeg() -> None:
    """The real 12-bit JPEG extended sample within the IDCT's rounding; lossless RGB exactly."""
    pytest.importorskip("imagecodecs")
    extended = SAMPLES / "JPGExtended.dcm"
    turbo = pixel_array(extended, decoding_plugin=IMAGECODECS_PLUGIN).astype(np.int32)
    assert np.abs(turbo - pixel_array(extended, decoding_plugin="pylibjpeg")).max() <= 1
    colour = SAMPLES / "SC_rgb_jpeg_gdcm.dcm"
    ours = pixel_array(colour, decoding_plugin=IMAGECODECS_PLUGIN)
    assert np.array_equal(ours, pixel_array(colour, decoding_plugin="pylibjpeg"))


@pytest.mark.parametrize(
    "path",
    [p for p in _files_of(JPEG2000TransferSyntaxes) if p.name != "JPEG2000-embedded-sequence-delimiter.dcm"],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_jpeg_2000_decodes_first_through_imagecodecs_to_pylibjpegs_pixels(path: Path) -> None:
    """Signed, unsigned, a signedness mismatch, YBR_RCT and RGB, lossless and lossy: the
    same pixels and photometric handling as pylibjpeg-openjpeg, as stored and as RGB."""
    pytest.importorskip("imagecodecs")
    assert _order(JPEG2000LosslessDecoder)[0] == IMAGECODECS_PLUGIN
    for as_rgb in (True, False):
        ours = pixel_array(path, decoding_plugin=IMAGECODECS_PLUGIN, as_rgb=as_rgb)
        theirs = pixel_array(path, decoding_plugin="pylibjpeg", as_rgb=as_rgb)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize("defer", [False, True], ids=["in_memory", "deferred"])
@pytest.mark.parametrize("frame", ["first", "middle", "max", "all"])
def test_y_alone_is_the_y_of_every_component(
    frame: str, defer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For models that take luminance only, a YCbCr JPEG cine decodes Y alone: exactly the Y
    plane that decoding every component gives, for every frame policy."""
    if defer:
        monkeypatch.setattr(workers.header, "DEFER_SIZE", 64)
    path = Path(examples.get_path("ybr_color"))
    full = read_instance(path, max_pixels=1 << 28, frame=frame)  # type: ignore[arg-type]
    ds, meta, notes = read_header(path)
    alone = decode(ds, meta, notes, max_pixels=1 << 28, frame=frame, luminance=True)  # type: ignore[arg-type]
    assert alone.ycbcr and alone.pixels.shape == (*full.pixels.shape[:3], 1)
    assert np.array_equal(alone.pixels[..., 0], full.pixels[..., 0])
    assert alone.frame_indices == full.frame_indices


def test_a_frame_libjpeg_turbo_refuses_alone_is_decoded_with_every_component(tmp_path: Path) -> None:
    """A TEM marker (T.81 B.1.1.3, no length) after the start of image: Pillow's marker parser
    refuses it, so the instance is decoded through pydicom's plugins (libjpeg 9 skips it), as
    without the Y-alone path."""
    ds = dcmread(examples.get_path("ybr_color"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=30))
    frames[3] = frames[3][:2] + b"\xff\x01" + frames[3][2:]  # Pillow: "cannot identify image file"
    ds.PixelData = encapsulate(frames)
    path = tmp_path / "cut.dcm"
    ds.save_as(path)
    full = read_instance(path, max_pixels=1 << 28, frame="all")
    ds, meta, notes = read_header(path)
    alone = decode(ds, meta, notes, max_pixels=1 << 28, frame="all", luminance=True)
    assert alone.pixels.shape[-1] == 3 and np.array_equal(alone.pixels, full.pixels)


def test_a_one_channel_card_ships_y_alone() -> None:
    """The ultrasound model (1 channel) gets Y from its decode process, (H, W, 1)."""
    path = Path(examples.get_path("ybr_color"))
    card = cards_in(BUNDLED_MODEL_DIR)["us-abdomen-smallcnn"]
    claimed = Claimed(1, "job", path.name, StorageKind.PATH, str(path), 0)
    prepared = load(claimed, path, bytes(32), [card], 1 << 28)
    assert not prepared.status
    (frame,) = prepared.inputs[card.name]
    assert frame.chroma is not None and frame.pixels.shape == (240, 320, 1)
