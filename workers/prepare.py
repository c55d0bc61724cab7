"""Reading and decoding one claimed instance, in a decode process; never raises for a bad file.

Both functions are module-level so :class:`workers.procpool.ProcessPool` can run them by
reference. They take model cards, not loaded models: decode processes never import torch
(pixels leave as the decoded integers; :mod:`workers.device_prep` finishes them on the
model's device).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_partial
from pydicom.uid import DeflatedExplicitVRLittleEndian

from db.status import InstanceStatus, StorageKind
from db.work import Claimed
from radq.blobs import NO_ROOM, BlobStore, sha256_of
from radq.errors import BlobStoreUnavailable, InstanceError, ModelError
from radq.logs import log_context
from radq.model_card import ModelCard
from workers.decode import DecodedImage, check_image, decode
from workers.device_prep import RawFrame, finish_on_host, raw_frames
from workers.header import (
    DEFER_SIZE,
    InstanceMeta,
    element_text,
    is_uid,
    printable,
    pydicom_notes,
    read_header,
    short_error,
)
from workers.phi import patient_pseudonym, patient_values, redact

log = logging.getLogger(__name__)

_MAX_REASON = 1000


def _joined(notes: Sequence[str], patient: list[str]) -> str | None:
    """Notes for their column; they quote file content, so none of it unstorable or identifying."""
    return printable(redact("; ".join(notes), patient) or "", 20_000) or None


@dataclass(frozen=True)
class StoredBlob:
    """An uploaded file: the decode process takes it from the store itself.

    From S3 that is a download to a temporary file, removed once the file is read, so
    downloads run in parallel across decode processes, overlapping inference.
    """

    store: BlobStore
    sha256: str

    def __str__(self) -> str:
        return f"uploaded file {self.sha256} in {self.store.url}"


Source = Path | StoredBlob
"""Where a decode process finds an instance's bytes: a path on this host, or a blob."""


@contextmanager
def _local(source: Source) -> Iterator[Path]:
    if isinstance(source, Path):
        yield source
    else:
        with source.store.fetch(source.sha256) as path:
            yield path


@dataclass
class Prepared:
    """One claimed instance after reading: its columns, its model inputs, or why there are none.

    ``status`` None means usable: ``inputs`` holds the frames of every applicable model
    (after :func:`load`), or nothing yet (after :func:`inspect`).
    """

    claimed: Claimed
    metadata: dict[str, Any] = field(default_factory=dict)
    meta: InstanceMeta | None = None
    inputs: dict[str, list[RawFrame]] = field(default_factory=dict)
    status: str | None = None
    reason: str | None = None
    decode_s: float | None = None
    """Seconds :func:`load` took in the decode process (None: it did not run there)."""
    patient: list[str] = field(default_factory=list, repr=False)
    """The file's patient values, cut out of notes and reasons; cleared before leaving the process."""

    def fail(self, status: str, reason: str) -> None:
        # Reasons quote file content: never let a NUL, a kilobyte of it or a patient's name
        # reach the database.
        self.status, self.reason = status, printable(redact(reason, self.patient) or "", _MAX_REASON)


def _read(out: Prepared, path: Path, pseudonym_key: bytes) -> tuple[Dataset, InstanceMeta, list[str]]:
    """Read the header into ``out``: metadata columns, the patient's pseudonym, no patient values."""
    ds, meta, notes = read_header(path)
    with pydicom_notes(notes):  # reading patient elements may warn, quoting them: into the notes
        out.patient = patient_values(ds)
        pseudonym = patient_pseudonym(ds, pseudonym_key)
    out.meta = meta
    out.metadata = _metadata_columns(out.claimed.id, meta, notes, out.patient)
    out.metadata["patient_pseudonym"] = pseudonym
    return ds, meta, notes


def _metadata_columns(
    instance_id: int, meta: InstanceMeta, notes: Sequence[str], patient: list[str]
) -> dict[str, Any]:
    return {
        "id": instance_id,
        "sop_instance_uid": meta.sop_instance_uid,
        "study_instance_uid": meta.study_instance_uid,
        "series_instance_uid": meta.series_instance_uid,
        "modality": meta.modality,
        "body_part": meta.body_part,
        "series_description": meta.series_description,
        "notes": _joined(notes, patient),
    }


def applies(card: ModelCard, meta: InstanceMeta) -> bool:
    return card.applies_to.matches(
        modality=meta.modality,
        body_part=meta.body_part,
        sop_class=meta.sop_class_uid,
        photometric=meta.photometric,
    )


