"""A worker process's pipeline: decode processes feed the inference streams, one writer stores.

Celery runs each message in a thread of its own (``--pool threads``); the message's
thread claims its instances and hands them to the engine, which every message of the
process shares, so batches form across messages, instances and studies:

1. decode: :class:`workers.procpool.ProcessPool` reads and decodes files in processes
   (pydicom holds the GIL), a message's files several per task (:func:`group_size`), at
   most ``decode_ahead`` instances ahead of the model, so memory stays flat whatever the
   backlog;
2. infer: one or more threads (streams, :func:`infer_streams`) each finish preprocessing on
   the model's device and run batches of their own (:class:`workers.batching.Batcher`);
3. write: one thread commits outcomes in bulk (:class:`workers.writer.Writer`).

The message's thread returns once every instance it claimed has its outcome in SQL.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from db.status import InstanceStatus, StorageKind
from db.work import Claimed
from radq.blobs import BlobStore
from radq.errors import InstanceError, ModelError, RadqError
from radq.logs import configure_child_logging, current_level, log_context, worker_name
from radq.model_card import AUTO
from radq.pseudonyms import pseudonym_key
from radq.settings import Settings
from workers.batching import Batcher
from workers.chunk import Chunk, ChunkReport
from workers.dedup import reuse_known, with_earlier_results
from workers.gpu_decode import gpu_decode_device
from workers.gpu_decode import install as install_gpu_decode
from workers.header import printable
from workers.metrics import WorkerMetrics
from workers.models.loader import LoadedModel, ModelRegistry
from workers.prepare import ContentKey, Prepared, Source, StoredBlob, content_keys, inspect, load_group
from workers.procpool import ProcessPool
from workers.saliency import MapStore
from workers.writer import Writer

T = TypeVar("T")
log = logging.getLogger(__name__)

DECODE_PRELOAD = ("workers.prepare",)
"""Imported once by the decode processes' server, so each new decode process starts warm."""
STAGE_LOG_S = 30.0
"""How often a busy inference stream logs where its time went."""
IDLE_CHECK_S = 0.01
"""How often a stream holding a partial batch looks whether more instances can still come."""
MAX_AUTO_STREAMS = 4
"""Inference streams a CPU worker runs by default, at most: each holds a batch's activations."""
MAP_THREADS = 4
"""Threads storing Grad-CAM maps at most (no more than the decode processes): PNG encoding
releases the GIL, and a job explaining many labels makes several maps per image."""
GROUP_MAX = 8
"""Most instances of one message sent to a decode process as one task. Every task costs the
worker process a pickle, two pipe writes, a wake-up of its dispatcher, a Future and a hand-off
to an inference stream, all under its one GIL: the bound of a GPU worker (``Engine.process``)."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass
class _Call:
    """Work another thread hands to an inference stream (model loading)."""

    fn: Callable[[], Any]
    future: Future[Any]


class _Stop:
    """Put on the streams' queue by :meth:`Engine.close`, once per stream."""


_STOP = _Stop()


@dataclass
class _Decoded:
    chunk: Chunk
    claimed: Claimed
    content_sha256: str | None
    models: dict[str, LoadedModel]
    explain_threshold: float | None
    prepared: Prepared | None = None
    """Set by the dispatcher thread before the instance is queued for an inference stream."""


def _outcome_of(claimed: Claimed, future: Future[Prepared]) -> Prepared:
    """The decode process's answer, or the failure that took the process with it."""
    try:
        return future.result()
    except (Exception, CancelledError) as exc:  # CancelledError: the pool shut down first
        return _failed(claimed, exc)


def _failed(claimed: Claimed, exc: BaseException) -> Prepared:
    """An instance whose decode task ended in ``exc`` instead of an answer."""
    out = Prepared(claimed)
    if isinstance(exc, InstanceError):  # the file crashed or hung its decode process
        out.fail(exc.status, exc.reason)
    else:
        log.error("decoding instance %s failed outside the decoder", claimed.id, exc_info=exc)
        out.fail(InstanceStatus.FAILED, f"could not decode: {type(exc).__name__}: {printable(str(exc), 300)}")
    return out


