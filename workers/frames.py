"""Frames of a multi-frame object: which are read, reading only those, and their transforms.

Pixel data larger than :data:`workers.header.DEFER_SIZE` stays in the file after
:func:`workers.header.read_header`. Frames are then decoded straight from the file, one
at a time, so memory holds the frames a policy asks for (one for ``middle``, ``first``
and ``max``; at most ``max_frames`` for ``all``), never the whole pixel data.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import as_pixel_options
from pydicom.pixels.decoders.base import Decoder

from radq.errors import UndecodablePixels
from radq.model_card import FramePolicy
from workers.header import add_note

_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class FrameTransform:
    """Rescale (PS3.3 C.11.1) and first VOI window (C.11.2) of one frame."""

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window: tuple[float, float] | None = None
    window_function: str = "LINEAR"


def select_frames(policy: FramePolicy, frames: int, max_frames: int) -> list[int]:
    """The indices of the frames a policy reads, in file order.

    Args:
        policy: ``middle`` and ``first`` read one frame; ``max`` reads all of them;
            ``all`` reads all of them up to ``max_frames``, sampled evenly beyond that.
        frames: the number of frames in the object.
        max_frames: the most frames ``all`` reads (at least 1).

    Returns:
        Distinct frame indices, ascending.
    """
    if policy == "first":
        return [0]
    if policy == "middle" or (policy == "all" and max_frames == 1):
        return [frames // 2]
    if policy == "max" or frames <= max_frames:
        return list(range(frames))
    # frames > max_frames, so the rounded points are at least one frame apart
    return [int(i) for i in np.linspace(0, frames - 1, max_frames).round()]


def _frame_value(ds: Dataset, index: int, macro: str, keyword: str) -> Any:
    """A frame's value from enhanced multi-frame functional groups, else the top level.

    Of several values (window center/width pairs) the first is used.
    """
    value = ds.get(keyword)
    for sequence, item in (("PerFrameFunctionalGroupsSequence", index),
                           ("SharedFunctionalGroupsSequence", 0)):  # fmt: skip
        groups = ds.get(sequence)
        found = groups[item].get(macro) if groups and item < len(groups) else None
        if found and keyword in found[0]:
            value = found[0][keyword].value
            break
    if isinstance(value, MultiValue | list):
        return value[0] if value else None
    return value


def _float(ds: Dataset, index: int, macro: str, keyword: str) -> float | None:
    value = _frame_value(ds, index, macro, keyword)
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def frame_transform(ds: Dataset, index: int, notes: list[str]) -> FrameTransform:
    """Rescale slope and intercept, first window and VOI LUT function of frame ``index``.

    Args:
        ds: the dataset.
        index: the frame, for per-frame functional groups of enhanced objects.
        notes: receives a note for each value ignored as invalid.

    Returns:
        The frame's transform; identity rescale and no window where absent or invalid.
    """
    slope = _float(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    if slope == 0:
        add_note(notes, "Rescale Slope 0 ignored (used 1)")
    intercept = _float(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    center = _float(ds, index, "FrameVOILUTSequence", "WindowCenter")
    width = _float(ds, index, "FrameVOILUTSequence", "WindowWidth")
    if width is not None and width <= 0:
        add_note(notes, f"Window Width {width} ignored: it must be positive")
    window = (center, width) if center is not None and width and width > 0 else None
    function = _frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction")
    return FrameTransform(slope or 1.0, intercept or 0.0, window, str(function or "LINEAR").strip().upper())


def _deferred(ds: Dataset, keyword: str) -> RawDataElement | None:
    """The element when its value was left in the file by ``defer_size``, else None."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0:
        return elem
    return None


@contextmanager
def _open_source(ds: Dataset) -> Iterator[BinaryIO]:
    """The stream pydicom read ``ds`` from, chosen as its own deferred reads choose it.

    An open buffer (a deflated or in-memory file) is used as is and left where it
    was; otherwise the file is opened again by name.
    """
    buffer = getattr(ds, "buffer", None)
    if buffer is not None and not getattr(buffer, "closed", False):
        position = buffer.tell()
        try:
            yield cast(BinaryIO, buffer)
        finally:
            buffer.seek(position)
        return
    filename = getattr(ds, "filename", None)
    if not filename:
        raise UndecodablePixels("pixel data was left unread in a file that is no longer known")
    with open(filename, "rb") as fp:
        yield fp


