"""Not inferring twice: an instance whose SOPInstanceUID and content were already
processed by the same model versions reuses those results and ends ``skipped``."""

from __future__ import annotations

from collections.abc import Sequence

import radq
from db.status import InstanceStatus
from db.work import ResultRow, find_reusable
from workers.batching import Pending
from workers.context import WorkerContext
from workers.models.loader import LoadedModel
from workers.prepare import Header, applies


def reuse_known(
    ctx: WorkerContext, headers: Sequence[Header], models: Sequence[LoadedModel], pending: Pending
) -> list[Header]:
    """Record reused results for already-processed instances; return the rest.

    One query for the whole chunk. An instance is reused only when every model that
    applies to it has an earlier result for the same content.
    """
    keys = [(h.meta.sop_instance_uid, h.content_sha256) for h in headers if h.meta.sop_instance_uid]
    versions = [(m.card.name, m.card.version) for m in models]
    with ctx.sessions() as session:
        known = find_reusable(session, [(uid, sha) for uid, sha in keys if uid], versions)
    if not known:
        return list(headers)
    fresh = []
    for header in headers:
        uid, sha = header.meta.sop_instance_uid, header.content_sha256
        wanted = [m for m in models if applies(m, header.meta)]
        earlier = [known.get((uid or "", sha, m.card.name)) for m in wanted]
        if not wanted or any(r is None for r in earlier):
            fresh.append(header)
            continue
        pending.metadata.append(header.metadata)
        for result in earlier:
            assert result is not None
            pending.results.append(
                ResultRow(
                    instance_id=header.claimed.id,
                    model=result.model,
                    model_version=result.model_version,
                    weights_sha256=result.weights_sha256,
                    radq_version=radq.__version__,
                    preprocessing=result.preprocessing,
                    outputs=result.outputs,
                    saliency=result.saliency,
                    reused_from=result.id,
                )
            )
        used = ", ".join(f"{r.model} {r.model_version} (result {r.id})" for r in earlier if r)
        reason = f"already processed: same SOPInstanceUID and content; reused {used}"
        pending.outcomes.append((header.claimed.id, InstanceStatus.SKIPPED, reason))
    return fresh

