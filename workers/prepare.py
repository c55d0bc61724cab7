"""Reading, decoding and preprocessing one claimed instance for the models that apply.

Runs in the worker's decode threads; never raises for a bad file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from db.status import InstanceStatus
from db.work import Claimed
from radq.errors import InstanceError
from workers.context import WorkerContext
from workers.decode import DecodedImage, check_image, decode
from workers.header import InstanceMeta, read_header
from workers.models.loader import LoadedModel
from workers.preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One claimed instance after decoding: model inputs, or why there are none."""

    claimed: Claimed
    metadata: dict[str, Any] | None = None
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
        "notes": "; ".join(notes) or None,
    }


def _applies(model: LoadedModel, meta: InstanceMeta) -> bool:
    return model.card.applies_to.matches(
        modality=meta.modality,
        body_part=meta.body_part,
        sop_class=meta.sop_class_uid,
        photometric=meta.photometric,
    )


def prepare(claimed: Claimed, *, ctx: WorkerContext, models: Sequence[LoadedModel]) -> Prepared:
    """Read, decode and preprocess one instance for every model that applies to it.

    Never raises for a bad file: the failure is returned with its reason.
    """
    out = Prepared(claimed)
    path = ctx.locate(claimed.storage, claimed.location)
    try:
        ds, meta, notes = read_header(path)
        out.metadata = _metadata_columns(claimed.id, meta, notes)
        check_image(ds, meta)  # a broken file is reported as broken, routed or not
        applicable = [m for m in models if _applies(m, meta)]
        if not applicable:
            what = " ".join(filter(None, [meta.modality, meta.body_part])) or "an instance without Modality"
            names = ", ".join(m.card.name for m in models) or "none"
            out.status, out.reason = InstanceStatus.SKIPPED, f"no model for {what} (models tried: {names})"
            return out
        images: dict[str, DecodedImage] = {}  # one decode per frame policy
        by_recipe: dict[str, np.ndarray] = {}
        for model in applicable:
            policy = model.card.preprocessing.frame
            if policy not in images:
                images[policy] = decode(
                    ds, meta, notes, max_pixels=ctx.settings.max_image_pixels, frame=policy
                )
            recipe = model.card.preprocessing_recipe
            if recipe not in by_recipe:  # (frames, channels, height, width)
                by_recipe[recipe] = preprocess(images[policy], model.card.input, model.card.preprocessing)
            out.inputs[model.card.name] = by_recipe[recipe]
        if out.metadata is not None:  # decode appended its notes to the header's
            out.metadata["notes"] = "; ".join(notes) or None
    except InstanceError as exc:
        out.status, out.reason = exc.status, exc.reason
    except FileNotFoundError:
        out.status, out.reason = InstanceStatus.FAILED, f"file not found: {path}"
    except OSError as exc:
        out.status, out.reason = InstanceStatus.FAILED, f"file not readable: {path}: {exc.strerror}"
    except Exception as exc:  # a decoder bug must cost one file, not the chunk
        log.exception("unexpected error preparing instance %s", claimed.id)
        out.status = InstanceStatus.FAILED
        out.reason = f"unexpected error while reading the file: {type(exc).__name__}: {exc}"
    return out
