"""Turning decoded frames into model inputs, as the model card prescribes.

Per frame: modality LUT, VOI to [0, 1] (the card's channel windows, else its window
for the modality, else the file's VOI LUT, else its window, else min-max),
MONOCHROME1 inversion, colour handling, antialiased resize, then normalisation.
Everything stays float32 (a float64 copy of a 2500x2048 CR would double the memory
of every decode thread) and frames are windowed one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from radq.errors import ModelError, UndecodablePixels
from radq.model_card import InputSpec, Preprocessing
from workers.decode import DecodedImage
from workers.frames import FLOAT32_SAFE, FrameTransform
from workers.header import describe_malformed, printable, short_error

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 weights for RGB to grayscale."""
YCBCR_TO_RGB = np.array(
    [[1.0, 0.0, 1.402],
     [1.0, -0.114 * 1.772 / 0.587, -0.299 * 1.402 / 0.587],
     [1.0, 1.772, 0.0]],
    dtype=np.float32,
)  # fmt: skip
"""R, G, B from Y, Cb and Cr less their zero: YBR_FULL's inverse (PS3.3 C.7.6.3.1.2), as
pydicom's ``convert_color_space`` uses it; whose Y is the luminance LUMA gives."""


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, output scaled to [0, 1] (float32)."""
    if width <= 1:  # the standard's formula divides by width - 1: a threshold here
        return (values > center - 0.5).astype(np.float32)
    out = values - np.float32(center - 0.5)
    out /= np.float32(width - 1)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


_EXP_LIMIT = np.float32(88.0)
"""Largest exponent the sigmoid window passes to float32 exp (which overflows past 88.72)."""


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The file's window with its VOI LUT Function, output scaled to [0, 1] (float32)."""
    if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
        out = values - np.float32(center)
        out /= np.float32(width)
        out += np.float32(0.5)
        return np.clip(out, 0.0, 1.0, out=out)
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        out = values - np.float32(center)
        out *= np.float32(-4.0 / width)
        # exp overflows float32 past 88.7 (a narrow window); at ±88 the sigmoid is already 0 or 1.
        np.clip(out, -_EXP_LIMIT, _EXP_LIMIT, out=out)
        np.exp(out, out=out)
        out += np.float32(1.0)
        return np.reciprocal(out, out=out)
    return linear_window(values, center, width)


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant frame carries no contrast: zeros rather than NaN
        return np.zeros(values.shape, dtype=np.float32)
    values -= np.float32(low)  # ours to change: _modality_values always copies
    values /= np.float32(high - low)
    return values