@contextmanager
def _recorded(out: Prepared, path: Source) -> Iterator[None]:
    """Turn any per-file problem into ``out.status``/``out.reason``; nothing escapes.

    ``out.patient`` is emptied on the way out: patient values never leave the decode process.
    """
    try:
        yield
    except InstanceError as exc:
        out.fail(exc.status, exc.reason)
    except BlobStoreUnavailable as exc:  # after boto3's own retries
        out.fail(InstanceStatus.FAILED, f"{exc}; retry the job once the blob store answers")
    except FileNotFoundError:
        out.fail(InstanceStatus.FAILED, f"file not found: {path}")
    except OSError as exc:
        detail = exc.strerror or short_error(exc)
        if exc.errno in NO_ROOM:  # this host's disk, not the file: S3 downloads to a local spool
            out.fail(InstanceStatus.FAILED, f"this worker has no room left to fetch {path} ({detail}); "
                     "retry the job once it has")  # fmt: skip
        else:
            out.fail(InstanceStatus.FAILED, f"file not readable: {path}: {detail}")
    except Exception as exc:  # a decoder bug must cost one file, not the chunk
        log.exception("unexpected error preparing instance %s", out.claimed.id)
        out.fail(
            InstanceStatus.FAILED,
            f"unexpected error while reading the file: {type(exc).__name__}: {short_error(exc)}",
        )
    finally:
        out.patient = []


@dataclass(frozen=True)
class ContentKey:
    """What deduplication matches an instance on; None where it could not be read cheaply."""

    sop_instance_uid: str | None
    sha256: str | None


SOP_INSTANCE_UID = 0x00080018


def _past_sop_instance_uid(tag: int, vr: str | None, length: int) -> bool:
    """Where the light read stops: at the first element after SOPInstanceUID."""
    return tag > SOP_INSTANCE_UID


KEY_HEAD_BYTES = 64 << 10
"""What the light read takes of an upload: a ranged read of its start, not the whole blob
(from S3 a download, which :func:`load` then makes again). SOPInstanceUID lies within the
first kilobyte of ordinary files; a file whose UID lies further on has no cheap key."""


