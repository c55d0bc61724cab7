"""Which of pydicom's installed CPU plugins decodes a syntax first, and a plugin of radq's.

pydicom tries a decoder's plugins in the order they were added and falls back to the
next one for any frame a plugin cannot decode. It adds pylibjpeg (libjpeg 9) first,
which is the slowest codec of those radq installs where another one exists (one core):

- JPEG baseline: Pillow (libjpeg-turbo, SIMD) decodes a 240x320 YBR_FULL_422 ultrasound
  frame (pydicom's ``examples_ybr_color.dcm``) in 0.34 ms, pylibjpeg in 1.20. Both are
  conforming decoders of a lossy codestream; their outputs differ by the IDCT's rounding
  (at most 3 grey levels on that file). Not JPEG extended: Pillow refuses 12-bit samples,
  and every refused frame would cost a logged exception before the fallback.
- JPEG-LS: pyjpegls (CharLS) decodes the bench's 2500x2048 12-bit lossless CR in 125 ms,
  pylibjpeg in 490; the same integers (JPEG-LS decoding is exact, near-lossless too).
- JPEG lossless (process 14, SV1), JPEG extended and JPEG 2000: pydicom has no plugin but
  pylibjpeg's. This module is one, around imagecodecs (:func:`decode_frame`): its
  libjpeg-turbo 3 decodes the same CR as JPEG lossless SV1 in 38 ms against 162, and its
  OpenJPEG build the CR as JPEG 2000 lossless in 616 ms against 772; the same integers.
  Where imagecodecs is not installed, pylibjpeg decodes, as before.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydicom.pixels.common import PhotometricInterpretation as PI
from pydicom.pixels.decoders import (
    JPEG2000Decoder,
    JPEG2000LosslessDecoder,
    JPEGBaseline8BitDecoder,
    JPEGExtended12BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLSLosslessDecoder,
    JPEGLSNearLosslessDecoder,
)
from pydicom.pixels.decoders.base import Decoder, DecodeRunner
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGExtended12Bit

GPU_PLUGIN = "nvimgcodec"
"""The label :mod:`workers.gpu_decode` gives nvImageCodec's plugin."""
IMAGECODECS_PLUGIN = "imagecodecs"
"""This module's plugin: libjpeg-turbo 3 and OpenJPEG through imagecodecs."""
IMAGECODECS_DECODERS: tuple[Decoder, ...] = (
    JPEGLosslessDecoder, JPEGLosslessSV1Decoder, JPEGExtended12BitDecoder, JPEG2000LosslessDecoder,
    JPEG2000Decoder,
)  # fmt: skip
PREFERRED: tuple[tuple[Decoder, str, str], ...] = (
    (JPEGBaseline8BitDecoder, "pillow", "pylibjpeg"),
    (JPEGLSLosslessDecoder, "pyjpegls", "pylibjpeg"),
    (JPEGLSNearLosslessDecoder, "pyjpegls", "pylibjpeg"),
    *((decoder, IMAGECODECS_PLUGIN, "pylibjpeg") for decoder in IMAGECODECS_DECODERS),
)
"""(decoder, plugin, the plugin it goes before) where both are installed."""


def put_before(decoder: Decoder, plugin: str, other: str) -> None:
    """Move ``plugin`` just ahead of ``other`` in ``decoder``'s order; the rest keep theirs.

    A no-op unless both are available, or when ``plugin`` is ahead already (so a plugin
    put first on purpose, nvImageCodec on a GPU worker, stays first).
    """
    available: dict[str, Any] = decoder._available  # pydicom 3 has no public reordering
    names = list(available)
    if plugin not in names or other not in names or names.index(plugin) < names.index(other):
        return
    names.remove(plugin)
    names.insert(names.index(other), plugin)
    decoder._available = {name: available[name] for name in names}


def prefer_fast_plugins() -> None:
    """Add this module's plugin where imagecodecs is installed, and apply :data:`PREFERRED`,
    in this process (idempotent)."""
    for decoder in IMAGECODECS_DECODERS:
        if IMAGECODECS_PLUGIN not in decoder.available_plugins and is_available(decoder.UID):
            decoder.add_plugin(IMAGECODECS_PLUGIN, (__name__, "decode_frame"))
    for decoder, plugin, other in PREFERRED:
        put_before(decoder, plugin, other)


# pydicom's plugin interface (is_available, DECODER_DEPENDENCIES, the decode function).

DECODER_DEPENDENCIES = {decoder.UID: ("imagecodecs",) for decoder in IMAGECODECS_DECODERS}


def is_available(uid: str) -> bool:
    """Whether :func:`decode_frame` serves ``uid``: imagecodecs is installed, with its codec."""
    if not any(uid == decoder.UID for decoder in IMAGECODECS_DECODERS):
        return False
    if importlib.util.find_spec("imagecodecs") is None:
        return False
    import imagecodecs

    codec = imagecodecs.JPEG2K if uid in JPEG2000TransferSyntaxes else imagecodecs.JPEG8
    return bool(codec.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes | bytearray:
    """One frame, decoded by imagecodecs, as the bytes pylibjpeg returns and with the runner
    options its plugin sets: samples as coded, colour by pixel.

    JPEG 2000 comes back in the container its precision needs, and with YBR_ICT and
    YBR_RCT reversed to RGB, as pylibjpeg-openjpeg returns it. Lossy colour JPEG (extended,
    three samples) goes to pylibjpeg's own plugin, whose colour handling pydicom is built
    around; lossless colour has no transform to differ in.
    """
    import imagecodecs

    if runner.transfer_syntax in JPEG2000TransferSyntaxes:
        decoded = imagecodecs.jpeg2k_decode(src, numthreads=1)
        if runner.photometric_interpretation in (PI.YBR_ICT, PI.YBR_RCT):
            runner.set_option("photometric_interpretation", PI.RGB)
        precision = runner.get_option("j2k_precision", runner.bits_stored)
        runner.set_option("bits_allocated", 8 if precision <= 8 else 16 if precision <= 16 else 32)
    elif runner.transfer_syntax == JPEGExtended12Bit and runner.samples_per_pixel != 1:
        from pydicom.pixels.decoders import pylibjpeg

        frame: bytearray = pylibjpeg._decode_frame(src, runner)
        return frame
    else:
        decoded = imagecodecs.jpeg8_decode(src)
    # Writable, as pylibjpeg's: pydicom corrects signs and unused bits in place (one copy).
    return bytearray(decoded.data.cast("B"))


def asks_rgb(decoder: Decoder) -> bool:
    """Whether frames of ``decoder``'s syntax are asked for as RGB rather than as stored.

    pydicom's own plugins return YBR_FULL and YBR_FULL_422 samples as stored when told
    ``as_rgb=False``, and say so in the frame's properties. Its YCbCr to RGB conversion
    runs in float numpy, 1.2 ms per 240x320 frame against 0.34 ms for Pillow's decode,
    and a one-channel model needs only Y, the luminance itself (PS3.3 C.7.6.3.1.2). But
    nvImageCodec's plugin converts JPEG baseline to RGB whatever ``as_rgb`` says, and
    then reports RGB only when asked for it: where it is first in line, frames are
    asked for as RGB, as before.
    """
    return next(iter(decoder._available), "") == GPU_PLUGIN