def group_size(instances: int, processes: int) -> int:
    """Instances per decode task for a message of ``instances``: up to :data:`GROUP_MAX`, and
    few enough that every decode process gets a task of the message."""
    return max(1, min(GROUP_MAX, instances // processes))


def _start_decoder(
    level: str, log_format: str, worker: str | None, uses_torch: bool, gpu_decode: int | None
) -> None:
    """What each decode process runs first: log like the worker; one torch thread if it
    preprocesses; nvImageCodec first in pydicom's line if it decodes on GPU ``gpu_decode``."""
    configure_child_logging(level, log_format, worker)
    if uses_torch:
        import torch

        torch.set_num_threads(1)  # one process per core already: more threads oversubscribe
    if gpu_decode is not None:
        install_gpu_decode(gpu_decode)


def decoder_finish_pixels(settings: Settings, device_type: str) -> int | None:
    """The smallest frame (pixels) a worker's decode processes preprocess into a finished
    model input; None: they ship every frame raw, to be preprocessed in batches on the device.

    On the CPU they preprocess every frame (RADQ_PREPROCESS_IN_DECODERS): in parallel, and
    what crosses is the small finished input. On CUDA the GPU preprocesses in batches,
    except frames of RADQ_HOST_PREPROCESS_PIXELS or more where that is set: shipping a raw
    10 MB CR costs the worker's one process more than a decode process's resize costs it.
    """
    if device_type == "cpu":
        return 0 if settings.preprocess_in_decoders else None
    return settings.host_preprocess_pixels or None


def infer_streams(settings: Settings, device_type: str) -> int:
    """Threads that run forward passes at once (RADQ_INFER_STREAMS; 0: one per usable core
    on the CPU, at most :data:`MAX_AUTO_STREAMS`; one on CUDA).

    On the CPU a forward pass spread over every core stalls at each op's barrier whenever
    anything else (a decode process, the writer, the API) preempts one of its threads; one
    single-threaded stream per core loses only that thread's time. DenseNet-121 alone, 2
    cores: 26.5-27.2 img/s as two streams of one thread, 23.4-23.9 as one of two.
    """
    if settings.infer_streams:
        return settings.infer_streams
    if device_type != "cpu":
        return 1
    return min(usable_cores(), MAX_AUTO_STREAMS)


def torch_threads(settings: Settings, device_type: str) -> int:
    """torch threads of each inference stream (RADQ_TORCH_THREADS; 0: the usable cores shared
    among the streams)."""
    return settings.torch_threads or max(1, usable_cores() // infer_streams(settings, device_type))


@dataclass
class _Stream:
    """One inference thread with batches of its own, and where its time went."""

    name: str
    batcher: Batcher
    waited_s: float = 0.0
    period_start: float = field(default_factory=time.perf_counter)


class Engine:
    """The three stages of one worker process; started after any fork, in the process that uses it."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        models: ModelRegistry,
        blobs: BlobStore,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.models = models
        self.blobs = blobs
        self.metrics = metrics or WorkerMetrics()
        self.pseudonym_key = pseudonym_key(settings)
        processes = settings.decode_processes or usable_cores()
        # On the CPU the decode processes also preprocess: in parallel, and what crosses
        # to the inference streams is the small finished input, not the decoded frame.
        device = models.device
        self.finish_pixels = decoder_finish_pixels(settings, device.type)
        self.gpu_decode = gpu_decode_device(settings.gpu_decode, device.type, device.index)
        if self.gpu_decode is not None:
            log.info("decode processes decode JPEG and JPEG 2000 on GPU %d (nvImageCodec), the CPU "
                     "codecs as the fallback", self.gpu_decode)  # fmt: skip
        self.decoders = ProcessPool(
            processes,
            task_timeout=settings.decode_timeout,
            preload=(*DECODE_PRELOAD, "torch") if self.finish_pixels is not None else DECODE_PRELOAD,
            initializer=_start_decoder,
            initargs=(
                current_level(),
                settings.log_format,
                worker_name(),
                self.finish_pixels is not None,
                self.gpu_decode,
            ),
        )
        self.writer = Writer(sessions, metrics=self.metrics)
        self.maps = MapStore(blobs, self.writer, threads=min(MAP_THREADS, processes))
        count = infer_streams(settings, device.type)
        batch = settings.batch_size
        self.streams = [
            _Stream(
                "radq-infer" if count == 1 else f"radq-infer-{i + 1}",
                Batcher(batch, settings.batch_deadline, self.writer, self.maps, metrics=self.metrics),
            )
            for i in range(count)
        ]
        # Decoded instances that may wait: two batches per stream, one per decode process.
        self._slots = threading.Semaphore(settings.decode_ahead or count * 2 * batch + processes)
        # One message's thread submits at a time: messages go through in the order they
        # came, so the first finishes, and its thread takes the next message, while the
        # others are still decoding and inferring. Interleaved, they would all finish
        # together and the pipeline would drain before the next ones were claimed.
        self._submitting = threading.Lock()
        # Instances sent to the decode processes that no stream has taken yet, and messages
        # whose instances are still on their way (:meth:`arriving`). At 0 and 0 no more can
        # come until a message in hand finishes, which waits for the partial batches: those
        # run at once instead of at their deadline (RADQ_BATCH_DEADLINE), or a worker fed
        # one-file jobs would wait the deadline out for every message.
        self._coming = 0
        self._messages_arriving = 0
        self._coming_lock = threading.Lock()
        # queue.Queue, not SimpleQueue: on CPython 3.11-3.12 a SimpleQueue.get(timeout=t)
        # woken by a put whose item another stream took first can wait for the next put,
        # however long after t, with a partial batch in hand (seen: CT_small left
        # processing until its lease lapsed). Queue.get re-checks its deadline.
        self._ready: queue.Queue[list[_Decoded] | _Call | _Stop] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._infer_loop, args=(stream,), name=stream.name, daemon=True)
            for stream in self.streams
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Finish what is queued, then stop the stages (tests and orderly shutdown)."""
        for _ in self._threads:
            self._ready.put(_STOP)  # each stream takes one and stops
        for thread in self._threads:
            thread.join()
        self.maps.close()
        self.writer.close()
        self.decoders.shutdown()

    def locate(self, claimed: Claimed) -> Source:
        """Where a decode process finds an instance's bytes."""
        if claimed.storage in (StorageKind.BLOB, StorageKind.DELETED):
            return StoredBlob(self.blobs, claimed.location)
        return Path(claimed.location)

    # --- a message's thread -----------------------------------------------------------

    def process(self, job_id: str, claimed: Sequence[Claimed], model_names: Sequence[str],
                options: dict[str, Any]) -> ChunkReport:  # fmt: skip
        """Decode, infer and write ``claimed``; returns once all their outcomes are in SQL
        (or after ``chunk_time_limit``, leaving the rest to the reaper)."""
        chunk = Chunk(job_id, {c.id for c in claimed})
        with self.arriving():
            self._submit(chunk, claimed, model_names, options)
        return self._wait(chunk)

    def _submit(
        self, chunk: Chunk, claimed: Sequence[Claimed], model_names: Sequence[str], options: dict[str, Any]
    ) -> None:
        """Send what needs decoding to the decode processes; record the rest's outcomes."""
        try:
            models = self._models(model_names)
        except ModelError as exc:
            for name in model_names:
                self.metrics.failed.labels(name).inc(len(claimed))
            for c in claimed:
                self.writer.outcome(chunk, c.id, InstanceStatus.FAILED, f"model unavailable: {exc}")
            return
        todo: list[tuple[Claimed, str | None]] = [(c, None) for c in claimed]
        if options.get("dedup"):
            todo = self._reuse_known(chunk, claimed, models)
        threshold = options.get("explain_threshold")
        by_name = {m.card.name: m for m in models}
        items = [_Decoded(chunk, c, sha, by_name, threshold) for c, sha in todo]
        size = group_size(len(items), self.decoders.processes)
        with self._submitting:
            for start in range(0, len(items), size):
                group = items[start : start + size]
                for _ in group:
                    self._slots.acquire()  # back-pressure: at most decode_ahead instances decoded and waiting
                self._count_coming(len(group))
                self._decode(group)

    def _decode(self, group: list[_Decoded]) -> None:
        """Send ``group`` (instances of one message) to a decode process as one task."""
        models = group[0].models
        future = self.decoders.submit(
            partial(load_group, finish_pixels=self.finish_pixels),
            [(item.claimed, self.locate(item.claimed), item.content_sha256) for item in group],
            self.pseudonym_key, [m.card for m in models.values()], self.settings.max_image_pixels,
        )  # fmt: skip
        future.add_done_callback(partial(self._decoded, group))

    def _models(self, names: Sequence[str]) -> list[LoadedModel]:
        if AUTO in names:
            expanded = (self.models.auto_names() if name == AUTO else [name] for name in names)
            names = list(dict.fromkeys(n for group in expanded for n in group))
        # Loaded models are taken at once: through a stream, each message waited for a forward
        # pass to end before its files could start decoding.
        load = self.models.get
        return [self.models.loaded(name) or self._on_infer_thread(partial(load, name)) for name in names]

    def _on_infer_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by an inference stream's thread: only those run torch in this process.

        Loading a model traces it, i.e. runs it. OpenMP gives each thread that runs
        parallel torch ops a team of its own; once the teams' threads outnumber the cores,
        libgomp stops spinning at barriers and every thread sleeps and wakes around each
        op (measured: 1,500 context switches/s per thread, a sixth of 2 cores idle during
        DenseNet-121's forward passes).
        """
        future: Future[T] = Future()
        self._ready.put(_Call(fn, future))
        return future.result()

    def _reuse_known(
        self, chunk: Chunk, claimed: Sequence[Claimed], models: Sequence[LoadedModel]
    ) -> list[tuple[Claimed, str | None]]:
        """Record reused results; return what to decode, in order, with the hashes taken.

        Content keys first (SOPInstanceUID and hash, a light read); only instances whose key
        has earlier results, or could not be read that way (no preamble, deflated,
        unreadable), are inspected in full (header, routing, image check) before their
        results are reused. The rest, usually all, go on to decoding with their hash:
        inspecting every instance parsed each header twice, 1.3-1.8 ms more per CT slice.
        """
        cards = [m.card for m in models]
        keys = self._content_keys(claimed)
        known = with_earlier_results(self.sessions, keys.values(), cards)

        def worth_a_look(c: Claimed) -> bool:
            key = keys[c.id]
            return key.sop_instance_uid is None or (key.sop_instance_uid, key.sha256) in known

        candidates = [c for c in claimed if worth_a_look(c)]
        fresh = {c.id: keys[c.id].sha256 for c in claimed if not worth_a_look(c)}
        fresh.update(self._inspect_and_reuse(chunk, candidates, models) if candidates else {})
        return [(c, fresh[c.id]) for c in claimed if c.id in fresh]

    def _content_keys(self, claimed: Sequence[Claimed]) -> dict[int, ContentKey]:
        """Each instance's content key, read by the decode processes a group at a time."""
        size = group_size(len(claimed), self.decoders.processes)
        groups = [claimed[i : i + size] for i in range(0, len(claimed), size)]
        futures = [self.decoders.submit(content_keys, [(c, self.locate(c)) for c in g]) for g in groups]
        keys: dict[int, ContentKey] = {}
        for group, future in zip(groups, futures, strict=True):
            try:
                found = future.result()
            except (Exception, CancelledError):  # a crashed process: decoding isolates the culprit
                found = [ContentKey(None, None)] * len(group)
            keys.update((c.id, key) for c, key in zip(group, found, strict=True))
        return keys

    def _inspect_and_reuse(
        self, chunk: Chunk, claimed: Sequence[Claimed], models: Sequence[LoadedModel]
    ) -> dict[int, str | None]:
        """Headers and image checks (no pixels); record reused results; return the rest's hashes."""
        futures = [(c, self.decoders.submit(inspect, c, self.locate(c), self.pseudonym_key)) for c in claimed]
        readable: list[Prepared] = []
        for c, future in futures:
            header = _outcome_of(c, future)
            if header.status:
                self._unusable(chunk, c.id, header.status, header.reason, [m.card.name for m in models])
                self.writer.metadata(chunk, header.metadata)
                self.writer.outcome(chunk, c.id, header.status, header.reason)
            else:
                readable.append(header)
        fresh = reuse_known(self.sessions, readable, [m.card for m in models], self.writer, chunk)
        return {p.claimed.id: p.metadata["content_sha256"] for p in fresh}

    def _count_coming(self, change: int) -> None:
        with self._coming_lock:
            self._coming += change

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """While inside, a message's instances are on their way to the streams (being
        claimed, or their keys read for deduplication): partial batches wait for them, up to
        ``RADQ_BATCH_DEADLINE``, instead of running at once."""
        with self._coming_lock:
            self._messages_arriving += 1
        try:
            yield
        finally:
            with self._coming_lock:
                self._messages_arriving -= 1

    def _more_coming(self) -> bool:
        return bool(self._coming or self._messages_arriving)

    def _wait(self, chunk: Chunk) -> ChunkReport:
        if not chunk.done.wait(self.settings.chunk_time_limit):
            log.error(
                "job %s: %d instance(s) not finished after %.0f s (RADQ_CHUNK_TIME_LIMIT); "
                "their leases lapse and the reaper sends them again",
                chunk.job_id, chunk.unsettled, self.settings.chunk_time_limit,
            )  # fmt: skip
        return chunk.report

    # --- the decode processes' dispatcher thread --------------------------------------

    def _decoded(self, group: list[_Decoded], future: Future[list[Prepared]]) -> None:
        error = RadqError("decoding was cancelled") if future.cancelled() else future.exception()
        if error is None:
            for item, prepared in zip(group, future.result(), strict=True):
                item.prepared = prepared
        elif len(group) > 1:
            # Which file crashed or hung the decode process is unknown: each goes again
            # alone, so it alone fails, with its own reason.
            for item in group:
                try:
                    self._decode([item])
                except RuntimeError as exc:  # the pool is shut down
                    item.prepared = _failed(item.claimed, exc)
                    self._ready.put([item])
            return
        else:
            group[0].prepared = _failed(group[0].claimed, error)
        self._ready.put(group)

    # --- the inference streams --------------------------------------------------------

    def _infer_loop(self, stream: _Stream) -> None:
        while True:
            self._log_stages(stream)
            try:
                stop = self._take_decoded(stream)
                if self._more_coming():
                    stream.batcher.run_due()
                else:  # nothing else can join these batches before they run
                    stream.batcher.drain()
                if stop:
                    stream.batcher.drain()
                    return
            except Exception:  # never let the stage die: the reaper re-sends what is lost
                log.exception("inference stage error")

    def _next(self, timeout: float | None) -> list[_Decoded] | _Stop | None:
        """The next decoded instance, waiting up to ``timeout`` seconds (0 or None: not at
        all); None when none came. Calls queued before it run first."""
        while True:
            try:
                item = self._ready.get(timeout=timeout) if timeout else self._ready.get_nowait()
            except queue.Empty:
                return None
            if not isinstance(item, _Call):
                return item
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except BaseException as exc:
                    item.future.set_exception(exc)

    def _take_decoded(self, stream: _Stream) -> bool:
        """Wait for a decoded instance (with a partial batch, until it is due or
        :data:`IDLE_CHECK_S`; idle, the stage log's period), then take every one decoded so
        far, running the batches they fill; returns whether to stop. Streams take from one
        queue: a stream busy with a forward pass leaves what arrives meanwhile to the others."""
        queued = stream.batcher.frames_queued
        waiting = time.perf_counter()
        due_in = stream.batcher.due_in()
        item = self._next(min(due_in, IDLE_CHECK_S) if due_in is not None else STAGE_LOG_S)
        if queued or item is not None:  # idle with nothing to do is not waiting
            stream.waited_s += time.perf_counter() - waiting
        while isinstance(item, list):
            self._count_coming(-len(item))
            for decoded in item:
                self._slots.release()
                self._add(stream, decoded)
            item = self._next(0)
        return item is _STOP

    def _log_stages(self, stream: _Stream) -> None:
        now = time.perf_counter()
        period = now - stream.period_start
        if period < STAGE_LOG_S:
            return
        times, waited = stream.batcher.times.take(), stream.waited_s
        stream.period_start, stream.waited_s = now, 0.0
        if not times.batches:
            return
        log.info(
            "%s, last %.0f s: %d batches, %.1f images each; device preprocessing %.1f s, "
            "model %.1f s, waiting for decoded images %.1f s",
            stream.name, period, times.batches, times.frames / times.batches, times.prep_s, times.model_s,
            waited,
        )  # fmt: skip

    def _unusable(
        self, chunk: Chunk, instance_id: int, status: str, reason: str | None, models: Sequence[str]
    ) -> None:
        """Log a file that ends without inference; count a failure for each of its job's models."""
        with log_context(job_id=chunk.job_id, instance_id=instance_id):
            log.info("instance %s %s: %s", instance_id, status, reason)
        if status == InstanceStatus.FAILED:
            for name in models:
                self.metrics.failed.labels(name).inc()

    def _add(self, stream: _Stream, item: _Decoded) -> None:
        # A stream serves every message: the item carries the ids its log lines need.
        with log_context(job_id=item.chunk.job_id, instance_id=item.claimed.id):
            self._add_in_context(stream, item)

    def _add_in_context(self, stream: _Stream, item: _Decoded) -> None:
        prepared = item.prepared
        assert prepared is not None, "queued before it was decoded"
        if prepared.decode_s is not None:
            self.metrics.decode_seconds.observe(prepared.decode_s)
        self.writer.metadata(item.chunk, prepared.metadata)
        if prepared.status:
            self._unusable(item.chunk, item.claimed.id, prepared.status, prepared.reason, list(item.models))
            self.writer.outcome(item.chunk, item.claimed.id, prepared.status, prepared.reason)
            return
        try:
            threshold = item.explain_threshold
            stream.batcher.add(item.chunk, item.claimed.id, prepared.inputs, item.models, threshold)
        except Exception as exc:  # a bug costs this instance, with its cause, not the chunk's wait
            log.exception("queueing instance %s for inference failed", item.claimed.id)
            reason = f"could not queue for inference: {type(exc).__name__}: {printable(str(exc), 300)}"
            self._unusable(item.chunk, item.claimed.id, InstanceStatus.FAILED, reason, list(item.models))
            self.writer.outcome(item.chunk, item.claimed.id, InstanceStatus.FAILED, reason)
