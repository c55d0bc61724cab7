"""Engines and sessions. Created from settings at an entry point, never at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, idle_transaction_timeout: float | None = None, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so API and workers can share it.

    Args:
        url: SQLAlchemy URL.
        idle_transaction_timeout: PostgreSQL only: seconds a transaction of this engine may
            sit idle before the server ends its session and releases its row locks. Set for
            workers: a host cut off in the middle of a transaction would otherwise hold the
            rows of its instances until TCP keepalive gives up on it (hours), and the
            reaper and every other worker touching those rows would wait as long.
        kwargs: passed to :func:`sqlalchemy.create_engine`.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    if idle_transaction_timeout is not None:
        timeout_ms = max(1, round(idle_transaction_timeout * 1000))
        options = f"-c idle_in_transaction_session_timeout={timeout_ms}"
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "options": options}
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


@contextmanager
def snapshot(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for reading only, whose reads all see one state of the database.

    pysqlite begins a transaction only before a write, so each SELECT of a plain session sees
    the latest commit: an explicit BEGIN makes the reads one WAL snapshot. PostgreSQL's READ
    COMMITTED takes a snapshot per statement; REPEATABLE READ keeps the first one (set on the
    connection, no extra round trip). Nothing is committed: the session ends in a rollback.
    """
    with factory() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.connection().exec_driver_sql("BEGIN")
        else:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session
