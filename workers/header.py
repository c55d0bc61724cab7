"""Reading one DICOM file into a dataset, its identifying metadata and notes.

The first of two steps (pixels come in :mod:`workers.decode`), so the caller can
record an instance's metadata even when its pixels cannot be decoded. Files are
read tolerantly: a bare dataset without preamble or file meta is accepted when it
holds real DICOM content, and every deviation tolerated becomes a note. Every
per-file problem leaves as an ``InstanceError`` subclass whose ``reason`` a person
can act on; pydicom's own warnings become ``notes``. Hostile bytes (cut short, wrong
lengths, sequences nested thousands deep, deflate bombs) end as :class:`MalformedDicom`
naming what is wrong, never as pydicom's own exception.

Values larger than :data:`DEFER_SIZE` (in practice the pixel data) are not read:
pydicom records where they lie, :mod:`workers.frames` reads only the frames it needs,
and the truncation check compares the declared length with the file's size.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
import pydicom.uid as uids
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue

from radq.errors import InstanceError, MalformedDicom, NotDicom, UndecodablePixels

_HEAD_BYTES = 256
_MAX_STRAY_BYTES = 8  # leading junk bytes a tolerant read skips before a bare dataset
_START_GROUPS = {0x0002, 0x0008}  # a bare dataset opens with File Meta or SOP Common
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)+")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls (NUL...), lone surrogates
_MAX_NOTES = 20

DEFER_SIZE = 1 << 20
"""Element values above this many bytes stay in the file until asked for (pixel data)."""

MAX_INFLATED_BYTES = 1 << 30
"""The most a Deflated Explicit VR Little Endian dataset may inflate to.

pydicom inflates the whole dataset in memory, and deflate expands up to 1000-fold:
without this, a 1 MB file could cost a worker 1 GB.
"""


@dataclass(frozen=True)
class InstanceMeta:
    """Identifying metadata of one instance, recorded even when its pixels fail."""

    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    modality: str | None
    body_part: str | None
    series_description: str | None
    photometric: str | None
    transfer_syntax_uid: str | None
    sop_class_uid: str | None = None
    cut_short: str | None = None
    """Set when the file goes on past the last element read: how (see ``_cut_short``)."""


class _NoteCollector(logging.Handler):
    """Sends pydicom's log warnings to the notes of the file this thread is reading.

    pydicom reports every problem both as a log record and as a warning; the log
    record is per-thread-safe to capture, unlike ``warnings.catch_warnings``.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(self.local, "notes", None)
        if notes is not None and len(notes) < _MAX_NOTES:
            note = printable(f"pydicom: {record.getMessage()}", 300)
            if note not in notes:
                notes.append(note)


_COLLECTOR = _NoteCollector()
_INSTALL_LOCK = threading.Lock()
_WARNING_FILTER = ("ignore", None, UserWarning, re.compile(r"pydicom\b"), 0)


@contextmanager
def pydicom_notes(notes: list[str]) -> Iterator[None]:
    """While inside, pydicom's warnings logged by this thread are appended to ``notes``.

    Args:
        notes: the notes of the file being read; at most 20 are kept, without duplicates.
    """
    with _INSTALL_LOCK:
        logger = logging.getLogger("pydicom")
        if _COLLECTOR not in logger.handlers:
            logger.addHandler(_COLLECTOR)
        # The duplicate warning is silenced (the note keeps it); re-added when a
        # test harness resets the filters.
        if _WARNING_FILTER not in warnings.filters:
            warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\b")
    previous = getattr(_COLLECTOR.local, "notes", None)
    _COLLECTOR.local.notes = notes
    try:
        yield
    finally:
        _COLLECTOR.local.notes = previous


def add_note(notes: list[str], note: str) -> None:
    """Append ``note`` unless already there (a file decoded twice notes things once)."""
    if note not in notes:
        notes.append(note)


