"""Accepting a submission: check models, collect files, record the job, publish chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.orm import Session

from api.ingest import Ingest
from api.paths import resolve_submitted
from api.state import AppState
from db.jobs import add_instances, create_job, mark_queued
from db.session import transaction
from db.sources import SourceRef, add_sources
from db.status import MESSAGE_PRIORITY, JobStatus, Priority
from radq.errors import BrokerUnavailable, SubmissionError
from radq.model_card import AUTO, cards_in, discover_cards
from radq.queue import publish_chunks
from radq.routing import job_queue
from radq.tasks import NOTIFY_JOB

Recorded = Callable[[Session, str], None]
"""Called with the session and the new job's id inside the transaction that records the job
(the route adds its audit event there: one transaction, and no job without its event)."""


def resolve_models(state: AppState, requested: Sequence[str] | None) -> list[str]:
    """The job's model names: those requested, or the configured defaults.

    Raises:
        SubmissionError: a name is not a model in ``RADQ_MODEL_DIR``.
    """
    names = [n for n in (requested or []) if n] or list(state.settings.default_models)
    available = discover_cards(state.settings.model_dir)
    unknown = [n for n in names if n not in available and n != AUTO]
    if unknown:
        raise SubmissionError(
            f"unknown model(s) {', '.join(unknown)}; available: {', '.join([AUTO, *sorted(available)])}"
        )
    return list(dict.fromkeys(names))


def route(state: AppState, models: Sequence[str]) -> str:
    """The queue a job over ``models`` (already resolved) publishes to; see :mod:`radq.routing`."""
    cards = cards_in(state.settings.model_dir)
    return job_queue(state.settings, models, cards)


def submit(
    state: AppState,
    collect: Callable[[Ingest], None],
    models: Sequence[str] | None,
    options: dict[str, Any] | None = None,
    *,
    priority: str = Priority.NORMAL,
    webhook_url: str | None = None,
    recorded: Recorded | None = None,
) -> str:
    """Create a job from whatever ``collect`` adds to an :class:`Ingest`; return its id.

    Raises:
        SubmissionError: no files, unknown model, or a file/limit problem from ``collect``.
        BrokerUnavailable: the job is recorded but its messages could not be published.
    """
    settings = state.settings
    names = resolve_models(state, models)
    with Ingest(
        state.blobs,
        max_bytes=settings.max_upload_bytes,
        max_members=settings.max_archive_members,
        max_ratio=settings.max_compression_ratio,
        reserve=state.reserve,
    ) as ingest:
        collect(ingest)
        if not ingest.files:
            raise SubmissionError("the submission contains no files")
        ingest.commit()  # only a submission accepted whole reaches the blob store
    with transaction(state.sessions) as session:
        job = create_job(
            session,
            models=names,
            options=options,
            priority=priority,
            webhook_url=webhook_url,
            queue=route(state, names),
        )
        ids = add_instances(session, job_id=job.id, files=ingest.files)
        if recorded:
            recorded(session, job.id)
    enqueue(state, job.id, ids, priority, queue=job.queue)
    return job.id


def submit_paths(
    state: AppState,
    paths: Sequence[str],
    models: Sequence[str] | None,
    options: dict[str, Any] | None = None,
    *,
    priority: str = Priority.BULK,
    webhook_url: str | None = None,
    recorded: Recorded | None = None,
) -> tuple[str, list[SourceRef]]:
    """Record a job over paths on shared storage, to be enumerated in the background.

    Only the submitted paths themselves are checked here, so this returns in
    milliseconds whatever the size of the trees below them.

    Returns:
        The job id and its sources, leased to the caller, who must start walking them.

    Raises:
        SubmissionError: unknown model, or a path that is relative or missing.
        PathNotAllowed: a path outside ``RADQ_ALLOWED_ROOTS``.
    """
    names = resolve_models(state, models)
    roots = state.settings.allowed_roots
    once = [r.resolve() for r in roots]
    resolved = list(dict.fromkeys(str(resolve_submitted(p, roots, resolved_roots=once)) for p in paths))
    with transaction(state.sessions) as session:
        job = create_job(
            session,
            models=names,
            options=options,
            priority=priority,
            webhook_url=webhook_url,
            status=JobStatus.REGISTERING,
            queue=route(state, names),
        )
        lease = state.settings.registration_lease_seconds
        sources = add_sources(session, job_id=job.id, paths=resolved, lease_seconds=lease)
        if recorded:
            recorded(session, job.id)
    return job.id, sources


def enqueue(
    state: AppState,
    job_id: str,
    ids: Sequence[int],
    priority: str,
    *,
    queue: str | None = None,
    chunk_size: int | None = None,
) -> None:
    """Publish a job's instances in chunks, then mark them queued.

    ``queue`` (the job's, ``Job.queue``) and ``chunk_size`` default to ``RADQ_QUEUE`` and
    ``RADQ_CHUNK_SIZE``.

    Raises:
        BrokerUnavailable: the broker is unreachable; the instances stay ``pending``.
    """
    publish(state, job_id, ids, priority, queue=queue, chunk_size=chunk_size)
    with transaction(state.sessions) as session:
        mark_queued(session, ids)


def publish(
    state: AppState,
    job_id: str,
    ids: Sequence[int],
    priority: str,
    *,
    queue: str | None = None,
    chunk_size: int | None = None,
) -> None:
    """Publish a job's instances in chunks; the caller marks them queued (``db.jobs.mark_queued``).

    Raises:
        BrokerUnavailable: the broker is unreachable; the instances stay ``pending``.
    """
    settings = state.settings
    try:
        publish_chunks(
            state.celery,
            job_id=job_id,
            instance_ids=ids,
            chunk_size=chunk_size or settings.chunk_size,
            queue=queue or settings.queue,
            priority=MESSAGE_PRIORITY[Priority(priority)],
        )
    except (KombuOperationalError, OSError) as exc:
        raise BrokerUnavailable(
            f"job {job_id} is recorded but could not be queued: the broker is unreachable ({exc}); "
            "it is queued automatically once the broker answers again"
        ) from None


def notify_ended(state: AppState, job_id: str) -> None:
    """Ask a worker to call the job's webhook (the job has ended)."""
    try:
        state.celery.send_task(NOTIFY_JOB, args=[job_id], queue=state.settings.queue)
    except (KombuOperationalError, OSError) as exc:
        raise BrokerUnavailable(f"job {job_id} ended but its webhook could not be queued ({exc})") from None
