"""Processing one message: claim its instances, hold their leases, let the engine do the rest."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from db.jobs import get_job
from db.session import transaction
from db.work import claim
from radq.logs import log_context
from workers.chunk import ChunkReport
from workers.context import WorkerContext
from workers.leases import LeaseKeeper

log = logging.getLogger(__name__)


def run_chunk(ctx: WorkerContext, job_id: str, instance_ids: Sequence[int]) -> ChunkReport:
    """Process the instances of one message; safe to call again with the same ids."""
    with log_context(job_id=job_id):
        return _run_chunk(ctx, job_id, instance_ids)


def _run_chunk(ctx: WorkerContext, job_id: str, instance_ids: Sequence[int]) -> ChunkReport:
    with transaction(ctx.sessions) as session:
        claimed = claim(session, job_id, instance_ids, lease_seconds=ctx.settings.lease_seconds)
        job = get_job(session, job_id)
        model_names = list(job.models) if job else []
        options = dict(job.options or {}) if job else {}
    if not claimed:
        return ChunkReport()
    with LeaseKeeper(ctx.sessions, [c.id for c in claimed], ctx.settings.lease_seconds):
        report = ctx.engine.process(job_id, claimed, model_names, options)
    log.info(
        "job %s chunk done: claimed=%d done=%d failed=%d skipped=%d",
        job_id, report.claimed, report.done, report.failed, report.skipped,
    )  # fmt: skip
    return report