def printable(text: str, limit: int) -> str:
    """``text`` fit to store and show: control characters (NUL above all, which PostgreSQL
    refuses in text) as ``?``, at most ``limit`` characters.

    File content reaches reasons, notes and metadata: a corrupt length can make a UID
    swallow kilobytes of binary.
    """
    text = _UNSTORABLE.sub("?", text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_storable(text: str) -> bool:
    """Whether ``text`` holds no character :func:`printable` would replace."""
    return _UNSTORABLE.search(text) is None


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters, for a reason."""
    text = str(exc).strip().splitlines()
    return printable(text[0] if text else type(exc).__name__, 200)


def is_environment_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the host's fault (a file that cannot be opened or read), not the file's.

    pydicom reports corrupt structure as ``OSError`` too ("No tag to read at file
    position ..."), but without the ``errno`` every error from the operating system has.
    """
    return isinstance(exc, OSError) and exc.errno is not None


def describe_malformed(exc: BaseException) -> str:
    """What a pydicom parsing or value-conversion exception says is wrong with the file.

    For a reason: one line naming the fault, with pydicom's own words in brackets.
    Exception types that no corrupt file is known to cause are named as unexpected.
    """
    said = f"{type(exc).__name__}: {short_error(exc)}"
    if isinstance(exc, RecursionError):
        return "sequences nested too deeply to read (over a hundred levels of sequence within sequence)"
    if isinstance(exc, MemoryError):
        return "a declared length too large to hold in memory"
    if isinstance(exc, struct.error | EOFError):
        return f"the file ends inside a data element: cut short, or an element length is wrong ({said})"
    if isinstance(exc, OSError) and not is_environment_error(exc):
        return f"a sequence item is cut short or a sequence length is wrong ({said})"
    if isinstance(exc, zlib.error):
        return f"the deflated data set cannot be inflated ({said})"
    if isinstance(exc, NotImplementedError) and "Value Representation" in str(exc):
        return f"an element has an invalid value representation ({short_error(exc)})"
    if isinstance(exc, BytesLengthException):
        return f"an element's length does not fit its value representation ({short_error(exc)})"
    if isinstance(exc, UnicodeError) or type(exc) is LookupError:  # codecs.lookup, not Index/KeyError
        return f"text that its Specific Character Set cannot decode ({said})"
    if isinstance(exc, InvalidDicomError | ValueError):
        return f"an invalid element ({said})"
    return f"unexpected {said}"


def element_text(ds: Dataset, keyword: str) -> str | None:
    """An element's value as stripped text (multiple values joined by ``\\``), or None.

    None when the element is absent, empty, or too malformed to read.
    """
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not cost the whole header
        return None
    if value is None:
        return None
    text = "\\".join(map(str, value)) if isinstance(value, MultiValue | list) else str(value)
    return text.strip() or None


def is_uid(text: str) -> bool:
    """Whether ``text`` has the form of a UID: digits and dots, at most 64 characters."""
    return len(text) <= 64 and _UID_RE.fullmatch(text) is not None


def _has_dicom_content(ds: Dataset) -> bool:
    """Whether a forced read found a real dataset rather than bytes parsed as one."""
    try:
        sop = ds.get("SOPClassUID")
        if sop is not None and _UID_RE.fullmatch(str(sop)):
            return True
        rows, cols = ds.get("Rows"), ds.get("Columns")
        sane = isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0
        return sane and "PixelData" in ds
    except Exception:
        return False


def _plausible_start(head: bytes, offset: int) -> bool:
    """Whether ``head[offset:]`` opens like a data element of a bare dataset."""
    chunk = head[offset : offset + 8]
    if len(chunk) < 8:
        return False
    groups = (int.from_bytes(chunk[:2], "little"), int.from_bytes(chunk[:2], "big"))
    if not _START_GROUPS.intersection(groups):
        return False
    explicit_vr = chunk[4:6].isalpha() and chunk[4:6].isupper()
    return explicit_vr or int.from_bytes(chunk[4:8], "little") < 1 << 24


def _not_dicom_reason(head: bytes) -> str:
    start = head[:40]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in start):
        detail = f"starts with text {start.decode('ascii').strip()!r}"
    else:
        detail = f"first bytes {start[:8].hex(' ')}"
    return f"not a DICOM file: no DICM preamble and no valid dataset ({detail})"


