"""Decoding one frame of raw pixels from a dataset read by :mod:`workers.header`.

Size checks come before any decoding, so a bogus header never costs memory. Every
per-file problem leaves as an ``InstanceError`` subclass whose ``reason`` a person
can act on; pydicom's own warnings are added to the file's ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom.uid as uids
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import UID

from radq.errors import (
    ImageTooLarge,
    InstanceError,
    NoImage,
    TruncatedPixelData,
    UndecodablePixels,
    UnsupportedTransferSyntax,
)
from workers.header import InstanceMeta, element_text, pydicom_notes, read_header, short_error

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
"""Elements that hold an image; a dataset with none of them has nothing to infer on."""


@dataclass
class DecodedImage:
    """One decoded frame plus what preprocessing needs to turn it into model input.

    ``pixels`` is (H, W) for grayscale or (H, W, 3) for colour, in native byte order.
    ``voi_lut``/``modality_lut`` reference the dataset only when it carries the
    corresponding LUT sequence.
    """

    meta: InstanceMeta
    pixels: np.ndarray
    rescale_slope: float
    rescale_intercept: float
    window: tuple[float, float] | None
    voi_lut: Dataset | None
    photometric: str
    notes: list[str]
    window_function: str = "LINEAR"
    modality_lut: Dataset | None = None
    bits_stored: int | None = None
    frame_index: int = 0
    frames: int = 1


def unsupported_syntax_reason(uid: str) -> str:
    """The reason recorded when no installed codec decodes transfer syntax ``uid``."""
    ts = UID(uid)
    name = ts.name if ts.is_transfer_syntax else "unknown or private transfer syntax"
    if ts in uids.JPEGTransferSyntaxes:
        hint = "install pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)"
    elif ts in uids.JPEGLSTransferSyntaxes:
        hint = "install pylibjpeg and pylibjpeg-libjpeg, or pyjpegls"
    elif ts in uids.JPEG2000TransferSyntaxes:
        hint = "install pylibjpeg and pylibjpeg-openjpeg"
    elif ts in uids.RLETransferSyntaxes:
        hint = "install pylibjpeg and pylibjpeg-rle"
    elif ts in uids.MPEGTransferSyntaxes:
        hint = "pydicom cannot decode video; export the frames as images first"
    else:
        hint = "pydicom has no decoder for it; convert the file to Explicit VR Little Endian"
    return f"unsupported transfer syntax {uid} ({name}): {hint}"


def _decoder_for(ts: UID) -> Decoder:
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError):
        raise UnsupportedTransferSyntax(unsupported_syntax_reason(ts)) from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(unsupported_syntax_reason(ts))
    return decoder


def _describe(ds: Dataset, meta: InstanceMeta) -> str:
    sop = element_text(ds, "SOPClassUID") or element_text(ds.file_meta, "MediaStorageSOPClassUID")
    sop_name = UID(sop).name if sop else None
    if meta.modality and sop_name:
        return f"{meta.modality} ({sop_name})"
    return meta.modality or sop_name or "this DICOM object"


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value in (None, "") and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 1:
        shown = "missing" if value is None else f"{value!r}"
        raise UndecodablePixels(f"invalid image header: {keyword} is {shown}")
    return number


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


def _pixel_transform(
    ds: Dataset, index: int, notes: list[str]
) -> tuple[float, float, tuple[float, float] | None, str]:
    """Rescale slope and intercept, first window and VOI LUT function of one frame."""
    slope = _float(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    if slope == 0:
        notes.append("Rescale Slope 0 ignored (used 1)")
    intercept = _float(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    center = _float(ds, index, "FrameVOILUTSequence", "WindowCenter")
    width = _float(ds, index, "FrameVOILUTSequence", "WindowWidth")
    if width is not None and width <= 0:
        notes.append(f"Window Width {width} ignored: it must be positive")
    window = (center, width) if center is not None and width and width > 0 else None
    function = _frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction")
    return slope or 1.0, intercept or 0.0, window, str(function or "LINEAR").strip().upper()


def _check_size(ds: Dataset, keyword: str, ts: UID, geometry: tuple[int, ...]) -> None:
    """Refuse native pixel data shorter than its header declares (codecs check their own)."""
    rows, cols, frames, samples, bits = geometry
    if keyword == "PixelData" and ds[keyword].is_undefined_length:
        raise UndecodablePixels(
            f"pixel data is compressed but the transfer syntax {ts} ({ts.name}) is not: "
            "the file's Transfer Syntax UID is missing or wrong"
        )
    values = rows * cols * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * bits // 8
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        expected = expected // 3 * 2  # chroma subsampled 2:1 (PS3.5 8.2.1)
    actual = len(ds[keyword].value or b"")
    if actual < expected:
        raise TruncatedPixelData(f"truncated pixel data: expected {expected} bytes, found {actual}")


def _decode(
    ds: Dataset, meta: InstanceMeta, notes: list[str], max_pixels: int, frame: str
) -> DecodedImage:
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise NoImage(f"no image: {_describe(ds, meta)} has no Pixel Data")
    ts = UID(meta.transfer_syntax_uid or uids.ExplicitVRLittleEndian)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated")
    if bits != 1 and bits % 8:
        raise UndecodablePixels(f"invalid image header: BitsAllocated is {bits}")
    decoder = _decoder_for(ts)
    if decoder.is_native:  # truncation first: a file missing bytes is broken at any limit
        _check_size(ds, keyword, ts, (rows, cols, frames, samples, bits))
    if rows * cols * frames * samples > max_pixels:
        raise ImageTooLarge(
            f"image too large: {rows} rows x {cols} columns x {frames} frame(s) x {samples} "
            f"sample(s) = {rows * cols * frames * samples} values, over the limit of "
            f"{max_pixels} (RADQ_MAX_IMAGE_PIXELS)"
        )
    index = frames // 2 if frame == "middle" else 0
    arr, props = decoder.as_array(ds, index=index)
    shape = (rows, cols) if samples == 1 else (rows, cols, samples)
    if arr.shape != shape:
        raise UndecodablePixels(
            f"could not decode pixel data ({ts.name}): got shape {arr.shape}, header says {shape}"
        )
    photometric = str(props.get("photometric_interpretation") or meta.photometric or "")
    bits_stored = int(props.get("bits_stored") or bits)
    if photometric == "PALETTE COLOR":
        arr, photometric = apply_color_lut(arr, ds), "RGB"
        bits_stored = 8 * arr.dtype.itemsize
        notes.append("PALETTE COLOR expanded to RGB with the file's palette")
    elif arr.ndim == 3 and photometric != "RGB":
        notes.append(f"{photometric} colour used as is: no conversion to RGB available")
    if not arr.dtype.isnative:  # big endian files; torch only takes native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    slope, intercept, window, function = _pixel_transform(ds, index, notes)
    return DecodedImage(
        meta=meta,
        pixels=arr,
        rescale_slope=slope,
        rescale_intercept=intercept,
        window=window,
        voi_lut=ds if ds.get("VOILUTSequence") else None,
        photometric=photometric,
        notes=notes,
        window_function=function,
        modality_lut=ds if ds.get("ModalityLUTSequence") else None,
        bits_stored=bits_stored,
        frame_index=index,
        frames=frames,
    )


def decode(
    ds: Dataset,
    meta: InstanceMeta,
    notes: list[str],
    *,
    max_pixels: int,
    frame: Literal["middle", "first"] = "middle",
) -> DecodedImage:
    """Decode one frame of a dataset read by :func:`read_header`.

    Size checks come before any decoding, so a bogus header never costs memory.

    Args:
        ds: the dataset from :func:`read_header`.
        meta: its metadata.
        notes: its notes; decoding appends to the same list.
        max_pixels: the largest rows*columns*frames*samples accepted.
        frame: which frame of a multi-frame object to decode.

    Returns:
        The decoded frame and what preprocessing needs to use it.

    Raises:
        NoImage: the object has no pixel data (SR, waveform).
        TruncatedPixelData: uncompressed pixel data is shorter than declared.
        ImageTooLarge: the declared image passes ``max_pixels``.
        UnsupportedTransferSyntax: no installed codec handles the transfer syntax.
        UndecodablePixels: the codec or the image header failed otherwise.
    """
    with pydicom_notes(notes):
        try:
            return _decode(ds, meta, notes, max_pixels, frame)
        except InstanceError:
            raise
        except Exception as exc:
            name = UID(meta.transfer_syntax_uid or uids.ExplicitVRLittleEndian).name
            reason = f"could not decode pixel data ({name}): {short_error(exc)}"
            raise UndecodablePixels(reason) from None


def read_instance(
    path: Path, *, max_pixels: int, frame: Literal["middle", "first"] = "middle"
) -> DecodedImage:
    """Read and decode one file: :func:`read_header` then :func:`decode`."""
    ds, meta, notes = read_header(path)
    return decode(ds, meta, notes, max_pixels=max_pixels, frame=frame)
