"""Shared fixtures: real Redis, real PostgreSQL and SQLite, real worker and API processes.

A test that needs a service that does not answer is skipped locally and fails under
CI=true, so a CI machine without Redis or PostgreSQL cannot pass by skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def own_database_url(
    database_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, migrated database of the session's kind, for tests whose API changes every job
    in its database (the blob retention sweep)."""
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('own-sqlite') / 'radq.db'}"
        upgrade(url)
        yield url
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    upgrade(url)
    yield url
    server.drop_database(url)


def make_settings(home: Path, database_url: str, broker_url: str, **overrides: object) -> Settings:
    queue = str(overrides.get("queue", f"radq-test-{uuid.uuid4().hex[:8]}"))
    values: dict[str, object] = {
        "home": home,
        "database_url": database_url,
        "broker_url": broker_url,
        "queue": queue,
        # Routed queues (gpu, cpu, model.<name>) of their own too: tests share a Redis database.
        "queue_prefix": f"{queue}.",
        "allowed_roots": [home / "archive"],
        "chunk_size": 16,
        # The small model keeps the suite fast; routing tests ask for "auto" themselves.
        "default_models": ["radq-smoke"],
        # Tests resubmit the same sample files; tests of deduplication ask for it per job.
        "dedup": False,
        "batch_size": 8,
        # Some tests read uploaded files after their job ended; retention tests ask for 0.
        "blob_retention_days": 1.0,
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
    with running_stack(make_settings(home, database_url, redis_url)) as running:
        yield running


@contextmanager
def running_stack(settings: Settings, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """``radq api`` and one ``radq worker`` for ``settings`` (plus ``extra_env``, e.g. AWS_*)."""
    home, database_url = settings.home, settings.database_url
    redis.Redis.from_url(settings.broker_url).delete(settings.queue)
    env = {**settings.to_env(), **(extra_env or {})}
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


@dataclass
class S3Server:
    """moto's S3 over real HTTP, in a process of its own, with the AWS_* env that reaches it."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "radq-test",
            "AWS_SECRET_ACCESS_KEY": "radq-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="radq-test",
            aws_secret_access_key="radq-test-secret",
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"radq-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"the S3 tests need boto3 and moto[server] (the dev extra): {exc}")
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                server.client().list_buckets()
                break
            except Exception as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    unavailable(f"moto's S3 server did not start: {exc}: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        yield server
    finally:
        stop(proc)