def _read_forced(path: Path, head: bytes, notes: list[str]) -> Dataset:
    offsets = [i for i in range(_MAX_STRAY_BYTES) if _plausible_start(head, i)]
    if not offsets:  # decided on 256 bytes: random or text files are never read in full
        raise NotDicom(_not_dicom_reason(head))
    failure: Exception | None = None
    for offset in offsets:
        attempt: list[str] = []
        with pydicom_notes(attempt):
            try:
                # Stray bytes (rare) shift every offset pydicom records: that file is
                # read from memory, so its deferred values are read from there too.
                source: str | BinaryIO = str(path) if offset == 0 else io.BytesIO(path.read_bytes()[offset:])
                ds = pydicom.dcmread(source, force=True, defer_size=DEFER_SIZE)
                accepted = _has_dicom_content(ds)
            except Exception as exc:  # the next offset may be the right one
                if is_environment_error(exc):
                    raise
                failure = failure or exc
                continue
        if accepted:
            notes.append("read without DICM preamble/file meta (tolerated)")
            if offset:
                notes.append(f"skipped {offset} stray byte(s) before the dataset (tolerated)")
            notes.extend(attempt)
            return ds
    if failure is not None:  # it opens like a bare dataset, then breaks
        raise MalformedDicom(f"malformed DICOM (no preamble or file meta): {describe_malformed(failure)}")
    raise NotDicom(_not_dicom_reason(head))


def _check_inflated_size(fp: BinaryIO) -> None:
    """Refuse a deflated data set that inflates past :data:`MAX_INFLATED_BYTES`.

    Inflates in bounded steps and keeps nothing, before pydicom inflates it whole.
    ``fp`` is at the start of the file; where it is left is unspecified.
    """
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != uids.DeflatedExplicitVRLittleEndian:
        return
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while not inflater.eof and (data := fp.read(1 << 20)):
        while data:
            size += len(inflater.decompress(data, 1 << 24))
            if size > MAX_INFLATED_BYTES:
                raise MalformedDicom(
                    f"deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes "
                    f"(a deflate bomb?): refused before inflating it"
                )
            data = inflater.unconsumed_tail


def _read_dataset(path: Path, notes: list[str]) -> Dataset:
    with path.open("rb") as fp:
        head = fp.read(_HEAD_BYTES)
        if not head:
            raise NotDicom("empty file (0 bytes)")
        if head[:2] == b"\x1f\x8b":
            raise NotDicom("gzip-compressed file, not DICOM: decompress it before submitting")
        if head[:4] == b"PK\x03\x04":
            raise NotDicom("zip archive, not DICOM: extract it and submit its files")
        if head[128:132] == b"DICM":
            fp.seek(0)
            _check_inflated_size(fp)
            fp.seek(0)
            return pydicom.dcmread(fp, defer_size=DEFER_SIZE)
    return _read_forced(path, head, notes)


@contextmanager
def open_source(ds: Dataset) -> Iterator[BinaryIO]:
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
        raise UndecodablePixels("values were left unread in a file that is no longer known")
    with open(filename, "rb") as fp:
        yield fp