def is_undefined_length(ds: Dataset, keyword: str) -> bool:
    """Whether the element has undefined length (encapsulated data), without reading it."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if isinstance(elem, RawDataElement):
        return elem.length == _UNDEFINED_LENGTH
    return bool(elem.is_undefined_length)


def stored_length(ds: Dataset, keyword: str) -> int:
    """How many bytes of the element's value the file holds, without reading a deferred value.

    A deferred value's length is the smaller of its declared length and what the
    file holds past the value's start: a truncated file reports what is really there.
    """
    elem = _deferred(ds, keyword)
    if elem is None:
        return len(ds[keyword].value or b"")
    with _open_source(ds) as fp:
        size = fp.seek(0, os.SEEK_END)
    return max(0, min(elem.length, size - elem.value_tell))


@contextmanager
def _pixel_source(
    ds: Dataset, keyword: str, decoder: Decoder
) -> Iterator[tuple[Dataset | BinaryIO, dict[str, Any]]]:
    """What a pydicom decoder reads frames from, with the options it then needs."""
    elem = _deferred(ds, keyword)
    if elem is None:
        yield ds, {}
        return
    opts = as_pixel_options(ds, transfer_syntax_uid=decoder.UID, pixel_keyword=keyword)
    if elem.VR:  # explicit VR: big endian 8-bit OW data is swapped by pydicom
        opts["pixel_vr"] = elem.VR
    with _open_source(ds) as fp:
        fp.seek(elem.value_tell)
        yield fp, opts


def iter_frames(
    ds: Dataset, keyword: str, decoder: Decoder, indices: Sequence[int], *, frames: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Decode the frames ``indices`` one at a time, each with pydicom's pixel properties.

    Args:
        ds: the dataset, its pixel data in memory or deferred.
        keyword: the pixel data element's keyword.
        decoder: pydicom's decoder for the transfer syntax.
        indices: frames to decode, ascending.
        frames: the number of frames the header declares.

    Yields:
        Each frame as (rows, columns[, samples]) with pydicom's decoding options
        (YCbCr converted to RGB), and its pixel properties.
    """
    every = list(indices) == list(range(frames))
    with _pixel_source(ds, keyword, decoder) as (src, opts):
        # With no indices, encapsulated frames are decoded in one sequential pass
        # (JPEG may yield more frames than declared: those are left out).
        decoded = decoder.iter_array(src, indices=None if every else indices, **opts)
        yield from itertools.islice(decoded, len(indices))


def read_frames(
    ds: Dataset, keyword: str, decoder: Decoder, indices: Sequence[int], geometry: tuple[int, ...],
    *, maximum: bool,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Decode frames ``indices`` one at a time into a stack, or into their running maximum.

    Args:
        ds: the dataset, its pixel data in memory or deferred.
        keyword: the pixel data element's keyword.
        decoder: pydicom's decoder for the transfer syntax.
        indices: frames to decode, ascending.
        geometry: rows, columns, frames and samples per pixel from the header.
        maximum: keep the element-wise maximum of the frames instead of each one.

    Returns:
        (F, H, W[, S]) with F = ``len(indices)``, or (1, H, W[, S]) for ``maximum``;
        and pydicom's pixel properties of the last frame.

    Raises:
        UndecodablePixels: a frame's shape is not the header's, or frames are missing.
    """
    rows, cols, frames, samples = geometry
    shape = (rows, cols) if samples == 1 else (rows, cols, samples)
    out: np.ndarray | None = None
    props: dict[str, Any] = {}
    count = 0
    for arr, frame_props in iter_frames(ds, keyword, decoder, indices, frames=frames):
        count, props = count + 1, frame_props
        if arr.shape != shape:
            raise UndecodablePixels(
                f"could not decode pixel data ({decoder.UID.name}): got shape {arr.shape}, "
                f"header says {shape}"
            )
        if out is None:
            out = np.empty((1 if maximum else len(indices), *shape), dtype=arr.dtype)
            out[0] = arr
        elif maximum:  # a running maximum: one frame held besides the result
            np.maximum(out[0], arr, out=out[0])
        else:
            out[count - 1] = arr
    if out is None or count < len(indices):
        raise UndecodablePixels(
            f"could not decode pixel data ({decoder.UID.name}): found {count} of the "
            f"{len(indices)} frame(s) asked for"
        )
    return out, props


def frame_transforms(
    ds: Dataset, indices: Sequence[int], notes: list[str], *, maximum: bool
) -> list[FrameTransform]:
    """Each frame's transform, or for ``maximum`` the first frame's (noting if others differ)."""
    transforms = [frame_transform(ds, i, notes) for i in indices]
    if maximum:
        if len(set(transforms)) > 1:
            add_note(notes, "frames differ in rescale or window: the maximum uses the first frame's")
        return transforms[:1]
    return transforms
