"""Per-process worker state: database sessions, models, decode threads.

Built lazily inside the process that runs tasks, so nothing (CUDA above all) is
initialised in a parent that is about to fork.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker
from db.status import StorageKind
from radq.blobs import BlobStore
from radq.settings import Settings
from workers.device import resolve_device
from workers.models.loader import ModelRegistry


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    models: ModelRegistry
    blobs: BlobStore
    executor: ThreadPoolExecutor

    def locate(self, storage: str, location: str) -> Path:
        """Where an instance's bytes are on this host."""
        if storage == StorageKind.BLOB:
            return self.blobs.path_for(location)
        return Path(location)


_context: WorkerContext | None = None
_context_pid: int | None = None


def get_context(settings: Settings) -> WorkerContext:
    """The context of the current process, created on first use after any fork."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid() or _context.settings is not settings:
        if _context is not None and _context_pid == os.getpid():
            _context.executor.shutdown(wait=False)  # settings changed in-process (tests)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        _context = WorkerContext(
            settings=settings,
            sessions=make_sessionmaker(make_engine(settings.resolved_database_url)),
            models=ModelRegistry(settings.model_dir, resolve_device(settings.device)),
            blobs=BlobStore(settings.resolved_blob_dir),
            executor=ThreadPoolExecutor(
                max_workers=settings.decode_threads, thread_name_prefix="radq-decode"
            ),
        )
        _context_pid = os.getpid()
    return _context
