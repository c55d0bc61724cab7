"""Hostile variants of the packaged real DICOM files, for the worker's fuzz tests.

Each function takes a file's bytes (or a :class:`Source`, which knows where the file's
elements lie) and returns corrupt bytes: cut short, bits flipped, element lengths
wrong, geometry or codestream sizes enormous, sequences nested thousands deep, a
deflate bomb. They build bytes by hand where pydicom's writer would refuse or recurse.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import radq

SAMPLES = Path(radq.__file__).resolve().parent / "samples"
REAL = sorted((SAMPLES / "real").glob("*.dcm")) + [SAMPLES / "tolerant" / "no_meta_no_preamble.dcm"]

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
_CONTENT_SEQUENCE = (0x0040, 0xA730)  # SQ in the dictionary, so implicit VR files read it too
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_UNDEFINED = 0xFFFFFFFF

BIG_VALUES = (0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0x10000000, 0x00FFFFFF, 0xFFFF, 0x10000)
"""Four-byte values that make an element length or a size absurd."""


@dataclass(frozen=True)
class Length:
    """Where one element's length field lies in its file."""

    offset: int
    size: int  # 2 (explicit VR, short VRs) or 4 bytes
    little: bool


@dataclass(frozen=True)
class Source:
    """A real file's bytes and where its top-level elements and pixel data lie."""

    name: str
    data: bytes
    lengths: tuple[Length, ...]
    pixel_header: int | None  # offset of the Pixel Data element's tag
    implicit: bool
    little: bool
    encapsulated: bool


@cache
def source(path: Path) -> Source:
    """Read ``path`` once, noting each top-level element's length field (not its value)."""
    data = path.read_bytes()
    if path.parent.name == "tolerant":
        ds = pydicom.dcmread(io.BytesIO(data[1:]), force=True)  # one stray byte first
        shift = 1
    else:
        ds, shift = pydicom.dcmread(io.BytesIO(data)), 0
    implicit, little = ds.original_encoding
    lengths, pixel_header = [], None
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue
        explicit_vr = None if implicit else raw.VR
        size = 2 if explicit_vr and explicit_vr not in _LONG_VRS else 4
        lengths.append(Length(shift + raw.value_tell - size, size, bool(little)))
        if tag == 0x7FE00010:
            pixel_header = shift + raw.value_tell - (8 if size == 2 or implicit else 12)
    return Source(
        name=path.name,
        data=data,
        lengths=tuple(lengths),
        pixel_header=pixel_header,
        implicit=bool(implicit),
        little=bool(little),
        encapsulated="TransferSyntaxUID" in ds.file_meta and ds.file_meta.TransferSyntaxUID.is_compressed,
    )


def truncate(data: bytes, at: int) -> bytes:
    """The first ``at`` bytes."""
    return data[:at]


def flip_bits(data: bytes, bits: list[int]) -> bytes:
    """Flip each bit index in ``bits`` (taken modulo the file's bits)."""
    out = bytearray(data)
    for bit in bits:
        bit %= 8 * len(out)
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def overwrite(data: bytes, at: int, chunk: bytes) -> bytes:
    """``chunk`` written over the bytes from ``at`` (modulo the size), the size unchanged."""
    at %= len(data)
    return (data[:at] + chunk + data[at + len(chunk) :])[: len(data)]


def wrong_length(src: Source, which: int, value: int) -> bytes:
    """Element number ``which`` (modulo their count) declares ``value`` as its length."""
    field = src.lengths[which % len(src.lengths)]
    value &= (1 << (8 * field.size)) - 1
    raw = value.to_bytes(field.size, "little" if field.little else "big")
    return overwrite(src.data, field.offset, raw)


