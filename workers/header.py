"""Reading one DICOM file into a dataset, its identifying metadata and notes.

The first of two steps (pixels come in :mod:`workers.decode`), so the caller can
record an instance's metadata even when its pixels cannot be decoded. Files are
read tolerantly: a bare dataset without preamble or file meta is accepted when it
holds real DICOM content, and every deviation tolerated becomes a note. Every
per-file problem leaves as an ``InstanceError`` subclass whose ``reason`` a person
can act on; pydicom's own warnings become ``notes``.

Values larger than :data:`DEFER_SIZE` (in practice the pixel data) are not read:
pydicom records where they lie, :mod:`workers.frames` reads only the frames it needs,
and the truncation check compares the declared length with the file's size.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
import pydicom.uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue

from radq.errors import InstanceError, NotDicom

_HEAD_BYTES = 256
_MAX_STRAY_BYTES = 8  # leading junk bytes a tolerant read skips before a bare dataset
_START_GROUPS = {0x0002, 0x0008}  # a bare dataset opens with File Meta or SOP Common
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)+")
_MAX_NOTES = 20

DEFER_SIZE = 1 << 20
"""Element values above this many bytes stay in the file until asked for (pixel data)."""


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
            note = f"pydicom: {record.getMessage()}"[:300]
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


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters, for a reason."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


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
    for offset in offsets:
        attempt: list[str] = []
        with pydicom_notes(attempt):
            try:
                # Stray bytes (rare) shift every offset pydicom records: that file is
                # read from memory, so its deferred values are read from there too.
                source: str | BinaryIO = str(path) if offset == 0 else io.BytesIO(path.read_bytes()[offset:])
                ds = pydicom.dcmread(source, force=True, defer_size=DEFER_SIZE)
                accepted = _has_dicom_content(ds)
            except Exception:
                continue
        if accepted:
            notes.append("read without DICM preamble/file meta (tolerated)")
            if offset:
                notes.append(f"skipped {offset} stray byte(s) before the dataset (tolerated)")
            notes.extend(attempt)
            return ds
    raise NotDicom(_not_dicom_reason(head))


def _read_dataset(path: Path, notes: list[str]) -> Dataset:
    with path.open("rb") as fp:
        head = fp.read(_HEAD_BYTES)
        if not head:
            raise NotDicom("empty file (0 bytes)")
        if head[:2] == b"\x1f\x8b":
            raise NotDicom("gzip-compressed file, not DICOM: decompress it before submitting")
        if head[:4] == b"PK\x03\x04":
            raise NotDicom("zip archive, not DICOM: extract it and submit its files")
        fp.seek(0)
        if head[128:132] == b"DICM":
            return pydicom.dcmread(fp, defer_size=DEFER_SIZE)
    return _read_forced(path, head, notes)


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


def _meta(ds: Dataset) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=element_text(ds, "SOPInstanceUID"),
        study_instance_uid=element_text(ds, "StudyInstanceUID"),
        series_instance_uid=element_text(ds, "SeriesInstanceUID"),
        modality=element_text(ds, "Modality"),
        body_part=element_text(ds, "BodyPartExamined"),
        series_description=element_text(ds, "SeriesDescription"),
        photometric=element_text(ds, "PhotometricInterpretation"),
        transfer_syntax_uid=element_text(ds.file_meta, "TransferSyntaxUID"),
        sop_class_uid=element_text(ds, "SOPClassUID"),
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
        OSError: the file cannot be opened (an environment problem, not the file's).
    """
    notes: list[str] = []
    with pydicom_notes(notes):
        try:
            ds = _read_dataset(path, notes)
            _ensure_transfer_syntax(ds, notes)
            return ds, _meta(ds), notes
        except (InstanceError, OSError):
            raise
        except Exception as exc:
            raise NotDicom(f"unreadable DICOM header: {short_error(exc)}") from None
