"""The Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db.migrate import current, upgrade
from db.models import Base
from db.session import make_engine


def test_migrated_schema_matches_models(database_url: str) -> None:
    upgrade(database_url)  # idempotent: already at head
    assert current(database_url) == "0006"
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
