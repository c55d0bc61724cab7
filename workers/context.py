"""Per-process worker state: database sessions, models, the engine.

Built lazily inside the process that runs tasks, so nothing (CUDA above all) is
initialised in a parent that is about to fork.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker
from radq.blobs import BlobStore, open_blob_store
from radq.settings import Settings
from workers.device import resolve_device
from workers.engine import Engine, torch_threads
from workers.leases import Leases
from workers.metrics import WorkerMetrics
from workers.models.loader import ModelRegistry, Runtime


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    models: ModelRegistry
    blobs: BlobStore
    engine: Engine
    leases: Leases


_context: WorkerContext | None = None
_context_pid: int | None = None
# A worker's first messages arrive together, each on a thread of its own: without the lock
# each built an engine (decode processes, streams, a model registry of its own), and their
# instances never shared a batch.
_building = threading.Lock()


def _runtime(settings: Settings) -> Runtime:
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape per model (batches padded): tuned once
    return Runtime(device, settings.precision, settings.channels_last, settings.compile)


def get_context(settings: Settings, metrics: WorkerMetrics | None = None) -> WorkerContext:
    """The context of the current process, created on first use after any fork.

    ``metrics`` are the worker process's (served on its metrics port); a fresh, unserved
    set by default.
    """
    context = _context
    if context is not None and _context_pid == os.getpid() and context.settings is settings:
        return context
    with _building:
        return _build(settings, metrics)


def _build(settings: Settings, metrics: WorkerMetrics | None) -> WorkerContext:
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid() or _context.settings is not settings:
        if _context is not None and _context_pid == os.getpid():
            _context.engine.close()  # settings changed in-process (tests)
            _context.leases.close()
        runtime = _runtime(settings)
        # Before any stream starts: each thread that runs torch sizes its OpenMP team from it.
        torch.set_num_threads(torch_threads(settings, runtime.device.type))
        database = make_engine(
            settings.resolved_database_url, idle_transaction_timeout=settings.worker_idle_transaction_timeout
        )
        sessions = make_sessionmaker(database)
        models = ModelRegistry(settings.model_dir, runtime)
        blobs = open_blob_store(settings)
        engine = Engine(settings, sessions, models, blobs, metrics)
        leases = Leases(sessions, settings.lease_seconds)
        _context = WorkerContext(settings, sessions, models, blobs, engine, leases)
        _context_pid = os.getpid()
    return _context
