"""Databases for the fleet service's tests: an SQLite file per test, and one PostgreSQL
database per test session on the machine's server (127.0.0.1:5432, trust auth), made
with a unique name, emptied between tests and dropped at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ADMIN = os.environ.get("SIGHTLINE_TEST_POSTGRES",
                                "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"sightline_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN} (the service's tests "
                    f"need it; set $SIGHTLINE_TEST_POSTGRES to another server): {exc.orig}",
                    pytrace=False)
    url = POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _empty(url: str) -> None:
    """Drop every table (the schema too): each test migrates from nothing."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    """The service's database URL: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cloud.db'}"
    url = request.getfixturevalue("postgres_database")
    _empty(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cloud.db'}"