def set_elements(path: Path, **elements: object) -> bytes:
    """The file re-written by pydicom with the given elements (None deletes one).

    A :class:`DataElement` value is stored as it is, for a VR pydicom cannot infer.
    """
    ds = pydicom.dcmread(path, force=True)
    for keyword, value in elements.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        elif isinstance(value, DataElement):
            ds[value.tag] = value
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def cut_codestream(path: Path, keep: Callable[[bytes], int]) -> bytes:
    """The file with its first frame's codestream cut to its first ``keep(codestream)`` bytes.

    Re-encapsulated, so the DICOM items around it stay whole: what a faulty encoder or a
    damaged archive leaves, which a file cut short does not show.
    """
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
    frames[0] = frames[0][: keep(frames[0])]
    ds.PixelData = encapsulate(frames)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _tag(group_element: tuple[int, int], little: bool) -> bytes:
    order = "little" if little else "big"
    return group_element[0].to_bytes(2, order) + group_element[1].to_bytes(2, order)


def nested_sequences(depth: int, *, implicit: bool, little: bool = True) -> bytes:
    """Content Sequences nested ``depth`` deep, every length undefined, as element bytes."""
    order = "little" if little else "big"
    undefined, zero = _UNDEFINED.to_bytes(4, order), bytes(4)
    sq_header = _tag(_CONTENT_SEQUENCE, little) + (b"" if implicit else b"SQ\0\0") + undefined
    open_item, close_item = _tag(_ITEM, little) + undefined, _tag(_ITEM_END, little) + zero
    close_sequence = _tag(_SEQUENCE_END, little) + zero
    return (sq_header + open_item) * depth + (close_item + close_sequence) * depth


def nest_before_pixels(src: Source, depth: int) -> bytes:
    """The file with ``depth``-deep nested sequences inserted just before its Pixel Data."""
    at = src.pixel_header if src.pixel_header is not None else len(src.data)
    nested = nested_sequences(depth, implicit=src.implicit, little=src.little)
    return src.data[:at] + nested + src.data[at:]


def codestream_size(src: Source, rows: int, columns: int) -> bytes:
    """The first frame's JPEG frame header or JPEG 2000 SIZ declaring another size."""
    if src.pixel_header is None:
        return src.data
    data = bytearray(src.data)
    start = src.pixel_header
    siz = data.find(b"\xff\x4f\xff\x51", start)
    if siz >= 0:  # Xsiz, Ysiz (offsets stay 0 in the samples)
        data[siz + 8 : siz + 12] = (columns & _UNDEFINED).to_bytes(4, "big")
        data[siz + 12 : siz + 16] = (rows & _UNDEFINED).to_bytes(4, "big")
        return bytes(data)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
        sof = data.find(marker, start)
        if sof >= 0:
            data[sof + 5 : sof + 7] = (rows & 0xFFFF).to_bytes(2, "big")
            data[sof + 7 : sof + 9] = (columns & 0xFFFF).to_bytes(2, "big")
            return bytes(data)
    return src.data


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zipped(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("inside.dcm", data)
    return buffer.getvalue()


def preamble_then(data: bytes) -> bytes:
    """A 128-byte preamble and ``DICM``, then ``data`` (no file meta of its own)."""
    return bytes(128) + b"DICM" + data


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose data set inflates to ``inflated_bytes``.

    The data set is an image header and one private OB element of zeros, compressed in
    64 MiB blocks separated by full flushes: the blocks are identical, so the bomb is
    built by repetition in milliseconds, not by compressing a gigabyte.
    """
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality = "OT"
    head = io.BytesIO()
    ds.save_as(head, implicit_vr=False, little_endian=True)
    block = 64 << 20
    blocks = max(1, inflated_bytes // block)
    length = blocks * block
    # (0009,1010) OB: a private element holding the zeros
    element = b"\x09\x00\x10\x10OB\0\0" + length.to_bytes(4, "little")
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    prefix = deflater.compress(head.getvalue() + element) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = deflater.compress(bytes(block)) + deflater.flush(zlib.Z_FULL_FLUSH)
    tail = deflater.flush(zlib.Z_FINISH)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + prefix + zeros * blocks + tail
