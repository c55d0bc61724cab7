"""Worker liveness in Redis: each worker refreshes a key with a TTL; the API counts the keys.

Cheap and reliable at scrape time (one SCAN), unlike a Celery broadcast that waits for
replies. A worker that dies stops refreshing and its key expires after
:data:`HEARTBEAT_TTL_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

import redis

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "radq:worker:"
"""Key of one worker: this prefix and its Celery hostname (``celery@host``)."""
HEARTBEAT_EVERY_S = 5.0
"""How often a worker refreshes its key."""
HEARTBEAT_TTL_S = 15
"""Seconds a key outlives its last refresh: three missed beats and the worker counts as gone."""


def heartbeat_key(hostname: str) -> str:
    return HEARTBEAT_PREFIX + hostname


def live_workers(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every worker whose heartbeat has not expired, by Celery hostname, with what it announced."""
    workers: dict[str, dict[str, Any]] = {}
    keys = list(client.scan_iter(match=HEARTBEAT_PREFIX + "*", count=1000))
    if not keys:
        return workers
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        name = (key.decode() if isinstance(key, bytes) else str(key))[len(HEARTBEAT_PREFIX) :]
        try:
            workers[name] = json.loads(raw)
        except ValueError:
            workers[name] = {}
    return workers


class Heartbeat:
    """A daemon thread that keeps one worker's key alive until :meth:`stop`."""

    def __init__(self, broker_url: str, hostname: str, info: dict[str, Any]) -> None:
        self._client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        self._key = heartbeat_key(hostname)
        self._value = json.dumps({"hostname": hostname, **info})
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the key, so the worker stops counting at once."""
        self._stopped.set()
        self._thread.join(timeout=HEARTBEAT_EVERY_S * 2)
        with contextlib.suppress(redis.RedisError):  # else the key expires by itself
            self._client.delete(self._key)

    def _run(self) -> None:
        while True:
            try:
                self._client.set(self._key, self._value, ex=HEARTBEAT_TTL_S)
            except redis.RedisError as exc:  # the broker is away: Celery reconnects, we retry
                log.warning("could not refresh the worker heartbeat: %s", exc)
            if self._stopped.wait(HEARTBEAT_EVERY_S):
                return
