"""Frames of a multi-frame object: which are read, reading only those, and their transforms.

Pixel data larger than :data:`workers.header.DEFER_SIZE` stays in the file after
:func:`workers.header.read_header`. Frames are then decoded straight from the file, one
at a time, so memory holds the frames a policy asks for (one for ``middle``, ``first``
and ``max``; at most ``max_frames`` for ``all``), never the whole pixel data.

Compressed frames are checked before a codec sees them: the fragments must be able to
hold the frames declared, and each frame's own codestream header (JPEG, JPEG-LS,
JPEG 2000, RLE) must describe the image the DICOM header does. A codec allocates what
its codestream declares, so a 1 KB JPEG claiming 65535 x 65535 pixels is refused here
rather than costing a worker 16 GB.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pydicom.uid as uids
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame, parse_basic_offsets, parse_fragments
from pydicom.multival import MultiValue
from pydicom.pixels import as_pixel_options
from pydicom.pixels.decoders.base import Decoder

from radq.errors import UndecodablePixels
from radq.model_card import FramePolicy
from workers.codecs import asks_rgb, prefer_fast_plugins
from workers.codestreams import check_codestream
from workers.header import add_note, describe_malformed, open_source, short_error

prefer_fast_plugins()  # process-wide, before any frame is decoded: every decode in radq comes here

_UNDEFINED_LENGTH = 0xFFFFFFFF

FLOAT32_SAFE = float(np.finfo(np.float32).max) / 4
"""The largest magnitude of a rescale, a window or a rescaled value that preprocessing
takes: twice it still fits float32, so windowing and min-max cannot overflow."""


@dataclass(frozen=True)
class FrameTransform:
    """Rescale (PS3.3 C.11.1) and first VOI window (C.11.2) of one frame."""

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window: tuple[float, float] | None = None
    window_function: str = "LINEAR"


def select_frames(policy: FramePolicy, frames: int, max_frames: int) -> Sequence[int]:
    """The indices of the frames a policy reads, in file order.

    Args:
        policy: ``middle`` and ``first`` read one frame; ``max`` reads all of them;
            ``all`` reads all of them up to ``max_frames``, sampled evenly beyond that.
        frames: the number of frames in the object.
        max_frames: the most frames ``all`` reads (at least 1).

    Returns:
        Distinct frame indices, ascending; a ``range`` when every frame is read, so a
        header declaring billions of frames costs no memory before it is refused.
    """
    if policy == "first":
        return [0]
    if policy == "middle" or (policy == "all" and max_frames == 1):
        return [frames // 2]
    if policy == "max" or frames <= max_frames:
        return range(frames)
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


def _readable_value(ds: Dataset, index: int, macro: str, keyword: str, notes: list[str]) -> Any:
    """:func:`_frame_value`, or None (noted) when pydicom cannot convert the stored value."""
    try:
        return _frame_value(ds, index, macro, keyword)
    except Exception as exc:  # a corrupt display value is ignored, as an invalid one is
        add_note(notes, f"{keyword} ignored: unreadable ({describe_malformed(exc)})")
        return None


def _float(ds: Dataset, index: int, macro: str, keyword: str, notes: list[str]) -> float | None:
    """A finite value that float32 arithmetic on pixels can use, or None (noted if invalid)."""
    value = _readable_value(ds, index, macro, keyword, notes)
    try:
        number = None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None
    if number is not None and not (math.isfinite(number) and abs(number) <= FLOAT32_SAFE):
        add_note(notes, f"{keyword} {number:g} ignored: not a finite number float32 can work with")
        return None
    return number


def frame_transform(ds: Dataset, index: int, notes: list[str]) -> FrameTransform:
    """Rescale slope and intercept, first window and VOI LUT function of frame ``index``.

    Args:
        ds: the dataset.
        index: the frame, for per-frame functional groups of enhanced objects.
        notes: receives a note for each value ignored as invalid: unreadable, not a
            number, infinite, or beyond :data:`FLOAT32_SAFE`.

    Returns:
        The frame's transform; identity rescale and no window where absent or invalid.
    """
    slope = _float(ds, index, "PixelValueTransformationSequence", "RescaleSlope", notes)
    if slope == 0:
        add_note(notes, "Rescale Slope 0 ignored (used 1)")
    intercept = _float(ds, index, "PixelValueTransformationSequence", "RescaleIntercept", notes)
    center = _float(ds, index, "FrameVOILUTSequence", "WindowCenter", notes)
    width = _float(ds, index, "FrameVOILUTSequence", "WindowWidth", notes)
    if width is not None and width <= 0:
        add_note(notes, f"Window Width {width} ignored: it must be positive")
    window = (center, width) if center is not None and width and width > 0 else None
    function = _readable_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction", notes)
    return FrameTransform(slope or 1.0, intercept or 0.0, window, str(function or "LINEAR").strip().upper())


def _deferred(ds: Dataset, keyword: str) -> RawDataElement | None:
    """The element when its value was left in the file by ``defer_size``, else None."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0:
        return elem
    return None


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
    with open_source(ds) as fp:
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
    with open_source(ds) as fp:
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
        Each frame as (rows, columns[, samples]) and its pixel properties. YBR_FULL and
        YBR_FULL_422 samples stay YCbCr (full resolution; the properties say which):
        preprocessing converts them, or takes Y alone for a one-channel model.
    """
    every = len(indices) == frames and (isinstance(indices, range) or list(indices) == list(range(frames)))
    with _pixel_source(ds, keyword, decoder) as (src, opts):
        # With no indices, encapsulated frames are decoded in one sequential pass
        # (JPEG may yield more frames than declared: those are left out).
        decoded = decoder.iter_array(
            src, indices=None if every else indices, as_rgb=asks_rgb(decoder), **opts
        )
        yield from itertools.islice(decoded, len(indices))


def iter_luminance(
    ds: Dataset, keyword: str, indices: Sequence[int], *, frames: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Y alone of JPEG baseline frames ``indices`` whose samples are YCbCr, each as
    (rows, columns, 1) uint8, for models that take luminance only.

    libjpeg-turbo (Pillow's draft mode ``L``) then skips Cb and Cr: 0.20 ms per 240x320
    ultrasound frame against 0.39 for all three components, and the very Y the full decode
    gives (a test). Any frame it refuses raises; :func:`workers.decode.decode` then
    decodes every component through pydicom instead.
    """
    from PIL import Image

    props = {"photometric_interpretation": "YBR_FULL", "bits_stored": 8}
    for _, data in _encoded_frames(ds, keyword, indices, frames):
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            image.draft("L", image.size)
            yield np.asarray(image)[..., np.newaxis], props


