"""The embedded stack the pipeline figure runs on: one API, one worker, a fresh database.

Started the way ``radq demo`` starts it (migrate, then ``radq api`` and ``radq worker``
as child processes) on a queue of its own, and stopped, database included, on exit.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine

from db.migrate import upgrade
from db.session import make_engine
from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.errors import ConfigurationError, RadqError
from radq.model_card import cards_in
from radq.queue import redis_queue_keys
from radq.routing import all_queues
from radq.services import ensure_redis, free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from workers.engine import usable_cores

DATABASES = ("sqlite", "postgresql")
"""Database kinds the pipeline figure can run on."""
LOG_TAIL_LINES = 20
"""Lines of each service log shown when a run fails."""

log = logging.getLogger(__name__)


class BenchError(RadqError):
    """Raised when a benchmark phase cannot finish (a service died, a job timed out)."""


@dataclass
class Stack:
    """A running API and worker, with a client and a direct handle on their database."""

    settings: Settings
    api_url: str
    client: Client
    engine: Engine
    token: str
    """An admin API token (the stack runs with RADQ_AUTH on, as deployed)."""
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None
    logs: Path

    def check_alive(self) -> None:
        """Raise when the API or the worker has exited.

        Raises:
            BenchError: one of them exited; the message quotes its log.
        """
        for name, proc in (("worker", self.worker), ("api", self.api)):
            if proc is not None and proc.poll() is not None:
                raise BenchError(
                    f"the {name} exited with code {proc.returncode}:\n{log_tail(self.logs / f'{name}.log')}"
                )


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def create_postgres_database(admin_url: str) -> str:
    import psycopg  # here, not at the top: a SQLite run needs no libpq (the GPU host has none)

    name = f"radq_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(f"cannot create a database through {admin_url}: {exc}") from None
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def drop_postgres_database(admin_url: str, url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def embedded_stack(
    base: Settings, *, home: Path, database: str, postgres_admin_url: str, worker: bool = True
) -> Iterator[Stack]:
    """Start Redis if needed, a fresh migrated database, the API and (unless told not) one worker.

    Args:
        base: settings to start from; home, database URL and queue are replaced.
        home: an empty folder for RADQ_HOME (blobs, SQLite file, logs).
        database: ``sqlite`` or ``postgresql``.
        postgres_admin_url: a PostgreSQL URL allowed to CREATE DATABASE (``postgresql`` only).

    Raises:
        BenchError: the database cannot be created, or the API does not answer.
        ConfigurationError: Redis cannot be reached or started.
    """
    if database not in DATABASES:
        raise ValueError(f"database must be one of {', '.join(DATABASES)}, got {database!r}")
    logs = home / "logs"
    with contextlib.ExitStack() as cleanup:  # undone in reverse, each step even if another fails
        redis_proc = ensure_redis(base.broker_url, home / "redis")
        if redis_proc is not None:
            cleanup.callback(_quietly, stop, redis_proc)
        url = f"sqlite:///{(home / 'radq.db').resolve()}"
        if database == "postgresql":
            url = create_postgres_database(postgres_admin_url)
            cleanup.callback(_quietly, drop_postgres_database, postgres_admin_url, url)
        tag = uuid.uuid4().hex[:8]
        # Queues of its own: the bench never feeds, or is fed by, other workers.
        queue = f"radq-bench-{tag}"
        settings = base.model_copy(
            update={"home": home, "database_url": url, "queue": queue, "queue_prefix": f"{queue}."}
        )
        cleanup.callback(_quietly, _delete_queue, settings)
        settings.ensure_dirs()
        upgrade(settings.resolved_database_url)
        token = issue_token(settings.resolved_database_url, name=f"bench-{tag}", scope=Scope.ADMIN)
        env = settings.to_env()
        port = free_port()
        api = spawn(["api", "--port", str(port)], env=env, log_file=logs / "api.log")
        cleanup.callback(_quietly, stop, api)
        worker_proc = None
        if worker:
            worker_proc = start_worker(settings, logs / "worker.log")
            cleanup.callback(_quietly, stop, worker_proc)
        api_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{api_url}/healthz", api)
        except ConfigurationError as exc:
            raise BenchError(f"{exc}:\n{log_tail(logs / 'api.log')}") from None
        engine = make_engine(settings.resolved_database_url)
        cleanup.callback(engine.dispose)
        client = Client(api_url, timeout=600, token=token)
        cleanup.callback(client.close)
        yield Stack(settings, api_url, client, engine, token, api, worker_proc, logs)


def start_worker(settings: Settings, log_file: Path) -> subprocess.Popen[bytes]:
    """One ``radq worker`` (RADQ_WORKER_CONCURRENCY messages in hand) on the stack's queue; the
    caller stops it."""
    name = f"bench-{uuid.uuid4().hex[:8]}@%h"
    args = ["worker", "--hostname", name]
    return spawn(args, env=settings.to_env(), log_file=log_file)


def decode_processes(settings: Settings) -> int:
    """Processes one worker process decodes with (RADQ_DECODE_PROCESSES; 0: its usable cores)."""
    return settings.decode_processes or usable_cores()


def _delete_queue(settings: Settings) -> None:
    cards = cards_in(settings.model_dir)
    keys = [key for queue in all_queues(settings, cards) for key in redis_queue_keys(queue)]
    redis.Redis.from_url(settings.broker_url).delete(*keys)


def _quietly(func: Callable[..., object], *args: object) -> None:
    """Run one cleanup step; a failure must not keep the later steps from running."""
    try:
        func(*args)
    except Exception as exc:
        log.warning("cleanup step %s failed: %s", getattr(func, "__name__", func), exc)
