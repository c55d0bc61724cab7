"""Messages in hand grow while they are small, so one-file jobs share batches.

A worker process holds ``RADQ_WORKER_CONCURRENCY`` messages (Celery's prefetch, with late
acknowledgement); each message's thread waits until its instances have outcomes, and only
instances of messages in hand share batches. Chunks of a big job fill batches alone, but a
stream of one-file jobs (C-STORE associations, STOW-RS, single uploads) would run batches
of one or two images. So each message in hand with fewer instances than a batch lets the
worker take one more, up to ``RADQ_WORKER_MAX_MESSAGES``: big messages in hand stay at
``RADQ_WORKER_CONCURRENCY`` (other workers still get the rest of a big job), small ones pile
up until their instances fill batches.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from typing import Any, Protocol

from celery import Celery, bootsteps, signals

from radq.tasks import INFER_CHUNK

log = logging.getLogger(__name__)


class _QoS(Protocol):
    """The part of kombu's ``QoS`` (the consumer's prefetch count) used here."""

    value: int

    def increment_eventually(self, n: int = 1) -> int: ...

    def decrement_eventually(self, n: int = 1) -> int: ...

    def update(self) -> int: ...


class SmallMessages:
    """Counts the small messages in hand; keeps the prefetch count at ``base`` plus that
    count, at most ``most``.

    The count moves by steps (kombu applies them from the consumer's loop), so Celery's own
    steps (messages with an ETA) keep their meaning. Thread-safe: messages arrive on the
    consumer's thread and finish on the pool's.
    """

    def __init__(self, base: int, most: int, small_below: int) -> None:
        self.base = base
        self.most = max(most, base)
        self.small_below = small_below
        self._qos: _QoS | None = None
        self._ids: Counter[str] = Counter()  # small messages in hand per task id (a retry keeps its id)
        self._in_hand = 0
        self._lock = threading.Lock()

    @property
    def in_hand(self) -> int:
        """Small messages received and not yet finished."""
        return self._in_hand

    def attach(self, qos: _QoS) -> None:
        """Take over a new consumer's QoS (at start and after a lost connection)."""
        with self._lock:
            self._qos = qos
            qos.value = min(self.most, self.base + self._in_hand)
            qos.update()  # before the consumer's loop reads its first message

    def received(self, task_id: str, instances: int) -> None:
        if instances >= self.small_below:
            return
        with self._lock:
            if self._qos is not None and self.base + self._in_hand < self.most:
                self._qos.increment_eventually()
            self._ids[task_id] += 1
            self._in_hand += 1

    def finished(self, task_id: str) -> None:
        with self._lock:
            if not self._ids[task_id]:  # a big message (a Counter reads 0 without storing it)
                return
            self._ids[task_id] -= 1
            if not self._ids[task_id]:
                del self._ids[task_id]
            self._in_hand -= 1
            if self._qos is not None and self.base + self._in_hand < self.most:
                self._qos.decrement_eventually()


def install(app: Celery, base: int, most: int, small_below: int) -> SmallMessages:
    """Make ``app``'s worker take up to ``most`` messages while those beyond ``base`` are
    small (fewer than ``small_below`` instances). The worker's pool needs ``most`` threads."""
    policy = SmallMessages(base, most, small_below)
    uid = uuid.uuid4().hex  # receivers of this app only, however many apps a process makes

    class SmallMessagePrefetch(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)  # after it makes the consumer's QoS

        def start(self, c: Any) -> None:
            policy.attach(c.qos)
            log.info(
                "holding %d message(s) at once, up to %d while they are small (under %d instances)",
                policy.base, policy.most, policy.small_below,
            )  # fmt: skip

    def on_received(sender: Any, request: Any, **_: Any) -> None:  # sender: the consumer
        if sender.app is app and request.name == INFER_CHUNK:
            args = request.args  # (job id, instance ids); a malformed message fails in its task
            ids = args[1] if len(args) == 2 and isinstance(args[1], list) else None
            if ids is not None:
                policy.received(request.id, len(ids))

    def on_finished(sender: Any = None, task_id: str | None = None, request: Any = None, **_: Any) -> None:
        # task_postrun names the task id; task_revoked (never run) its request
        task_id = task_id or getattr(request, "id", None)
        if getattr(sender, "app", None) is app and getattr(sender, "name", None) == INFER_CHUNK and task_id:
            policy.finished(task_id)

    app.steps["consumer"].add(SmallMessagePrefetch)
    signals.task_received.connect(on_received, weak=False, dispatch_uid=f"{uid}-received")
    signals.task_postrun.connect(on_finished, weak=False, dispatch_uid=f"{uid}-postrun")
    signals.task_revoked.connect(on_finished, weak=False, dispatch_uid=f"{uid}-revoked")
    # After a lost connection Celery lowers the prefetch count and raises it back to the
    # pool's size task by task: with a pool sized for small messages, that would let big
    # ones fill it.
    app.conf.worker_enable_prefetch_count_reduction = False
    return policy
