"""Processing one message: claim its instances, hold their leases, let the engine do the rest."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from db.jobs import JobSpec, job_spec, route_job
from db.session import transaction
from db.status import MESSAGE_PRIORITY, JobStatus, Priority
from db.work import claim, still_waiting
from radq.logs import log_context
from radq.model_card import cards_in
from radq.routing import gpu_only_models, gpu_queue_for
from workers.chunk import ChunkReport, HandBack
from workers.context import WorkerContext

log = logging.getLogger(__name__)


def run_chunk(
    ctx: WorkerContext, job_id: str, instance_ids: Sequence[int], *, worker: str | None = None
) -> ChunkReport:
    """Process the instances of one message; safe to call again with the same ids.

    ``worker`` (the Celery node name) is recorded on each claimed instance. A CPU
    worker claims nothing of a job that needs a GPU-only model: the report's
    ``handed_back`` says where the caller must publish the instances again.
    """
    with log_context(job_id=job_id):
        return _run_chunk(ctx, job_id, instance_ids, worker)


def _run_chunk(
    ctx: WorkerContext, job_id: str, instance_ids: Sequence[int], worker: str | None
) -> ChunkReport:
    # While it claims, this message's instances count as on their way: partial batches wait
    # for them. Messages taken together (one-file jobs) claim one after the other, and the
    # first would otherwise run alone while the rest still claim. (Engine.process counts
    # them on from its start.)
    with ctx.engine.arriving(), transaction(ctx.sessions) as session:
        job = job_spec(session, job_id)
        if job is not None and ctx.models.device.type != "cuda":
            handed = _hand_back(ctx, session, job, instance_ids)
            if handed is not None:
                return ChunkReport(handed_back=handed)
        running = job is not None and job.status == JobStatus.RUNNING
        claimed = claim(
            session, job_id, instance_ids, lease_seconds=ctx.settings.lease_seconds, worker=worker,
            job_running=running,
        )  # fmt: skip
        model_names = job.models if job else []
        options = job.options if job else {}
    if not claimed:
        return ChunkReport()
    with ctx.leases.holding([c.id for c in claimed]):
        report = ctx.engine.process(job_id, claimed, model_names, options)
    log.info(
        "job %s chunk done: claimed=%d done=%d failed=%d skipped=%d",
        job_id, report.claimed, report.done, report.failed, report.skipped,
    )  # fmt: skip
    return report


def _hand_back(
    ctx: WorkerContext, session: Session, job: JobSpec, instance_ids: Sequence[int]
) -> HandBack | None:
    """Where a chunk this CPU worker must not run goes instead; None when it may run it.

    Routing keeps such chunks away from CPU workers; one arrives only when a card changed
    after the job was routed, the API reads another model directory, or a message was
    published by hand. The job is re-routed when its own queue is one CPU workers take,
    so that retries and recovery do not bring the chunk back here.
    """
    settings = ctx.settings
    cards = cards_in(settings.model_dir)
    needs_gpu = gpu_only_models(job.models, cards)
    if not needs_gpu:
        return None
    own = job.queue or settings.queue
    target = gpu_queue_for(settings, own, cards)
    waiting = still_waiting(session, job.id, instance_ids)
    if target != own:
        route_job(session, job.id, target)
    log.warning(
        "job %s needs GPU-only model(s) %s (card device: gpu) and this worker runs on the CPU: it "
        "hands %d waiting instance(s) back to the queue %s%s",
        job.id, ", ".join(needs_gpu), len(waiting), target,
        f" (the job is re-routed there from {own})" if target != own else "",
    )  # fmt: skip
    return HandBack(target, MESSAGE_PRIORITY[Priority(job.priority)], waiting)
