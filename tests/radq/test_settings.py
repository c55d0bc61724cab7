"""Settings come from RADQ_* variables, read when built, not at import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from radq.settings import Settings


def test_env_names_and_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADQ_HOME", str(tmp_path))
    monkeypatch.setenv("RADQ_ALLOWED_ROOTS", os.pathsep.join(["/mnt/a", "/mnt/b"]))
    monkeypatch.setenv("RADQ_CHUNK_SIZE", "128")
    monkeypatch.setenv("RADQ_DEVICE", "cuda:1")
    s = Settings()
    assert s.allowed_roots == [Path("/mnt/a"), Path("/mnt/b")]
    assert s.chunk_size == 128 and s.device == "cuda:1"
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'radq.db'}"
    assert s.resolved_blob_dir == (tmp_path / "blobs").resolve()


def test_postgres_urls_use_psycopg3() -> None:
    s = Settings(database_url="postgresql://u@h/db")
    assert s.resolved_database_url == "postgresql+psycopg://u@h/db"


def test_round_trip_through_env(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(allowed_roots=[Path("/x"), Path("/y")], default_models=["a", "b"], batch_size=4)
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


@pytest.mark.parametrize("name,value", [("RADQ_DEVICE", "gpu"), ("RADQ_CHUNK_SIZE", "0")])
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
