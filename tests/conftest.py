"""Shared fixtures: real Redis, real PostgreSQL and SQLite, real worker and API processes.

A test that needs a service that does not answer is skipped locally and fails under
CI=true, so a CI machine without Redis or PostgreSQL cannot pass by skipping.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from db.status import Scope
from db.tokens import issue_token
from radq.client import Client
from radq.services import free_port, spawn, stop, wait_for_http
from radq.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "radq" / "samples"
IN_CI = os.environ.get("CI", "").lower() == "true"
REDIS_URL = os.environ.get("RADQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("RADQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def unavailable(message: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{message} (required under CI=true)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        unavailable(f"Redis at {REDIS_URL} does not answer: {exc}")
    return REDIS_URL


@dataclass
class PostgresServer:
    admin_url: str

    def create_database(self) -> str:
        name = f"radq_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base = self.admin_url.rsplit("/", 1)[0]
        return f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL} does not answer: {exc}")
    return PostgresServer(POSTGRES_URL)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, migrated database of each kind radq supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'radq.db'}"
        upgrade(url)
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    upgrade(url)
    yield url
    server.drop_database(url)


def make_settings(home: Path, database_url: str, broker_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "database_url": database_url,
        "broker_url": broker_url,
        "queue": f"radq-test-{uuid.uuid4().hex[:8]}",
        "allowed_roots": [home / "archive"],
        "chunk_size": 16,
        # The small model keeps the suite fast; routing tests ask for "auto" themselves.
        "default_models": ["radq-smoke"],
        # Tests resubmit the same sample files; tests of deduplication ask for it per job.
        "dedup": False,
        "batch_size": 8,
        # A key as production has one; the development fallback (a key file) has tests of its own.
        "pseudonym_key": "test-pseudonym-key-0123456789abcdef0123456789",
        **overrides,
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.ensure_dirs()
    (home / "archive").mkdir(exist_ok=True)
    return settings


@dataclass
class Stack:
    """A running API and worker over one database, with handles for assertions.

    The API requires tokens (RADQ_AUTH, as deployed): ``client`` and ``http`` send the
    admin ``token``; raw requests add ``headers``.
    """

    settings: Settings
    api_url: str
    engine: Engine
    sessions: sessionmaker[Session]
    client: Client
    http: httpx.Client
    token: str
    client_name: str
    """The admin token's name, as the audit trail shows it."""
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]

    @property
    def headers(self) -> dict[str, str]:
        """The admin token's Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def archive(self) -> Path:
        return self.settings.allowed_roots[0]


@pytest.fixture(scope="session")
def stack(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("radq-home")
    settings = make_settings(home, database_url, redis_url)
    redis.Redis.from_url(redis_url).delete(settings.queue)
    env = settings.to_env()
    port = free_port()
    api = spawn(["api", "--port", str(port)], env=env, log_file=home / "api.log")
    worker = spawn(
        ["worker", "--concurrency", "1", "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h"],
        env=env,
        log_file=home / "worker.log",
    )
    api_url = f"http://127.0.0.1:{port}"
    engine = make_engine(database_url)
    name = f"stack-{uuid.uuid4().hex[:8]}"
    token = issue_token(database_url, name=name, scope=Scope.ADMIN)
    client = Client(api_url, timeout=120, token=token)
    http = httpx.Client(base_url=api_url, timeout=120, headers={"Authorization": f"Bearer {token}"})
    try:
        wait_for_http(f"{api_url}/healthz", api)
        sessions = make_sessionmaker(engine)
        yield Stack(settings, api_url, engine, sessions, client, http, token, name, api, worker)
    finally:
        http.close()
        client.close()
        stop(worker)
        stop(api)
        engine.dispose()
        for log in ("worker.log", "api.log"):
            path = home / log
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log} (last lines) ---", *tail, sep="\n")
