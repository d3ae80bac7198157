"""The schema comes from the shipped migrations, equals the models, and runs the same on
SQLite and PostgreSQL; bad URLs are clear errors."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from cloud_sync.service.database import (
    DatabaseError,
    default_url,
    migrate,
    normalise_url,
    open_database,
    open_engine,
    redact,
)
from cloud_sync.service.models import Base


def test_migrations_build_exactly_the_schema_the_models_declare(db_url):
    engine, _ = open_database(db_url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection),
                                           Base.metadata)
        assert differences == []
        tables = set(inspect(engine).get_table_names())
        assert {"devices", "messages", "ota_events", "version_changes", "rollouts",
                "rollout_steps", "gate_checks", "telemetry_samples", "telemetry_rollups",
                "alembic_version"} <= tables
        assert migrate(engine) == "0001"  # a second start migrates nothing
    finally:
        engine.dispose()


def test_a_url_without_a_driver_or_scheme_says_what_to_write(tmp_path):
    with pytest.raises(DatabaseError, match="expected e.g. sqlite:///fleet.db"):
        open_engine("nosuchdb://x")
    assert normalise_url(str(tmp_path / "f.db")) == f"sqlite:///{tmp_path / 'f.db'}"
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"


def test_an_unreachable_database_is_one_clear_error():
    engine = open_engine("postgresql://nobody:secret@127.0.0.1:1/fleet")
    with pytest.raises(DatabaseError, match="cannot open the database") as caught:
        migrate(engine)
    assert "secret" not in str(caught.value)


def test_the_default_database_is_an_sqlite_file_unless_the_environment_names_one(monkeypatch):
    monkeypatch.delenv("SIGHTLINE_CLOUD_DB", raising=False)
    assert default_url().startswith("sqlite:///") and default_url().endswith("cloud.db")
    monkeypatch.setenv("SIGHTLINE_CLOUD_DB", "postgresql://ops@db/fleet")
    assert default_url() == "postgresql://ops@db/fleet"
    assert redact("postgresql://ops:pw@db/fleet") == "postgresql://ops:***@db/fleet"
