"""Not inferring twice: an instance whose SOPInstanceUID and content were already
processed by the same model versions reuses those results and ends ``skipped``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy.orm import Session, sessionmaker

import radq
from db.status import InstanceStatus
from db.work import ResultRow, find_reusable
from radq.model_card import ModelCard
from workers.chunk import Chunk
from workers.prepare import ContentKey, Prepared, applies
from workers.writer import Writer


def with_earlier_results(
    sessions: sessionmaker[Session], keys: Iterable[ContentKey], cards: Sequence[ModelCard]
) -> set[tuple[str, str]]:
    """The ``(SOPInstanceUID, sha256)`` among ``keys`` that an earlier result of one of
    these model versions was made from: the instances worth a full look (:func:`reuse_known`)."""
    wanted = {(k.sop_instance_uid, k.sha256) for k in keys if k.sop_instance_uid and k.sha256}
    if not wanted:
        return set()
    with sessions() as session:
        found = find_reusable(session, wanted, [(card.name, card.version) for card in cards])
    return {(uid, sha) for uid, sha, _ in found}


def reuse_known(
    sessions: sessionmaker[Session],
    headers: Sequence[Prepared],
    cards: Sequence[ModelCard],
    writer: Writer,
    chunk: Chunk,
) -> list[Prepared]:
    """Record reused results for already-processed instances; return the rest.

    ``headers`` come from :func:`workers.prepare.inspect`. One query for the whole chunk.
    An instance is reused only when every model that applies to it has an earlier
    result for the same content.
    """
    keys = [
        (h.meta.sop_instance_uid, h.metadata["content_sha256"])
        for h in headers
        if h.meta is not None and h.meta.sop_instance_uid
    ]
    versions = [(card.name, card.version) for card in cards]
    with sessions() as session:
        known = find_reusable(session, keys, versions) if keys else {}
    if not known:
        return list(headers)
    fresh = []
    for header in headers:
        assert header.meta is not None
        uid, sha = header.meta.sop_instance_uid, header.metadata["content_sha256"]
        wanted = [card for card in cards if applies(card, header.meta)]
        earlier = [known.get((uid or "", sha, card.name)) for card in wanted]
        if not wanted or any(r is None for r in earlier):
            fresh.append(header)
            continue
        writer.metadata(chunk, header.metadata)
        for result in earlier:
            assert result is not None
            writer.result(
                chunk,
                ResultRow(
                    instance_id=header.claimed.id,
                    model=result.model,
                    model_version=result.model_version,
                    weights_sha256=result.weights_sha256,
                    radq_version=radq.__version__,
                    preprocessing=result.preprocessing,
                    precision=result.precision,
                    outputs=result.outputs,
                    saliency=result.saliency,
                    reused_from=result.id,
                ),
            )
        used = ", ".join(f"{r.model} {r.model_version} (result {r.id})" for r in earlier if r)
        reason = f"already processed: same SOPInstanceUID and content; reused {used}"
        writer.outcome(chunk, header.claimed.id, InstanceStatus.SKIPPED, reason)
    return fresh