def _sop_instance_uid(fp: BinaryIO, size: int) -> str | None:
    """SOPInstanceUID from the elements before it, or None (no preamble, deflated, malformed,
    or not whole within the ``size`` bytes ``fp`` holds).

    None only means "not known cheaply": the instance is then decoded as new, and
    :func:`load`'s full read reports whatever is wrong with the file.
    """
    if fp.read(132)[128:] != b"DICM":
        return None
    meta = _read_file_meta_info(fp)
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or syntax == DeflatedExplicitVRLittleEndian:  # inflating is read_header's job
        return None
    fp.seek(0)
    # defer_size: a corrupt length before the UID must not read gigabytes into memory
    ds = read_partial(fp, stop_when=_past_sop_instance_uid, defer_size=DEFER_SIZE)
    raw = ds.get_item(SOP_INSTANCE_UID, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value_tell + raw.length > size:
        return None  # cut off: a prefix of the UID would only miss its earlier results
    uid = element_text(ds, "SOPInstanceUID")
    return uid if uid is not None and is_uid(uid) else None


def _content_key(source: Source) -> ContentKey:
    if isinstance(source, StoredBlob):  # uploads are stored under their hash
        head = source.store.read_head(source.sha256, KEY_HEAD_BYTES)
        return ContentKey(_sop_instance_uid(io.BytesIO(head), len(head)), source.sha256)
    sha = sha256_of(source)
    with source.open("rb") as fp:
        return ContentKey(_sop_instance_uid(fp, os.fstat(fp.fileno()).st_size), sha)


def content_keys(items: Sequence[tuple[Claimed, Source]]) -> list[ContentKey]:
    """The :class:`ContentKey` of each ``(claimed, source)``; never raises.

    Reads the file's elements up to SOPInstanceUID (of an upload, only its first
    :data:`KEY_HEAD_BYTES`) and hashes files read in place: about 0.8 ms for a 512x512 CT
    slice, where :func:`inspect` (the whole header and an image check) takes 2.5 and
    :func:`load` then parses the header again.
    """
    keys = []
    for claimed, source in items:
        key = ContentKey(None, None)
        with log_context(job_id=claimed.job_id, instance_id=claimed.id), pydicom_notes([]):
            try:
                key = _content_key(source)
            except Exception:  # unreadable or hostile: load reports it with its reason
                log.debug("no content key for instance %s", claimed.id, exc_info=True)
        keys.append(key)
    return keys


def inspect(claimed: Claimed, source: Source, pseudonym_key: bytes) -> Prepared:
    """Header, content hash and a check that the image can be decoded at all; no pixels.

    What a chunk asking for reuse of earlier results needs before deciding what to decode.
    ``pseudonym_key`` keys the HMAC that stands for the PatientID.
    """
    out = Prepared(claimed)
    with (
        log_context(job_id=claimed.job_id, instance_id=claimed.id),
        _recorded(out, source),
        _local(source) as path,
    ):
        ds, meta, _ = _read(out, path, pseudonym_key)
        # Uploads are stored under their hash; files read in place are hashed here.
        sha = sha256_of(path) if claimed.storage == StorageKind.PATH else claimed.location
        out.metadata["content_sha256"] = sha
        check_image(ds, meta)  # a broken file is reported as broken, routed or not
    return out


def load(
    claimed: Claimed,
    source: Source,
    pseudonym_key: bytes,
    cards: Sequence[ModelCard],
    max_pixels: int,
    content_sha256: str | None = None,
    *,
    finish_pixels: int | None = None,
) -> Prepared:
    """Read, check, route and decode one instance into raw frames for every card that applies.

    ``content_sha256`` skips hashing a file :func:`inspect` already hashed; ``pseudonym_key``
    keys the HMAC that stands for the PatientID. The time it takes travels back in
    ``decode_s`` (the worker's decode-latency metric). ``finish_pixels``: also preprocess
    here, into finished model inputs (:func:`workers.device_prep.finish_on_host`), the
    frames of at least that many pixels (0: every frame; None: none).
    """
    started = time.perf_counter()
    out = Prepared(claimed)
    with (
        log_context(job_id=claimed.job_id, instance_id=claimed.id),
        _recorded(out, source),
        _local(source) as path,
    ):
        _load_into(out, path, pseudonym_key, cards, max_pixels, content_sha256, finish_pixels)
    out.decode_s = time.perf_counter() - started
    return out


def load_group(
    items: Sequence[tuple[Claimed, Source, str | None]],
    pseudonym_key: bytes,
    cards: Sequence[ModelCard],
    max_pixels: int,
    *,
    finish_pixels: int | None = None,
) -> list[Prepared]:
    """:func:`load` for each ``(claimed, source, content_sha256)``, in order: several
    instances per round trip to a decode process (see ``workers.engine.GROUP_MAX``)."""
    return [
        load(claimed, source, pseudonym_key, cards, max_pixels, sha, finish_pixels=finish_pixels)
        for claimed, source, sha in items
    ]


def _finish_large(frames: list[RawFrame], card: ModelCard, least_pixels: int) -> list[RawFrame]:
    """``frames``, those of at least ``least_pixels`` (rows x columns) finished here."""
    large = [i for i, f in enumerate(frames) if f.pixels.shape[0] * f.pixels.shape[1] >= least_pixels]
    if not large:
        return frames
    finished = finish_on_host([frames[i] for i in large], card.input, card.preprocessing)
    out = list(frames)
    for i, frame in zip(large, finished, strict=True):
        out[i] = frame
    return out


def _load_into(
    out: Prepared,
    path: Path,
    pseudonym_key: bytes,
    cards: Sequence[ModelCard],
    max_pixels: int,
    content_sha256: str | None,
    finish_pixels: int | None,
) -> None:
    """The body of :func:`load`; per-file problems escape to its ``_recorded``."""
    claimed = out.claimed
    ds, meta, notes = _read(out, path, pseudonym_key)
    if content_sha256 is None:
        content_sha256 = sha256_of(path) if claimed.storage == StorageKind.PATH else claimed.location
    out.metadata["content_sha256"] = content_sha256
    check_image(ds, meta)
    applicable = [card for card in cards if applies(card, meta)]
    if not applicable:
        what = " ".join(filter(None, [meta.modality, meta.body_part])) or "an instance without Modality"
        names = ", ".join(card.name for card in cards) or "none"
        out.fail(InstanceStatus.SKIPPED, f"no model for {what} (models tried: {names})")
        return
    images: dict[str, DecodedImage] = {}  # one decode per frame policy
    by_recipe: dict[str, list[RawFrame]] = {}
    for card in applicable:
        policy = card.preprocessing.frame
        if policy not in images:
            cards = [c for c in applicable if c.preprocessing.frame == policy]
            luminance = all(c.input.channels == 1 for c in cards)  # Y of YCbCr is enough
            images[policy] = decode(
                ds, meta, notes, max_pixels=max_pixels, frame=policy, luminance=luminance
            )
        recipe = card.preprocessing_recipe
        if recipe not in by_recipe:
            frames = raw_frames(images[policy], card.input, card.preprocessing)
            if finish_pixels is not None:
                try:
                    frames = _finish_large(frames, card, finish_pixels)
                except ModelError as exc:
                    out.fail(InstanceStatus.FAILED, f"preprocessing for model {card.name} failed: {exc}")
                    return
            by_recipe[recipe] = frames
        out.inputs[card.name] = by_recipe[recipe]
    out.metadata["notes"] = _joined(notes, out.patient)  # decode appended its notes
