"""The Celery app both sides share: configured from settings, no tasks attached.

The API uses it only to publish by task name (:mod:`radq.tasks`); workers attach
their task bodies to it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Collection, Sequence
from typing import Any, cast

import redis
from celery import Celery

from radq.settings import Settings
from radq.tasks import INFER_CHUNK

KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps one list per step; message priorities round down to one."""


UNACKED = "unacked"
"""kombu's Redis hash of delivered, unacknowledged messages: delivery tag -> [message, exchange, queue]."""
UNACKED_INDEX = "unacked_index"
"""kombu's sorted set of the same delivery tags, scored by when each was delivered."""


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists holding one queue's messages, highest priority (0) first."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in KOMBU_PRIORITY_STEPS]


def instance_ids_in_broker(
    broker_url: str, queues: Collection[str], *, delivered_within: float | None = None
) -> set[int]:
    """Every instance id a chunk message carries in ``queues``, waiting or delivered but unacked.

    Reads kombu's Redis layout: one list per priority step, the ``unacked`` hash of
    messages handed to a worker and not yet acknowledged, and ``unacked_index``, when each
    was handed over (the delivering host's clock). A message in the instant between the
    two is missed; re-publishing its instances is harmless (claims are conditional).

    ``delivered_within``: count a delivered message only if it was handed over less than
    this many seconds ago. A worker claims what it is handed at once, so instances still
    ``queued`` under an older delivery were most likely handed to a worker that died
    before its claim; kombu would deliver them again only after the visibility timeout.
    """
    client = redis.Redis.from_url(broker_url)
    messages: list[dict[str, Any]] = []
    for key in (key for queue in queues for key in redis_queue_keys(queue)):
        for start in range(0, int(client.llen(key)), 1000):
            messages.extend(json.loads(raw) for raw in client.lrange(key, start, start + 999))
    delivered = cast(list[tuple[bytes, float]], client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    delivered_at = dict(delivered)
    oldest = None if delivered_within is None else time.time() - delivered_within
    unacked = cast(dict[bytes, bytes], client.hgetall(UNACKED))
    for tag, raw in unacked.items():
        if oldest is not None and delivered_at.get(tag, time.time()) < oldest:
            continue
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues:
            messages.append(message)
    ids: set[int] = set()
    for message in messages:
        if message.get("headers", {}).get("task") != INFER_CHUNK:
            continue
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.update(int(i) for i in args[1])
    return ids


def make_celery(settings: Settings) -> Celery:
    app = Celery("radq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # The database is the source of truth: Celery keeps no results anywhere.
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue,
        # A chunk is acknowledged only after its outcomes are in SQL; a worker that
        # dies mid-chunk leaves the message to be redelivered, and claims make the
        # redelivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Task events are for Flower, which turns a worker's on (`celery control
        # enable_events`) while it runs; the API's task-sent events are one per message.
        worker_send_task_events=False,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        worker_hijack_root_logger=False,
    )
    return app


def publish_chunks(
    app: Celery,
    *,
    job_id: str,
    instance_ids: Sequence[int],
    chunk_size: int,
    queue: str,
    priority: int = 3,
) -> list[list[int]]:
    """Send one message per chunk of instance ids; returns the chunks sent.

    ``priority`` is the message priority (0 first); see ``db.status.MESSAGE_PRIORITY``.
    """
    chunks = [list(instance_ids[i : i + chunk_size]) for i in range(0, len(instance_ids), chunk_size)]
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(
                INFER_CHUNK, args=[job_id, chunk], queue=queue, producer=producer, priority=priority
            )
    return chunks
