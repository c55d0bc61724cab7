"""Reading, decoding and preprocessing one claimed instance for the models that apply.

Runs in the worker's decode threads; never raises for a bad file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from db.status import InstanceStatus, StorageKind
from db.work import Claimed
from radq.blobs import sha256_of
from radq.errors import InstanceError
from workers.context import WorkerContext
from workers.decode import DecodedImage, check_image, decode
from workers.header import InstanceMeta, printable, read_header, short_error
from workers.models.loader import LoadedModel
from workers.preprocess import preprocess

log = logging.getLogger(__name__)

_MAX_REASON = 1000


def _joined(notes: Sequence[str]) -> str | None:
    """Notes for their column; they quote file content, so none of it unstorable."""
    return printable("; ".join(notes), 20_000) or None


@dataclass
class Prepared:
    """One claimed instance after decoding: model inputs, or why there are none."""

    claimed: Claimed
    metadata: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    status: str | None = None
    reason: str | None = None


def _metadata_columns(instance_id: int, meta: InstanceMeta, notes: Sequence[str]) -> dict[str, Any]:
    return {
        "id": instance_id,
        "sop_instance_uid": meta.sop_instance_uid,
        "study_instance_uid": meta.study_instance_uid,
        "series_instance_uid": meta.series_instance_uid,
        "modality": meta.modality,
        "body_part": meta.body_part,
        "series_description": meta.series_description,
        "notes": _joined(notes),
    }


def applies(model: LoadedModel, meta: InstanceMeta) -> bool:
    return model.card.applies_to.matches(
        modality=meta.modality,
        body_part=meta.body_part,
        sop_class=meta.sop_class_uid,
        photometric=meta.photometric,
    )


@dataclass
class Header:
    """Phase one: a readable instance's dataset (pixels left in the file) and identity."""

    claimed: Claimed
    ds: Dataset
    meta: InstanceMeta
    notes: list[str]
    content_sha256: str
    metadata: dict[str, Any]


@contextmanager
def _recorded(out: Prepared, path: Path) -> Iterator[None]:
    """Turn any per-file problem into ``out.status``/``out.reason``; nothing escapes."""
    try:
        yield
    except InstanceError as exc:
        # Reasons quote file content: never let a NUL or a kilobyte of it reach the database.
        out.status, out.reason = exc.status, printable(exc.reason, _MAX_REASON)
    except FileNotFoundError:
        out.status, out.reason = InstanceStatus.FAILED, f"file not found: {path}"
    except OSError as exc:
        detail = exc.strerror or short_error(exc)
        out.status, out.reason = InstanceStatus.FAILED, f"file not readable: {path}: {detail}"
    except Exception as exc:  # a decoder bug must cost one file, not the chunk
        log.exception("unexpected error preparing instance %s", out.claimed.id)
        out.status = InstanceStatus.FAILED
        out.reason = f"unexpected error while reading the file: {type(exc).__name__}: {short_error(exc)}"


def read(claimed: Claimed, *, ctx: WorkerContext) -> Header | Prepared:
    """Read the header, check the image can be decoded at all, and hash the content.

    Returns a :class:`Prepared` carrying the failure when the file is unusable.
    """
    out = Prepared(claimed)
    path = ctx.locate(claimed.storage, claimed.location)
    with _recorded(out, path):
        ds, meta, notes = read_header(path)
        out.metadata = _metadata_columns(claimed.id, meta, notes)
        # Uploads are stored under their hash; files read in place are hashed here.
        sha = claimed.location if claimed.storage == StorageKind.BLOB else sha256_of(path)
        out.metadata["content_sha256"] = sha
        check_image(ds, meta)  # a broken file is reported as broken, routed or not
        return Header(claimed, ds, meta, notes, sha, out.metadata)
    return out


def prepare(header: Header, *, ctx: WorkerContext, models: Sequence[LoadedModel]) -> Prepared:
    """Decode and preprocess one instance for every model that applies to it.

    Never raises for a bad file: the failure is returned with its reason.
    """
    out = Prepared(header.claimed, metadata=header.metadata)
    meta, notes = header.meta, header.notes
    applicable = [m for m in models if applies(m, meta)]
    if not applicable:
        what = " ".join(filter(None, [meta.modality, meta.body_part])) or "an instance without Modality"
        names = ", ".join(m.card.name for m in models) or "none"
        out.status, out.reason = InstanceStatus.SKIPPED, f"no model for {what} (models tried: {names})"
        return out
    with _recorded(out, ctx.locate(header.claimed.storage, header.claimed.location)):
        images: dict[str, DecodedImage] = {}  # one decode per frame policy
        by_recipe: dict[str, np.ndarray] = {}
        for model in applicable:
            policy = model.card.preprocessing.frame
            if policy not in images:
                images[policy] = decode(
                    header.ds, meta, notes, max_pixels=ctx.settings.max_image_pixels, frame=policy
                )
            recipe = model.card.preprocessing_recipe
            if recipe not in by_recipe:  # (frames, channels, height, width)
                by_recipe[recipe] = preprocess(images[policy], model.card.input, model.card.preprocessing)
            out.inputs[model.card.name] = by_recipe[recipe]
        out.metadata["notes"] = _joined(notes)  # decode appended its notes
    return out
