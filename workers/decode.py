"""Decoding the frames a model card asks for from a dataset read by :mod:`workers.header`.

Size checks come before any decoding, so a bogus header never costs memory, and only
the frames the policy needs are decoded (:mod:`workers.frames`). Compressed frames are
checked against the header before a codec allocates for them. Every per-file problem
leaves as an ``InstanceError`` subclass whose ``reason`` a person can act on; pydicom's
own warnings are added to the file's ``notes``.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.uid as uids
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import UID

from radq.errors import (
    ImageTooLarge,
    InstanceError,
    MalformedDicom,
    NoImage,
    TruncatedPixelData,
    UndecodablePixels,
    UnsupportedTransferSyntax,
)
from radq.model_card import FramePolicy
from workers.codecs import asks_rgb
from workers.frames import (
    FrameTransform,
    check_codestreams,
    check_fragments,
    frame_transforms,
    is_undefined_length,
    read_frames,
    select_frames,
    stored_length,
)
from workers.header import (
    InstanceMeta,
    add_note,
    describe_malformed,
    element_text,
    is_environment_error,
    is_uid,
    printable,
    pydicom_notes,
    read_header,
    short_error,
)

log = logging.getLogger(__name__)

YCBCR = frozenset({"YBR_FULL", "YBR_FULL_422"})
"""Photometric interpretations decoded as stored YCbCr (:func:`workers.frames.iter_frames`);
a decoded image calls both YBR_FULL."""
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
"""Elements that hold an image; a dataset with none of them has nothing to infer on."""

MAX_FRAMES = 64
"""The most frames the ``all`` policy decodes; longer objects are sampled evenly."""


@dataclass
class DecodedImage:
    """Decoded frames of one instance plus what preprocessing needs to make model inputs.

    ``pixels`` is always 4-D or 3-D with a leading frame axis: (F, H, W) for grayscale
    or (F, H, W, 3) for colour ((F, H, W, 1): the Y of YCbCr alone), in native byte
    order, one row per model input. F is 1 for the ``middle``, ``first`` and ``max``
    policies and at most ``max_frames`` for ``all``. ``frame_indices`` are the file's
    frames that were read: one per row, except for ``max``, whose single row is the
    maximum of them all. ``transforms`` holds each row's rescale and window (a single
    item applies to every row). ``voi_lut``/``modality_lut`` reference the dataset only
    when it carries the corresponding LUT sequence. Colour is as stored: RGB, or YCbCr
    where :attr:`ycbcr` (preprocessing converts it).
    """

    meta: InstanceMeta
    pixels: np.ndarray
    photometric: str
    notes: list[str]
    transforms: list[FrameTransform] = field(default_factory=lambda: [FrameTransform()])
    voi_lut: Dataset | None = None
    modality_lut: Dataset | None = None
    bits_stored: int | None = None
    frame_indices: tuple[int, ...] = (0,)
    frames: int = 1

    def transform(self, row: int) -> FrameTransform:
        """The rescale and window of row ``row`` of ``pixels``."""
        return self.transforms[row if len(self.transforms) > 1 else 0]

    @property
    def ycbcr(self) -> bool:
        """Colour samples Y, Cb, Cr (YBR_FULL, or YBR_FULL_422 decoded to full resolution)."""
        return self.pixels.ndim == 4 and self.photometric == "YBR_FULL"


def unsupported_syntax_reason(uid: str) -> str:
    """The reason recorded when no installed codec decodes transfer syntax ``uid``."""
    ts = UID(uid)
    name = ts.name if ts.is_transfer_syntax else "unknown or private transfer syntax"
    uid = printable(uid, 80)
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
    sop_name = UID(sop).name if sop and is_uid(sop) else None
    if meta.modality and sop_name:
        return f"{meta.modality} ({sop_name})"
    return meta.modality or sop_name or "this DICOM object"


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts on access: a corrupt value fails here
        raise UndecodablePixels(
            f"invalid image header: {keyword} cannot be read: {describe_malformed(exc)}"
        ) from None
    if value in (None, "") and default is not None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # several values, text, infinity
        number = -1
    if number < 1:
        shown = "missing" if value is None else printable(repr(value), 80)
        raise UndecodablePixels(f"invalid image header: {keyword} is {shown}")
    return number


def _codec_error(exc: Exception) -> str:
    """The error in one line; for pydicom's "all plugins failed", each plugin's own error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions were raised"):
        return printable("; ".join(lines[1:]), 300)
    return short_error(exc)