def read_frames(
    ds: Dataset, keyword: str, decoder: Decoder, indices: Sequence[int], geometry: tuple[int, ...],
    *, maximum: bool, luminance: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Decode frames ``indices`` one at a time into a stack, or into their running maximum.

    Args:
        ds: the dataset, its pixel data in memory or deferred.
        keyword: the pixel data element's keyword.
        decoder: pydicom's decoder for the transfer syntax.
        indices: frames to decode, ascending.
        geometry: rows, columns, frames and samples per pixel from the header.
        maximum: keep the element-wise maximum of the frames instead of each one.
        luminance: decode Y alone (:func:`iter_luminance`; JPEG baseline YCbCr only).

    Returns:
        (F, H, W[, S]) with F = ``len(indices)``, or (1, H, W[, S]) for ``maximum``, S
        being 1 for ``luminance``; and pydicom's pixel properties of the last frame.

    Raises:
        UndecodablePixels: a frame's shape is not the header's, or frames are missing.
    """
    rows, cols, frames, samples = geometry
    shape = (rows, cols) if samples == 1 else (rows, cols, 1 if luminance else samples)
    decoded = (
        iter_luminance(ds, keyword, indices, frames=frames)
        if luminance
        else iter_frames(ds, keyword, decoder, indices, frames=frames)
    )
    out: np.ndarray | None = None
    props: dict[str, Any] = {}
    count = 0
    for arr, frame_props in decoded:
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
    if not maximum:
        return [frame_transform(ds, i, notes) for i in indices]
    first = frame_transform(ds, indices[0], notes)  # one held at a time, however many frames
    if any(frame_transform(ds, i, notes) != first for i in indices[1:]):
        add_note(notes, "frames differ in rescale or window: the maximum uses the first frame's")
    return [first]


@contextmanager
def _encapsulated(ds: Dataset, keyword: str) -> Iterator[BinaryIO]:
    """The encapsulated pixel data as a stream positioned at its Basic Offset Table item."""
    elem = _deferred(ds, keyword)
    if elem is None:
        yield io.BytesIO(ds[keyword].value or b"")
        return
    with open_source(ds) as fp:
        fp.seek(elem.value_tell)
        yield fp


def check_fragments(ds: Dataset, keyword: str, frames: int) -> None:
    """Refuse encapsulated pixel data whose items cannot hold ``frames`` frames.

    Every frame starts a fragment of its own (PS3.5 A.4), so a header declaring more
    frames than there are fragments is wrong; checked by reading item headers only.

    Raises:
        UndecodablePixels: the items are malformed, or too few for the frames declared.
    """
    with _encapsulated(ds, keyword) as fp:
        try:
            parse_basic_offsets(fp)
            fragments, _ = parse_fragments(fp)
        except (ValueError, EOFError, struct.error) as exc:  # item tags or lengths that do not add up
            raise UndecodablePixels(f"malformed encapsulated pixel data: {short_error(exc)}") from None
    if fragments < frames:
        raise UndecodablePixels(
            f"invalid image header: NumberOfFrames is {frames} but the encapsulated pixel data "
            f"holds {fragments} fragment(s), and every frame needs one of its own"
        )


def check_codestreams(
    ds: Dataset, keyword: str, ts: uids.UID, indices: Sequence[int], geometry: tuple[int, ...]
) -> None:
    """Check the frames ``indices`` of encapsulated pixel data before any codec decodes them.

    Reads each frame as pydicom will (the offset tables, else the fragments), one at a
    time, and compares what its codestream header declares with the DICOM header, so
    no codec allocates for dimensions the file does not have.

    Args:
        ds: the dataset, its pixel data in memory or deferred.
        keyword: the pixel data element's keyword.
        ts: the transfer syntax, an encapsulated one.
        indices: the frames that will be decoded, ascending.
        geometry: rows, columns, frames, samples per pixel and bits allocated.

    Raises:
        UndecodablePixels: a frame is missing, is not a codestream of its transfer
            syntax, declares another size than the header, or holds no coded data.
        TruncatedPixelData: a JPEG, JPEG-LS or JPEG 2000 codestream stops before its end
            marker.
    """
    rows, cols, frames, samples, bits = geometry
    for index, frame in _encoded_frames(ds, keyword, indices, frames):
        check_codestream(frame, index, ts, (rows, cols, samples, bits))


def _encoded_frames(
    ds: Dataset, keyword: str, indices: Sequence[int], frames: int
) -> Iterator[tuple[int, bytes]]:
    """Frames ``indices`` of encapsulated pixel data, one codestream at a time, found as
    pydicom finds them (the offset tables, else the fragments)."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    with _encapsulated(ds, keyword) as fp:
        if len(indices) == frames:  # sequentially, as pydicom decodes every frame
            every = generate_frames(fp, number_of_frames=frames, extended_offsets=offsets)
            yield from zip(indices, every, strict=False)  # JPEG may hold more frames than declared
            return
        start = fp.tell()
        for index in indices:
            fp.seek(start)  # get_frame reads from where the stream is
            yield index, get_frame(fp, index, number_of_frames=frames, extended_offsets=offsets)
