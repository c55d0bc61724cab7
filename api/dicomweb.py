"""STOW-RS (DICOM PS3.18 §10.5): reading a multipart/related body and answering for each part.

The body is spooled as it arrives (:mod:`api.multipart`: each part straight to its own
file beside the blob store, so a 2 GB study costs disk, not RAM). The parts are checked
(PS3.10 header, UIDs, study) only once the closing boundary has been seen, so a body cut
short stores nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from python_multipart.multipart import parse_options_header

from api.ingest import Ingest, SpooledFile
from api.multipart import DICOM, MalformedMultipart, Part
from radq.errors import StorageFull, SubmissionError

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
_DEFER_SIZE = 1024 * 1024
"""Header values larger than this are not read while checking a part."""
_MAX_WARNINGS = 50
"""Warning headers sent at most; the rest are summed up in one more."""


class UnsupportedMediaType(SubmissionError):
    """Raised when a STOW-RS request is not ``multipart/related; type="application/dicom"``."""


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values, PS3.18 Table I.2-2."""

    OUT_OF_RESOURCES = 0xA700
    """Refused out of resources: the part could not be written to the blob store."""
    DOES_NOT_MATCH = 0xA900
    """Data set does not match SOP class: a required UID is missing, or the study differs."""
    CANNOT_UNDERSTAND = 0xC000
    """Cannot understand: not a PS3.10 DICOM file, or a part that is not application/dicom."""


@dataclass
class Instance:
    """A part that is a DICOM instance radq accepts."""

    part: Part
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str


