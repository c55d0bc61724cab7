"""Storing Grad-CAM maps off the inference streams, in order with the writes that follow.

Encoding a map as PNG and putting it in the blob store (a network round trip on S3) ran on
the inference stream's thread, so the model waited for every map of every batch. Here a
few threads store the maps (Pillow's zlib and the store's I/O release the GIL), and one
more hands each result row, and every write given after it for the same instance, to the
writer in the order they were given: an instance's results still commit no later than its
final status. A map that cannot be stored fails its instance with the reason instead.
Maps wait as their 8-bit levels, at most :data:`MAX_MAPS_WAITING` of them: when the blob
store is slower than the model, the stream waits rather than memory growing.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from db.status import InstanceStatus
from db.work import ResultRow
from radq.blobs import BlobStore
from workers.chunk import Chunk
from workers.gradcam import to_8bit, to_png
from workers.writer import Writer

log = logging.getLogger(__name__)

MAX_MAPS_WAITING = 1024
"""Maps given but not yet stored, at most (about 50 KB each at 224x224)."""


@dataclass(frozen=True)
class _Entry:
    chunk: Chunk
    instance_id: int
    row: ResultRow | None = None
    maps: Future[dict[str, str]] | None = None
    """The row's maps being stored: label to PNG sha256."""
    outcome: tuple[str, str | None] | None = None
    ended: bool = False
    """The row came after its instance's outcome (another model had failed it)."""


class MapStore:
    """Thread-safe; an instance's writes must all come from one thread (its stream)."""

    def __init__(
        self, blobs: BlobStore, writer: Writer, *, threads: int = 2, max_waiting: int = MAX_MAPS_WAITING
    ) -> None:
        self.blobs = blobs
        self.writer = writer
        self.max_waiting = max_waiting
        self._waiting = 0
        self._room = threading.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="radq-maps")
        self._order: queue.Queue[_Entry | None] = queue.Queue()
        self._thread = threading.Thread(target=self._hand_on, name="radq-maps-order", daemon=True)
        self._thread.start()

    def result(
        self, chunk: Chunk, row: ResultRow, maps: Mapping[str, np.ndarray], *, ended: bool = False
    ) -> None:
        """Store ``maps`` (label to a [0, 1] map), then write ``row`` with their hashes.

        ``ended``: the instance's outcome was given already; maps that cannot be stored then
        cost this row only, else they fail the instance at its outcome.
        """
        stored = None
        if maps:
            levels = {label: to_8bit(m) for label, m in maps.items()}
            self._reserve(len(levels))
            stored = self._pool.submit(self._store, levels)
        self._order.put(_Entry(chunk, row.instance_id, row=row, maps=stored, ended=ended))

    def outcome(self, chunk: Chunk, instance_id: int, status: str, reason: str | None = None) -> None:
        """The instance's final status, written after the results given before it."""
        self._order.put(_Entry(chunk, instance_id, outcome=(status, reason)))

    def close(self) -> None:
        """Store and hand on what is queued, then stop the threads."""
        self._order.put(None)
        self._thread.join()
        self._pool.shutdown()

    def _reserve(self, count: int) -> None:
        with self._room:  # one row's maps always get in, even alone over the bound
            self._room.wait_for(lambda: self._waiting == 0 or self._waiting + count <= self.max_waiting)
            self._waiting += count

    def _store(self, maps: dict[str, np.ndarray]) -> dict[str, str]:
        try:
            return {label: self.blobs.put(io.BytesIO(to_png(m)))[0] for label, m in maps.items()}
        finally:
            with self._room:
                self._waiting -= len(maps)
                self._room.notify_all()

    def _hand_on(self) -> None:
        failed: dict[int, str] = {}
        while (entry := self._order.get()) is not None:
            try:
                self._hand_on_one(entry, failed)
            except Exception:  # never let the stage die: the reaper re-sends what is lost
                log.exception("saliency stage error")

    def _hand_on_one(self, entry: _Entry, failed: dict[int, str]) -> None:
        """Write one entry; ``failed``: instance id to why its maps were not stored."""
        i = entry.instance_id
        if entry.outcome is not None:
            status, reason = entry.outcome
            if i in failed:
                status, reason = InstanceStatus.FAILED, failed.pop(i)
            self.writer.outcome(entry.chunk, i, status, reason)
            return
        assert entry.row is not None
        if i in failed:
            return
        saliency = None
        if entry.maps is not None:
            try:
                saliency = entry.maps.result()
            except Exception as exc:  # the store is down or full: this instance fails, not the stage
                log.warning("instance %d: Grad-CAM maps not stored: %s", i, exc)
                if not entry.ended:
                    failed[i] = f"Grad-CAM maps could not be stored in {self.blobs.url}: {exc}"
                return
        self.writer.result(entry.chunk, replace(entry.row, saliency=saliency or None))
