"""RADQ_ENV=production: the services refuse development settings, in one message, as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from radq.deployment import production_problems
from radq.services import free_port, spawn, stop, wait_for_http
from radq.settings import Settings
from tests.conftest import REPO, PostgresServer

GOOD_KEY = "k3y-" + "x7" * 20


def _run(args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RADQ_")}
    return subprocess.run(
        [sys.executable, "-m", "radq.cli", *args],
        env={**clean, "RADQ_HOME": str(home), "COLUMNS": "200", **env},
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args", [["api", "--port", "1"], ["worker"], ["scp", "--port", "1"], ["flower", "--port", "1"]]
)
def test_production_refuses_every_development_setting_at_once(args: list[str], tmp_path: Path) -> None:
    done = _run(args, {"RADQ_ENV": "production", "RADQ_AUTH": "false"}, tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    message = " ".join(done.stderr.split())
    assert f"radq {args[0]} will not start with RADQ_ENV=production" in message
    for expected in (
        "RADQ_AUTH is false",
        "set RADQ_AUTH=true",
        "RADQ_PSEUDONYM_KEY is not set",
        "RADQ_DATABASE_URL is the default SQLite file",
    ):
        assert expected in message, message
    assert not (tmp_path / "pseudonym.key").exists()  # nothing generated in production


def test_production_refuses_the_compose_password_and_a_default_key(tmp_path: Path) -> None:
    env = {
        "RADQ_ENV": "production",
        "RADQ_DATABASE_URL": "postgresql+psycopg://radq:radq@127.0.0.1:1/radq",
        "RADQ_PSEUDONYM_KEY": "changeme",
    }
    done = _run(["worker"], env, tmp_path)
    message = " ".join(done.stderr.split())
    assert done.returncode == 1
    assert "uses the password 'radq' from docker-compose.yml" in message
    assert "RADQ_PSEUDONYM_KEY is a well-known default" in message
    assert "RADQ_AUTH" not in message and "SQLite" not in message
    assert "radq:radq" not in message  # the URL itself (a password) is not repeated


def test_production_problems_each_name_their_variable() -> None:
    fine = Settings(env="production", database_url="postgresql://u:s3cret@db/radq", pseudonym_key=GOOD_KEY)  # type: ignore[arg-type]
    assert production_problems(fine) == []
    short = fine.model_copy(update={"pseudonym_key": SecretStr("short-key")})
    assert ["RADQ_PSEUDONYM_KEY has 9 characters" in p for p in production_problems(short)] == [True]
    development = fine.model_copy(update={"env": "development", "auth": False, "database_url": ""})
    assert production_problems(development) == []


def test_production_with_fit_settings_serves_with_tokens(
    postgres: PostgresServer, redis_url: str, tmp_path: Path
) -> None:
    url = postgres.create_database()
    try:
        env = {
            "RADQ_DATABASE_URL": url,
            "RADQ_BROKER_URL": redis_url,
            "RADQ_ENV": "production",
            "RADQ_PSEUDONYM_KEY": GOOD_KEY,
            "RADQ_HOME": str(tmp_path),
        }
        assert _run(["db", "upgrade"], env, tmp_path).returncode == 0
        port = free_port()
        api = spawn(["api", "--port", str(port)], env=env, log_file=tmp_path / "api.log")
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz", api)
            assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").status_code == 401
        finally:
            stop(api)
    finally:
        postgres.drop_database(url)