def _lut_problem(ds: Dataset, sequence: str, depths: Collection[int]) -> str | None:
    """What makes the first item of a LUT sequence unusable, or None if it looks usable.

    pydicom indexes the table without checking it against its descriptor, and fails with
    numpy's words ("index 2 is out of bounds"), or none at all (a KeyError of a tag).
    """
    item = ds[sequence][0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or not isinstance(descriptor, MultiValue | list) or len(descriptor) != 3:
        return f"LUT Descriptor is {printable(repr(descriptor), 60)}, not 3 values"
    entries, depth = int(descriptor[0]) or 65536, int(descriptor[2])
    if depth not in depths:
        return f"LUT Descriptor gives {depth} bits per entry, not {min(depths)} to {max(depths)}"
    if data is None:
        return "no LUT Data"
    if isinstance(data, bytes):  # OW: 16-bit words; 8-bit entries may be packed two to a word
        held = len(data) if depth == 8 else len(data) // 2
    else:
        held = len(data) if isinstance(data, MultiValue | list) else 1
    if held < entries:
        return f"LUT Descriptor declares {entries} entries, LUT Data holds {held}"
    return None


def _checked_lut(ds: Dataset, sequence: str, depths: Collection[int]) -> None:
    """Refuse, with what is wrong, a LUT that pydicom would fail to apply (or misapply)."""
    try:
        problem = _lut_problem(ds, sequence, depths)
    except Exception as exc:  # pydicom converts values on access: a corrupt one fails here
        problem = f"unreadable ({describe_malformed(exc)})"
    if problem:
        name = "Modality LUT Sequence" if sequence == "ModalityLUTSequence" else "VOI LUT Sequence"
        raise UndecodablePixels(f"unusable {name}: {problem}")


def _modality_values(image: DecodedImage, row: int, transform: FrameTransform) -> np.ndarray:
    """Stored values of one row to modality units (Hounsfield units for CT), float32, a copy."""
    pixels = image.pixels[row]
    if image.modality_lut is not None:
        _checked_lut(image.modality_lut, "ModalityLUTSequence", (8, 16))  # PS3.3 C.11.1.1.1
        try:
            mapped = apply_modality_lut(pixels, image.modality_lut)
        except Exception as exc:  # the file's table is malformed: a per-file failure
            raise UndecodablePixels(
                f"unusable Modality LUT Sequence: {type(exc).__name__}: {short_error(exc)}"
            ) from None
        return mapped.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, with a reason
        values = pixels.astype(np.float32)  # always a copy: safe to scale in place
        if pixels.dtype.kind == "f" and not np.isfinite(values).all():
            np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if transform.rescale_slope != 1.0:
            values *= np.float32(transform.rescale_slope)
        if transform.rescale_intercept != 0.0:
            values += np.float32(transform.rescale_intercept)
    check_rescaled_range(float(values.min()), float(values.max()), transform)
    return values


def check_rescaled_range(low: float, high: float, transform: FrameTransform) -> None:
    """Refuse rescaled values that float32 windowing cannot take.

    Args:
        low: the smallest rescaled value of the frame.
        high: the largest.
        transform: the frame's rescale, for the reason.

    Raises:
        UndecodablePixels: ``low`` or ``high`` is not finite or beyond :data:`FLOAT32_SAFE`.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > FLOAT32_SAFE:
        raise UndecodablePixels(
            f"pixel values out of range: with Rescale Slope {transform.rescale_slope:g} and Intercept "
            f"{transform.rescale_intercept:g} they reach {low:g} to {high:g}, past what float32 windowing "
            f"takes (+-{FLOAT32_SAFE:.1e})"
        )


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's first VOI LUT, its output range scaled to [0, 1]."""
    item = ds.VOILUTSequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    # Scale by the LUT's own extremes: vendors often declare 16 bits and fill 12.
    table = apply_voi(np.arange(first, first + entries, dtype=np.int32), ds).astype(np.float32)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    table -= np.float32(low)
    table /= np.float32(high - low)
    # A LUT maps integer inputs; clipping to the table also covers out-of-range values.
    index = np.clip(np.floor(values), first, first + entries - 1).astype(np.int32)
    index -= np.int32(first)
    return table[index]


Voi = tuple[float, float, str]
"""A window as (center, width, VOI LUT Function: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``)."""


def resolve_windows(
    image: DecodedImage, recipe: Preprocessing, transform: FrameTransform
) -> tuple[Voi, ...] | None:
    """Which windows make the planes of a grayscale row, in the order the card and file give them.

    Returns:
        One window per output plane (the card's ``channel_windows``, else its window for
        the modality, else the file's first window); ``()`` for min-max; None when the
        file's VOI LUT Sequence applies instead.
    """
    card = recipe.windows.get(image.meta.modality or "")
    if recipe.channel_windows:
        return tuple((w.center, w.width, "LINEAR") for w in recipe.channel_windows)
    if card is not None:
        return ((card.center, card.width, "LINEAR"),)
    if image.voi_lut is not None:
        return None
    if transform.window is not None:
        function = transform.window_function
        return ((*transform.window, function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR"),)
    return ()


def _grayscale(image: DecodedImage, recipe: Preprocessing, row: int) -> np.ndarray:
    transform = image.transform(row)
    values = _modality_values(image, row, transform)
    windows = resolve_windows(image, recipe, transform)
    if windows is None and image.voi_lut is not None:  # None means the VOI LUT: narrows the type
        _checked_lut(image.voi_lut, "VOILUTSequence", (8, *range(10, 17)))  # PS3.3 C.11.2.1.1
        try:
            out = _voi_lut(values, image.voi_lut)[np.newaxis]
        except Exception as exc:
            reason = f"unusable VOI LUT Sequence: {type(exc).__name__}: {short_error(exc)}"
            raise UndecodablePixels(reason) from None
    elif windows:
        out = np.stack([_window(values, *window) for window in windows])
    else:
        out = _min_max(values)[np.newaxis]
    if image.photometric == "MONOCHROME1":  # low values display bright
        np.subtract(np.float32(1.0), out, out=out)
    return out


def colour_scale(image: DecodedImage) -> float:
    """What colour samples are divided by to reach [0, 1]: ``2**bits_stored - 1``, 1 for floats."""
    bits = image.bits_stored or 8 * image.pixels.dtype.itemsize
    return 1.0 if image.pixels.dtype.kind == "f" else float(2**bits - 1)


def chroma_zero(image: DecodedImage) -> float | None:
    """Where Cb and Cr are zero once divided by :func:`colour_scale` (128 / 255 for 8 bits);
    None unless ``image`` holds YCbCr."""
    if not image.ycbcr:
        return None
    bits = image.bits_stored or 8 * image.pixels.dtype.itemsize
    return float(2 ** (bits - 1)) / colour_scale(image)


def ycbcr_to_rgb(planes: np.ndarray, zero: float) -> np.ndarray:
    """(3, H, W) Y, Cb, Cr in [0, 1] to R, G, B clipped to [0, 1], in float32.

    pydicom's conversion also rounds to the stored integers; this one does not (at most
    half a level apart).
    """
    shifted = planes - np.array([0.0, zero, zero], dtype=np.float32)[:, None, None]
    rgb = np.tensordot(YCBCR_TO_RGB, shifted, axes=1).astype(np.float32, copy=False)
    return np.clip(rgb, 0.0, 1.0, out=rgb)


def _colour(image: DecodedImage, row: int) -> np.ndarray:
    out = np.moveaxis(image.pixels[row], -1, 0).astype(np.float32)  # (3, H, W)
    out /= np.float32(colour_scale(image))
    return out


def windowed(image: DecodedImage, recipe: Preprocessing, row: int = 0) -> np.ndarray:
    """One row of ``image.pixels`` as displayed, before resizing: float32 in [0, 1].

    Grayscale: modality LUT (or rescale), then the card's ``channel_windows`` (one
    channel each), else its window for the modality, else the file's VOI LUT (scaled
    by the table's extremes), else the file's first window with its VOI LUT Function
    (scaled to the window's output range), else min-max over the frame; MONOCHROME1
    is then inverted. Colour: each sample divided by ``2**bits_stored - 1``, RGB or
    YCbCr as stored (:func:`to_channels` converts); windows do not apply.

    Args:
        image: frames from :func:`workers.decode.decode`.
        recipe: the model's windows.
        row: which row (input frame) of ``image.pixels``.

    Returns:
        A (C, H, W) float32 array: C is 3 for colour, ``len(recipe.channel_windows)``
        when the card gives channel windows, else 1.

    Raises:
        UndecodablePixels: the file's Modality or VOI LUT Sequence cannot be applied, or
            its rescale takes values beyond what float32 windowing takes.
    """
    if image.pixels.ndim == 4:
        return _colour(image, row)
    return _grayscale(image, recipe, row)


def _per_channel(values: list[float], channels: int, name: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise ModelError(f"preprocessing.{name} has {len(values)} values; expected 1 or {channels}")
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()


def normalisation(recipe: Preprocessing, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The card's ``mean`` and ``std``, one float32 value per channel.

    Raises:
        ModelError: ``mean`` or ``std`` does not fit ``channels``, or ``std`` has a zero.
    """
    mean = _per_channel(recipe.mean, channels, "mean")
    std = _per_channel(recipe.std, channels, "std")
    if not np.all(std != 0):
        raise ModelError("preprocessing.std must not contain 0")
    return mean, std


def check_channels(planes: int, channels: int) -> None:
    """Refuse windowed grayscale planes that cannot feed the model (the card's fault).

    Raises:
        ModelError: ``planes`` is neither 1 (replicated) nor ``channels``.
    """
    if planes not in (1, channels):
        raise ModelError(
            f"preprocessing.channel_windows gives {planes} channels for a {channels}-channel model"
        )


def to_channels(planes: np.ndarray, channels: int, colour: bool, chroma: float | None = None) -> np.ndarray:
    """Colour to luminance for a 1-channel model; other mismatches are the card's fault.

    ``chroma``: the planes are Y, Cb and Cr, with this zero (:func:`chroma_zero`): Y is
    the luminance, and a 3-channel model gets RGB.
    """
    if colour and chroma is not None:
        return planes[:1] if channels == 1 else ycbcr_to_rgb(planes, chroma)
    if colour and channels == 1:
        return np.tensordot(LUMA, planes, axes=1)[np.newaxis].astype(np.float32, copy=False)
    check_channels(planes.shape[0], channels)
    return planes


def preprocess(image: DecodedImage, spec: InputSpec, recipe: Preprocessing) -> np.ndarray:
    """Turn decoded frames into float32 model inputs, one per row of ``image.pixels``.

    Each row goes through :func:`windowed`, colour to luminance for a 1-channel
    model (YCbCr to RGB for a 3-channel one), bilinear resize with antialiasing
    (``torch.nn.functional.interpolate``, ``align_corners=False``), replication of one
    channel into three for a 3-channel model, then ``(x - mean) / std`` per channel.

    Args:
        image: frames from :func:`workers.decode.decode`.
        spec: the model's input shape.
        recipe: the model's windows and normalisation.

    Returns:
        A contiguous float32 array of shape ``(F, spec.channels, spec.height,
        spec.width)``, F being ``image.pixels.shape[0]`` (1 unless the policy is ``all``).

    Raises:
        ModelError: ``mean``/``std`` or ``channel_windows`` do not fit ``spec.channels``,
            or ``std`` has a zero.
        UndecodablePixels: the file's Modality or VOI LUT Sequence cannot be applied, or
            its rescale takes values beyond what float32 windowing takes.
    """
    import torch  # the API and CLI import this package without paying for torch

    mean_values, std = normalisation(recipe, spec.channels)
    mean = torch.from_numpy(mean_values)[:, None, None]
    scale = torch.from_numpy(std)[:, None, None]
    out = np.empty((image.pixels.shape[0], spec.channels, spec.height, spec.width), np.float32)
    for row in range(out.shape[0]):
        planes = to_channels(
            windowed(image, recipe, row), spec.channels, image.pixels.ndim == 4, chroma_zero(image)
        )
        tensor = torch.from_numpy(np.ascontiguousarray(planes))[None]  # (1, C, H, W)
        if tuple(tensor.shape[-2:]) != (spec.height, spec.width):
            tensor = torch.nn.functional.interpolate(
                tensor, size=(spec.height, spec.width), mode="bilinear",
                antialias=True, align_corners=False,
            )  # fmt: skip
        if tensor.shape[1] != spec.channels:  # grayscale into a 3-channel model
            tensor = tensor.expand(-1, spec.channels, -1, -1)
        out[row] = ((tensor[0] - mean) / scale).numpy()
    return out