def _pixel_failure(exc: Exception) -> str:
    """What went wrong, from an exception pydicom or a codec raised on this file's pixels.

    Codecs and pydicom's checks raise ``RuntimeError``, ``ValueError``,
    ``NotImplementedError`` and "Missing required element" ``AttributeError`` with
    messages that say what is wrong; corrupt element values fail as in the header.
    Any other type is named as unexpected, and logged with its traceback.
    """
    malformed = (RecursionError, MemoryError, struct.error, EOFError, zlib.error, BytesLengthException)
    if isinstance(exc, malformed) or (isinstance(exc, OSError) and not is_environment_error(exc)):
        return f"malformed DICOM: {describe_malformed(exc)}"
    if isinstance(exc, NotImplementedError) and "Value Representation" in str(exc):
        return f"malformed DICOM: {describe_malformed(exc)}"
    if isinstance(exc, RuntimeError | ValueError | NotImplementedError) or (
        isinstance(exc, AttributeError) and "element" in str(exc)
    ):
        return _codec_error(exc)
    log.warning("unexpected error decoding pixel data", exc_info=exc)
    return f"unexpected {type(exc).__name__} in the decoder: {short_error(exc)}"


@contextmanager
def _pixel_errors(meta: InstanceMeta) -> Iterator[None]:
    """Turn what pydicom and its codecs raise on this file's pixels into ``UndecodablePixels``.

    ``InstanceError`` and the host's own I/O errors pass through unchanged.
    """
    try:
        yield
    except InstanceError:
        raise
    except Exception as exc:  # translated at this boundary, each by its type (_pixel_failure)
        if is_environment_error(exc):
            raise
        name = printable(UID(meta.transfer_syntax_uid or uids.ExplicitVRLittleEndian).name, 80)
        raise UndecodablePixels(f"could not decode pixel data ({name}): {_pixel_failure(exc)}") from None


def _check_palette(ds: Dataset) -> None:
    """Refuse a palette that pydicom would index past its end or fail on with a bare error.

    A file with no palette at all is left to pydicom, whose message says so.
    """
    for colour in ("Red", "Green", "Blue"):
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        if descriptor is None:
            return
        if f"Segmented{colour}PaletteColorLookupTableData" in ds:
            continue  # expanded by pydicom, which checks it
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        if data is None:
            raise UndecodablePixels(f"PALETTE COLOR without {colour} Palette Color Lookup Table Data")
        values = list(descriptor) if isinstance(descriptor, MultiValue | list) else []
        if len(values) != 3 or values[2] not in (8, 16):
            raise UndecodablePixels(
                f"PALETTE COLOR: {colour} Palette Color Lookup Table Descriptor is "
                f"{printable(repr(descriptor), 60)}, not 3 values with 8 or 16 bits per entry"
            )
        entries, depth = int(values[0]) or 65536, int(values[2])
        if isinstance(data, bytes):
            held = len(data) // (depth // 8)
        else:
            held = len(data) if isinstance(data, MultiValue | list) else 1
        if held < entries:
            raise UndecodablePixels(
                f"PALETTE COLOR: the {colour} palette declares {entries} entries, its data holds {held}"
            )


def _check_size(ds: Dataset, keyword: str, ts: UID, geometry: tuple[int, ...]) -> None:
    """Refuse native pixel data shorter than its header declares (codecs check their own).

    Reads no pixel data: a deferred value's length comes from the file's size.
    """
    rows, cols, frames, samples, bits = geometry
    if keyword == "PixelData" and is_undefined_length(ds, keyword):
        raise UndecodablePixels(
            f"pixel data is compressed but the transfer syntax {ts} ({ts.name}) is not: "
            "the file's Transfer Syntax UID is missing or wrong"
        )
    values = rows * cols * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * bits // 8
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        expected = expected // 3 * 2  # chroma subsampled 2:1 (PS3.5 8.2.1)
    actual = stored_length(ds, keyword)
    if actual < expected:
        raise TruncatedPixelData(f"truncated pixel data: expected {expected} bytes, found {actual}")


