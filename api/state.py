"""What the API holds for its lifetime: settings, database sessions, the broker producer."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.disk import DiskReserve
from db.session import make_engine, make_sessionmaker
from radq.blobs import BlobStore, open_blob_store
from radq.queue import make_celery
from radq.settings import Settings


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    blobs: BlobStore

    @property
    def reserve(self) -> DiskReserve:
        """The free space uploads leave on their spool's disk (RADQ_MIN_FREE_BYTES)."""
        return DiskReserve(self.blobs.spool_dir, self.settings.min_free_bytes)

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        """Engine, sessions, broker producer and blob store for ``settings``."""
        settings.ensure_dirs()
        engine = make_engine(settings.resolved_database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            celery=make_celery(settings),
            blobs=open_blob_store(settings),
        )