@dataclass
class Failure:
    """A part that was not stored, with the code for the response and a reason for a person."""

    part_number: int
    code: FailureReason
    reason: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request, after checking its media type.

    The ``type`` parameter may be quoted or not; parameter names are case-insensitive.

    Raises:
        UnsupportedMediaType: not multipart/related, or its ``type`` is not application/dicom.
        MalformedMultipart: the boundary parameter is missing.
    """
    media, raw = parse_options_header(content_type)
    params = {k.strip().lower(): v.strip().strip(b'"') for k, v in raw.items()}
    expected = 'multipart/related; type="application/dicom"; boundary=...'
    if media.strip() != b"multipart/related":
        shown = content_type.split(";")[0].strip() or "no Content-Type"
        raise UnsupportedMediaType(
            f"{shown} is not supported for STOW-RS: send {expected}, one DICOM file (PS3.10) per part"
        )
    root = params.get(b"type", b"").split(b";")[0].strip().lower().decode("latin-1")
    if not root:
        raise UnsupportedMediaType(
            f"multipart/related without a type parameter: send {expected}; radq stores only "
            "application/dicom parts"
        )
    if root != DICOM:
        raise UnsupportedMediaType(
            f'multipart/related; type="{root}" is not supported: radq accepts only type="{DICOM}" '
            "(whole DICOM files, not metadata with bulk data)"
        )
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise MalformedMultipart(f"the Content-Type has no boundary parameter: send {expected}")
    return boundary


def accepts_dicom_json(accept: str | None) -> bool:
    """Whether an Accept header allows the application/dicom+json response."""
    if not accept or not accept.strip():
        return True
    ok = {"*/*", "application/*", DICOM_JSON, "application/json"}
    return any(item.split(";")[0].strip().lower() in ok for item in accept.split(","))


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value reads as missing, with the others still reported
        return ""
    return str(value).strip("\x00 ") if value is not None else ""


def check_part(part: Part, study: str | None) -> Instance | Failure:
    """Read one part's DICOM header and decide whether radq stores it.

    Args:
        part: the spooled part.
        study: the StudyInstanceUID from ``/studies/{study}``, or None.
    """
    n = part.number
    if part.path is None:
        return Failure(
            n,
            FailureReason.CANNOT_UNDERSTAND,
            f"part {n} has Content-Type {part.content_type}, not {DICOM}",
        )
    if part.size == 0:
        return Failure(n, FailureReason.CANNOT_UNDERSTAND, f"part {n} is empty (0 bytes)")
    try:
        # Header only, and large non-pixel values (encapsulated documents) left unread.
        ds = pydicom.dcmread(part.path, stop_before_pixels=True, force=False, defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        return Failure(
            n,
            FailureReason.CANNOT_UNDERSTAND,
            f"part {n} is not a DICOM file: it lacks the 128-byte preamble and 'DICM' prefix of "
            "PS3.10 that STOW-RS requires",
        )
    except Exception as exc:  # pydicom raises many types on hostile bytes; each is this part's fault
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return Failure(n, FailureReason.CANNOT_UNDERSTAND, f"part {n}: unreadable DICOM header ({first})")
    uids = {keyword: _uid(ds, keyword) for keyword in _REQUIRED_UIDS}
    sop_class, sop_instance, study_uid = (uids[k] for k in _REQUIRED_UIDS)
    if len(ds) == 0:
        return Failure(
            n,
            FailureReason.CANNOT_UNDERSTAND,
            f"part {n} has a file meta header but no data set after it (cut short?)",
        )
    missing = [k for k in _REQUIRED_UIDS if not uids[k]]
    if missing:
        return Failure(
            n,
            FailureReason.DOES_NOT_MATCH,
            f"part {n} lacks {', '.join(missing)} (required; is the header cut short?)",
            sop_class,
            sop_instance,
        )
    if study is not None and study_uid != study:
        return Failure(
            n,
            FailureReason.DOES_NOT_MATCH,
            f"part {n} (SOPInstanceUID {sop_instance}) belongs to study {study_uid}, "
            f"not to {study} named in the URL",
            sop_class,
            sop_instance,
        )
    return Instance(part, sop_class, sop_instance, study_uid)


@dataclass
class Outcome:
    """What became of every part of one request."""

    stored: list[Instance] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


def store_instances(ingest: Ingest, instances: list[Instance], outcome: Outcome) -> None:
    """Stage every accepted part in ``ingest``; the submission's commit stores them together
    (S3: several at once).

    Raises:
        LimitExceeded: the parts pass ``RADQ_MAX_UPLOAD_BYTES`` together.
    """
    staged = []
    for inst in instances:
        part = inst.part
        assert part.path is not None  # accepted parts always have a spool file
        staged.append(SpooledFile(f"stow-rs/{inst.sop_instance_uid}.dcm", part.path, part.sha256, part.size))
    ingest.add_spooled_files(staged)
    outcome.stored.extend(instances)


def not_stored(instances: list[Instance], exc: OSError | StorageFull) -> list[Failure]:
    """The 0xA700 failures of parts the blob store could not take (disk full, I/O error)."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return [
        Failure(
            inst.part.number,
            FailureReason.OUT_OF_RESOURCES,
            f"part {inst.part.number} could not be stored: {why}",
            inst.sop_class_uid,
            inst.sop_instance_uid,
        )
        for inst in instances
    ]


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def response_dataset(outcome: Outcome, retrieve_url: str) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON.

    Args:
        outcome: stored and failed parts.
        retrieve_url: the top-level Retrieve URL (Type 2: empty when nothing was stored).
    """
    ds = Dataset()
    ds.RetrieveURL = retrieve_url
    if outcome.failed:
        failed = []
        for failure in sorted(outcome.failed, key=lambda f: f.part_number):
            item = _reference(failure.sop_class_uid, failure.sop_instance_uid)
            item.FailureReason = int(failure.code)
            failed.append(item)
        ds.FailedSOPSequence = failed
    if outcome.stored:
        stored = []
        for inst in outcome.stored:
            item = _reference(inst.sop_class_uid, inst.sop_instance_uid)
            # Type 2 and empty: radq keeps no copy to serve over WADO-RS.
            item.RetrieveURL = ""
            stored.append(item)
        ds.ReferencedSOPSequence = stored
    return ds.to_json_dict()


_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def warning_headers(failures: list[Failure]) -> list[str]:
    """``Warning: 299 radq "..."`` values (RFC 7234, as PS3.18 §8.x uses them), one per failed part."""
    ordered = sorted(failures, key=lambda f: f.part_number)
    values = [f'299 radq "{_UNSAFE.sub("?", f.reason)[:300]}"' for f in ordered[:_MAX_WARNINGS]]
    if len(ordered) > _MAX_WARNINGS:
        values.append(f'299 radq "and {len(ordered) - _MAX_WARNINGS} more failed part(s)"')
    return values