def _checked(ds: Dataset, meta: InstanceMeta) -> tuple[str, UID, Decoder, tuple[int, int, int, int, int]]:
    """The header-level checks: pixel data present, sane geometry, a codec, no truncation."""
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        if meta.cut_short:  # not an object without pixels: a file that ends early
            raise MalformedDicom(f"malformed DICOM: no Pixel Data, and {meta.cut_short}")
        what = _describe(ds, meta)
        if "Image Storage" in what:  # its IOD requires pixels: say what the file may be
            raise NoImage(f"no image: {what} has no Pixel Data, which it requires (a header-only copy?)")
        raise NoImage(f"no image: {what} has no Pixel Data")
    ts = UID(meta.transfer_syntax_uid or uids.ExplicitVRLittleEndian)
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated")
    if bits != 1 and bits % 8:
        raise UndecodablePixels(f"invalid image header: BitsAllocated is {bits}")
    _int(ds, "BitsStored", bits)  # pydicom compares it with BitsAllocated: a list raises TypeError
    decoder = _decoder_for(ts)
    if decoder.is_native:  # truncation first: a file missing bytes is broken at any limit
        _check_size(ds, keyword, ts, (rows, cols, frames, samples, bits))
    elif not is_undefined_length(ds, keyword):
        raise UndecodablePixels(
            f"pixel data is not encapsulated but the transfer syntax {ts} ({ts.name}) is a "
            "compressed one: the file's Transfer Syntax UID is wrong"
        )
    else:
        check_fragments(ds, keyword, frames)
    return keyword, ts, decoder, (rows, cols, frames, samples, bits)


def check_image(ds: Dataset, meta: InstanceMeta) -> None:
    """Refuse, without decoding, what can never give an image (run before routing).

    Raises:
        NoImage, MalformedDicom, UndecodablePixels, UnsupportedTransferSyntax,
        TruncatedPixelData.
        OSError: the file of deferred pixel data cannot be read again.
    """
    with _pixel_errors(meta):
        _checked(ds, meta)


def _luminance_alone(ds: Dataset, ts: UID, decoder: Decoder, samples: int) -> bool:
    """Whether Y alone can be decoded: JPEG baseline YCbCr, on the CPU codecs (nvImageCodec
    gives RGB), where Pillow is installed."""
    return (
        ts == uids.JPEGBaseline8Bit
        and samples == 3
        and ds.get("PhotometricInterpretation") in YCBCR
        and "pillow" in decoder.available_plugins
        and not asks_rgb(decoder)
    )


def _read(
    ds: Dataset, keyword: str, decoder: Decoder, indices: Sequence[int], geometry: tuple[int, ...],
    maximum: bool, luminance: bool,
) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """:func:`read_frames`, Y alone where asked and possible, else every component."""
    if luminance:
        try:
            return read_frames(ds, keyword, decoder, indices, geometry, maximum=maximum, luminance=True)
        except Exception:  # a frame libjpeg-turbo refuses: pydicom's plugins each try it
            log.debug("decoding Y alone failed; decoding every component", exc_info=True)
    return read_frames(ds, keyword, decoder, indices, geometry, maximum=maximum)


