"""Processing one chunk: claim, decode and preprocess in threads, infer in batches, write.

Decoding runs ahead in the context's thread pool while the calling thread runs the
model, so the two overlap. Outcomes are written in one transaction per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from db.jobs import get_job
from db.session import transaction
from db.status import InstanceStatus
from db.work import Claimed, claim, close_finished_jobs, finish, record_metadata, write_results
from radq.errors import ModelError
from radq.model_card import AUTO
from workers.batching import Batcher, Pending
from workers.context import WorkerContext
from workers.dedup import reuse_known
from workers.leases import LeaseKeeper
from workers.prepare import Header, prepare, read

log = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    claimed: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    closed_with_webhook: list[str] = field(default_factory=list)
    """Jobs this chunk finished that have a webhook to call."""


def _flush(ctx: WorkerContext, job_id: str, pending: Pending, report: ChunkReport) -> None:
    if not (pending.metadata or pending.results or pending.outcomes):
        return
    with transaction(ctx.sessions) as session:
        record_metadata(session, pending.metadata)
        write_results(session, pending.results)
        finish(session, pending.outcomes)
        report.closed_with_webhook += close_finished_jobs(session, [job_id])
    for _, status, _ in pending.outcomes:
        setattr(report, status, getattr(report, status) + 1)
    pending.metadata.clear()
    pending.results.clear()
    pending.outcomes.clear()


def run_chunk(ctx: WorkerContext, job_id: str, instance_ids: Sequence[int]) -> ChunkReport:
    """Process the instances of one message; safe to call again with the same ids."""
    report = ChunkReport()
    with transaction(ctx.sessions) as session:
        claimed = claim(session, job_id, instance_ids, lease_seconds=ctx.settings.lease_seconds)
        job = get_job(session, job_id)
        model_names = list(job.models) if job else []
        options = dict(job.options or {}) if job else {}
    report.claimed = len(claimed)
    if not claimed:
        return report
    with LeaseKeeper(ctx.sessions, [c.id for c in claimed], ctx.settings.lease_seconds):
        _process(ctx, job_id, claimed, model_names, options, report)
    log.info(
        "job %s chunk done: claimed=%d done=%d failed=%d skipped=%d",
        job_id, report.claimed, report.done, report.failed, report.skipped,
    )
    return report


def _process(
    ctx: WorkerContext,
    job_id: str,
    claimed: list[Claimed],
    model_names: list[str],
    options: dict[str, Any],
    report: ChunkReport,
) -> None:
    pending = Pending()
    if AUTO in model_names:
        expanded = (ctx.models.auto_names() if name == AUTO else [name] for name in model_names)
        model_names = list(dict.fromkeys(n for names in expanded for n in names))
    try:
        models = [ctx.models.get(name) for name in model_names]
    except ModelError as exc:
        pending.outcomes.extend((c.id, InstanceStatus.FAILED, f"model unavailable: {exc}") for c in claimed)
        _flush(ctx, job_id, pending, report)
        return

    batcher = Batcher(
        models,
        ctx.settings.batch_size,
        pending,
        explain_threshold=options.get("explain_threshold"),
        blobs=ctx.blobs,
    )
    # Phase one: headers and content hashes (pixels stay in the files), then one query
    # for results that can be reused; phase two decodes only what is left.
    headers: list[Header] = []
    for item in ctx.executor.map(partial(read, ctx=ctx), claimed):
        if isinstance(item, Header):
            headers.append(item)
        else:
            if item.metadata:
                pending.metadata.append(item.metadata)
            pending.outcomes.append((item.claimed.id, item.status or InstanceStatus.FAILED, item.reason))
    if options.get("dedup"):
        headers = reuse_known(ctx, headers, models, pending)
    for prepared in ctx.executor.map(partial(prepare, ctx=ctx, models=models), headers):
        if prepared.metadata:
            pending.metadata.append(prepared.metadata)
        if prepared.status:
            pending.outcomes.append((prepared.claimed.id, prepared.status, prepared.reason))
        elif batcher.add(prepared):
            _flush(ctx, job_id, pending, report)
    batcher.drain()
    _flush(ctx, job_id, pending, report)
