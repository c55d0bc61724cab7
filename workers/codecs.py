"""Which of pydicom's installed CPU plugins decodes a syntax first.

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
"""

from __future__ import annotations

from typing import Any

from pydicom.pixels.decoders import (
    JPEGBaseline8BitDecoder,
    JPEGLSLosslessDecoder,
    JPEGLSNearLosslessDecoder,
)
from pydicom.pixels.decoders.base import Decoder

GPU_PLUGIN = "nvimgcodec"
"""The label :mod:`workers.gpu_decode` gives nvImageCodec's plugin."""
PREFERRED: tuple[tuple[Decoder, str, str], ...] = (
    (JPEGBaseline8BitDecoder, "pillow", "pylibjpeg"),
    (JPEGLSLosslessDecoder, "pyjpegls", "pylibjpeg"),
    (JPEGLSNearLosslessDecoder, "pyjpegls", "pylibjpeg"),
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
    """Apply :data:`PREFERRED` in this process (idempotent)."""
    for decoder, plugin, other in PREFERRED:
        put_before(decoder, plugin, other)


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
