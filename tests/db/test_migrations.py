"""The Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from db.migrate import alembic_config, current, upgrade
from db.models import Base
from db.session import make_engine
from tests.conftest import PostgresServer


def test_migrated_schema_matches_models(database_url: str) -> None:
    upgrade(database_url)  # idempotent: already at head
    assert current(database_url) == "0008"
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'radq.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    request.addfinalizer(lambda: server.drop_database(url))
    return url


def test_0006_keeps_existing_instances_and_downgrades(empty_database: str) -> None:
    """A database in use at 0005 gains tokens, the audit trail and pseudonyms; its rows stay."""
    url = empty_database
    upgrade(url, "0005")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO jobs (id, status, models, priority, created_at) "
                              "VALUES ('j1', 'done', '[]', 'normal', CURRENT_TIMESTAMP)"))  # fmt: skip
            conn.execute(text("INSERT INTO instances (job_id, file_name, storage, location, status, "
                              "attempts, lost_leases, study_instance_uid, updated_at) VALUES ('j1', 'a.dcm', "
                              "'path', '/a.dcm', 'done', 1, 0, '1.2.3', CURRENT_TIMESTAMP)"))  # fmt: skip
        upgrade(url, "0006")
        assert current(url) == "0006"
        with engine.connect() as conn:
            row = conn.execute(text("SELECT study_instance_uid, patient_pseudonym FROM instances")).one()
            assert tuple(row) == ("1.2.3", None)
        tables = set(inspect(engine).get_table_names())
        assert {"api_tokens", "audit_events"} <= tables

        command.downgrade(alembic_config(url), "0005")
        engine.dispose()
        assert current(url) == "0005"
        inspector = inspect(engine)
        assert not {"api_tokens", "audit_events"} & set(inspector.get_table_names())
        assert "patient_pseudonym" not in {c["name"] for c in inspector.get_columns("instances")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 1
    finally:
        engine.dispose()