def _decode(
    ds: Dataset, meta: InstanceMeta, notes: list[str], max_pixels: int, policy: FramePolicy,
    max_frames: int, luminance: bool,
) -> DecodedImage:  # fmt: skip
    keyword, ts, decoder, (rows, cols, frames, samples, bits) = _checked(ds, meta)
    indices = select_frames(policy, frames, max_frames)
    held = 1 if policy == "max" else len(indices)
    if rows * cols * held * samples > max_pixels:
        raise ImageTooLarge(
            f"image too large: {rows} rows x {cols} columns x {held} frame(s) x {samples} "
            f"sample(s) = {rows * cols * held * samples} values, over the limit of "
            f"{max_pixels} (RADQ_MAX_IMAGE_PIXELS)"
        )
    if not decoder.is_native:  # before any codec allocates what a codestream declares
        check_codestreams(ds, keyword, ts, indices, (rows, cols, frames, samples, bits))
    maximum = policy == "max"
    luminance = luminance and _luminance_alone(ds, ts, decoder, samples)
    geometry = (rows, cols, frames, samples)
    arr, props = _read(ds, keyword, decoder, indices, geometry, maximum, luminance)
    photometric = str(props.get("photometric_interpretation") or meta.photometric or "")
    bits_stored = int(props.get("bits_stored") or bits)
    if photometric == "PALETTE COLOR":
        _check_palette(ds)
        arr, photometric = apply_color_lut(arr, ds), "RGB"
        bits_stored = 8 * arr.dtype.itemsize
        add_note(notes, "PALETTE COLOR expanded to RGB with the file's palette")
    elif arr.ndim == 4 and photometric in YCBCR:
        photometric = "YBR_FULL"  # chroma at full resolution once decoded
    elif arr.ndim == 4 and photometric != "RGB":
        add_note(notes, f"{photometric} colour used as is: no conversion to RGB available")
    if not arr.dtype.isnative:  # big endian files; torch only takes native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if maximum and frames > 1:
        add_note(notes, f"input is the maximum of the stored values over all {frames} frames")
    elif len(indices) < frames and policy == "all":
        sampled = f"{len(indices)} of {frames} frames inferred, sampled evenly (max_frames={max_frames})"
        add_note(notes, sampled)
    return DecodedImage(
        meta=meta,
        pixels=arr,
        photometric=photometric,
        notes=notes,
        transforms=frame_transforms(ds, indices, notes, maximum=maximum),
        voi_lut=ds if ds.get("VOILUTSequence") else None,
        modality_lut=ds if ds.get("ModalityLUTSequence") else None,
        bits_stored=bits_stored,
        frame_indices=tuple(indices),
        frames=frames,
    )


def decode(
    ds: Dataset,
    meta: InstanceMeta,
    notes: list[str],
    *,
    max_pixels: int,
    frame: FramePolicy = "middle",
    max_frames: int = MAX_FRAMES,
    luminance: bool = False,
) -> DecodedImage:
    """Decode the frames a frame policy asks for from a dataset read by :func:`read_header`.

    Size checks come before any decoding, so a bogus header never costs memory; only
    the frames the policy needs are decoded, one at a time.

    Args:
        ds: the dataset from :func:`read_header`.
        meta: its metadata.
        notes: its notes; decoding appends to the same list.
        max_pixels: the largest rows*columns*frames*samples decoded at once (frames
            being 1 for ``middle``, ``first`` and ``max``, the frames read for ``all``).
        frame: ``middle`` or ``first`` decode that frame; ``max`` the element-wise
            maximum of every frame's stored values; ``all`` every frame.
        max_frames: the most frames ``all`` decodes; beyond that they are sampled
            evenly, first and last included, and a note says so.
        luminance: only luminance is wanted (every model it is for takes one channel):
            JPEG baseline YCbCr then decodes Y alone, (F, H, W, 1), half the codec's work.

    Returns:
        The decoded frames, always with a leading frame axis, and what preprocessing
        needs to use them.

    Raises:
        NoImage: the object has no pixel data (SR, waveform).
        MalformedDicom: no pixel data because the file is cut short or corrupt.
        TruncatedPixelData: uncompressed pixel data is shorter than declared.
        ImageTooLarge: the frames to decode pass ``max_pixels``.
        UnsupportedTransferSyntax: no installed codec handles the transfer syntax.
        UndecodablePixels: the codec or the image header failed otherwise.
        OSError: the file of deferred pixel data cannot be read again.
        ValueError: ``max_frames`` is below 1.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, not {max_frames}")
    with pydicom_notes(notes), _pixel_errors(meta):
        return _decode(ds, meta, notes, max_pixels, frame, max_frames, luminance)


def read_instance(
    path: Path, *, max_pixels: int, frame: FramePolicy = "middle", max_frames: int = MAX_FRAMES
) -> DecodedImage:
    """Read and decode one file: :func:`read_header` then :func:`decode`."""
    ds, meta, notes = read_header(path)
    return decode(ds, meta, notes, max_pixels=max_pixels, frame=frame, max_frames=max_frames)
