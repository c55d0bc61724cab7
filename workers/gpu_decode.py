"""JPEG and JPEG 2000 decoded on the GPU by NVIDIA nvImageCodec, where it is installed.

On a GPU host the CPUs bound a worker on compressed archives: a 2500x2048 JPEG 2000
lossless CR decodes at about one image per second per core with OpenJPEG. nvImageCodec
(``pip install 'radq[gpu-decode]'``) decodes these syntaxes with nvJPEG / nvJPEG2000 on
the GPU. Its wheel ships a pydicom 3 decoder plugin
(``nvidia.nvimgcodec.tools.dicom.pydicom_plugin``, from the MONAI Deploy App SDK); this
module adds it to pydicom's decoders, first in line, inside each decode process (never
in a process that forks after it: CUDA does not survive a fork). pydicom tries a
decoder's plugins in order, so a frame nvImageCodec cannot decode falls back to the CPU
plugins (pylibjpeg, Pillow...) with the same result: the syntaxes are lossless or
decoded to the same integers (JPEG baseline within the codec's rounding).

RADQ_GPU_DECODE: ``auto`` (on for CUDA workers where nvImageCodec is installed), ``on``
(a worker without it refuses to start), ``off``.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib import import_module
from types import ModuleType
from typing import Any

from pydicom.pixels.decoders import (
    HTJ2KDecoder,
    HTJ2KLosslessDecoder,
    HTJ2KLosslessRPCLDecoder,
    JPEG2000Decoder,
    JPEG2000LosslessDecoder,
    JPEGBaseline8BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
)
from pydicom.pixels.decoders.base import Decoder, DecodeRunner

from radq.errors import ConfigurationError
from workers.codecs import GPU_PLUGIN

log = logging.getLogger(__name__)

LABEL = GPU_PLUGIN
"""The plugin's name in pydicom's decoders (``decoder.available_plugins``)."""
PLUGIN_MODULE = "nvidia.nvimgcodec.tools.dicom.pydicom_plugin"
DECODERS: tuple[Decoder, ...] = (
    JPEGBaseline8BitDecoder, JPEGLosslessDecoder, JPEGLosslessSV1Decoder, JPEG2000LosslessDecoder,
    JPEG2000Decoder, HTJ2KLosslessDecoder, HTJ2KLosslessRPCLDecoder, HTJ2KDecoder,
)  # fmt: skip
"""What nvImageCodec decodes on the GPU. Not JPEG-LS or RLE: those stay on the CPU."""

_device_id = 0
_plugin: ModuleType | None = None


def installed() -> bool:
    """Whether nvImageCodec's pydicom plugin can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(PLUGIN_MODULE) is not None
    except ModuleNotFoundError:
        return False


def gpu_decode_device(mode: str, device_type: str, device_index: int | None) -> int | None:
    """The GPU a worker's decode processes decode on, or None where they decode on the CPU.

    Args:
        mode: RADQ_GPU_DECODE (``auto``, ``on`` or ``off``).
        device_type: the worker's torch device type (``cuda``, ``cpu``...).
        device_index: its index (None: the current device, 0).

    Raises:
        ConfigurationError: ``on`` where the worker has no CUDA device or nvImageCodec is
            not installed.
    """
    if mode == "off":
        return None
    if device_type != "cuda":
        if mode == "on":
            raise ConfigurationError("RADQ_GPU_DECODE=on needs a CUDA worker (RADQ_DEVICE=cuda or cuda:N)")
        return None
    if not installed():
        if mode == "on":
            raise ConfigurationError(
                "RADQ_GPU_DECODE=on but nvImageCodec is not installed: pip install 'radq[gpu-decode]' "
                "(nvidia-nvimgcodec-cu13 with nvJPEG2000), or set RADQ_GPU_DECODE=auto"
            )
        return None
    return device_index or 0


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes | bytearray:
    """pydicom's plugin entry point: one encoded frame, decoded on the GPU, as host bytes."""
    plugin = _plugin if _plugin is not None else _load()
    result: bytes | bytearray = plugin._decode_frame(src, runner)
    return result


def is_available(uid: str) -> bool:
    """pydicom's plugin check: the syntaxes nvImageCodec decodes."""
    return any(uid == decoder.UID for decoder in DECODERS)


DECODER_DEPENDENCIES = {
    decoder.UID: ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg2k-cu13") for decoder in DECODERS
}
"""pydicom's plugin convention: what the plugin needs, by syntax."""


def _load() -> ModuleType:
    """nvImageCodec's plugin, with a decoder of ours: on this worker's GPU, one CPU thread
    (one decode process per core already), GPU backends only (the CPU fallback is pydicom's)."""
    global _plugin
    from nvidia import nvimgcodec

    plugin = import_module(PLUGIN_MODULE)
    backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY),
                nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU)]  # fmt: skip
    # The plugin keeps its decoder in a module global; it builds a default one (every
    # core's threads, device 0) only when none is set.
    vars(plugin)["_NVIMGCODEC_DECODER"] = nvimgcodec.Decoder(
        device_id=_device_id, max_num_cpu_threads=1, backends=backends
    )
    _plugin = plugin
    return plugin


def install(device_id: int) -> None:
    """Put the GPU plugin first in line for :data:`DECODERS`, in this process (idempotent).

    The decoder itself (a CUDA context) is made on the first frame, so a decode process
    that only meets uncompressed files never touches the GPU.
    """
    global _device_id
    _device_id = device_id
    for decoder in DECODERS:
        if LABEL in decoder.available_plugins:
            continue
        decoder.add_plugin(LABEL, (__name__, "decode_frame"))
        # pydicom 3 tries plugins in insertion order and has no public way to reorder
        # them; nvImageCodec's own register() sorts this private dict the same way.
        available: dict[str, Any] = decoder._available
        decoder._available = {LABEL: available.pop(LABEL), **available}
    log.debug("nvImageCodec first in line for %d syntaxes, on GPU %d", len(DECODERS), device_id)


def uninstall() -> None:
    """Take the GPU plugin out of pydicom's decoders again (the bench's naive loop decodes on the CPU)."""
    for decoder in DECODERS:
        if LABEL in decoder.available_plugins:
            decoder.remove_plugin(LABEL)


def first_plugin(decoder: Decoder) -> str:
    """The plugin pydicom tries first for ``decoder``'s syntax."""
    return next(iter(decoder._available), "")
