"""What the API holds for its lifetime: settings, database sessions, the broker producer."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

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