def _cut_short(ds: Dataset) -> str | None:
    """How the file goes on past the last element pydicom read, if it does; else None.

    pydicom stops quietly where a file is cut inside an element header, and reads a value
    cut short as whatever bytes are left; without a look, a file cut before its Pixel
    Data passes for an object without pixels. Run before any value is converted (and
    its length forgotten); None where the last element is a sequence.
    """
    last: RawDataElement | None = None
    start = -1
    for elem in ds.values():  # as stored: iterating the dataset would convert every value
        position = elem.value_tell if isinstance(elem, RawDataElement) else getattr(elem, "file_tell", None)
        if position is None:
            return None
        if position > start:
            start, last = position, elem if isinstance(elem, RawDataElement) else None
    if last is None or last.length == _UNDEFINED_LENGTH:
        return None
    with open_source(ds) as fp:
        size = fp.seek(0, io.SEEK_END)
    end = last.value_tell + last.length
    if end > size:
        return (
            f"the file ends at byte {size}, inside element {last.tag}, which declares {last.length} "
            "bytes (cut short, or a wrong length)"
        )
    if end < size:
        return f"the {size - end} byte(s) after element {last.tag} are no data element (cut short? corrupt?)"
    return None


def _ensure_transfer_syntax(ds: Dataset, notes: list[str]) -> None:
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    # pydicom sniffed the encoding to parse the dataset; its decoders need it as a UID
    implicit, little = ds.original_encoding
    ts = uids.ImplicitVRLittleEndian if implicit else uids.ExplicitVRLittleEndian
    ts = ts if little is not False else uids.ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ts
    notes.append(f"no Transfer Syntax UID: assumed {ts.name}, as the data is encoded (tolerated)")


def _stored(ds: Dataset, keyword: str, limit: int, notes: list[str]) -> str | None:
    """An element's text for a database column of ``limit`` characters, or None (noted).

    A value longer than the column, or holding control characters, is not what the
    element can hold (a corrupt length made it swallow what follows): it is left out.
    """
    text = element_text(ds, keyword)
    if text is None or (len(text) <= limit and is_storable(text)):
        return text
    add_note(notes, f"{keyword} ignored: {len(text)} characters of overlong or binary text (corrupt length?)")
    return None


def _meta(ds: Dataset, notes: list[str], cut_short: str | None) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=_stored(ds, "SOPInstanceUID", 64, notes),
        study_instance_uid=_stored(ds, "StudyInstanceUID", 64, notes),
        series_instance_uid=_stored(ds, "SeriesInstanceUID", 64, notes),
        modality=_stored(ds, "Modality", 16, notes),
        body_part=_stored(ds, "BodyPartExamined", 64, notes),
        series_description=_stored(ds, "SeriesDescription", 1024, notes),
        photometric=element_text(ds, "PhotometricInterpretation"),
        transfer_syntax_uid=element_text(ds.file_meta, "TransferSyntaxUID"),
        sop_class_uid=element_text(ds, "SOPClassUID"),
        cut_short=cut_short,
    )


def read_header(path: Path) -> tuple[Dataset, InstanceMeta, list[str]]:
    """Parse one file without decoding, or reading, its pixels.

    Files without the 128-byte preamble and ``DICM`` prefix are read with
    ``force=True`` only when the result holds real DICOM content. Values over
    :data:`DEFER_SIZE` bytes are left in the file (pydicom's ``defer_size``), so a
    header read costs the same for a 16x16 CR and a 2 GB multi-frame ultrasound.

    Args:
        path: the file to read.

    Returns:
        The dataset, its metadata, and notes on tolerated deviations.

    Raises:
        NotDicom: the file is empty, compressed, or not a DICOM dataset.
        MalformedDicom: the file is DICOM but corrupt: cut short, wrong element lengths
            or values, sequences nested too deeply, a deflate bomb.
        OSError: the file cannot be opened (an environment problem, not the file's).
    """
    notes: list[str] = []
    with pydicom_notes(notes):
        try:
            ds = _read_dataset(path, notes)
            if not len(ds):
                raise MalformedDicom("malformed DICOM: no data set: the file ends after its file meta")
            cut_short = _cut_short(ds)
            _ensure_transfer_syntax(ds, notes)
            return ds, _meta(ds, notes, cut_short), notes
        except InstanceError:
            raise
        except Exception as exc:  # pydicom raises a dozen types on hostile bytes: each is the file's
            if is_environment_error(exc):
                raise
            raise MalformedDicom(f"malformed DICOM: {describe_malformed(exc)}") from None
