"""The service's database: URL -> engine, schema migrations on start, sessions.

The URL is configuration (`--db`, `$SIGHTLINE_CLOUD_DB`), never code: an SQLite file by
default, PostgreSQL by `postgresql+psycopg://user@host/dbname`. The schema comes only
from the Alembic migrations in migrations/ (shipped in the package), applied on start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runtime.errors import ConfigError, SightlineError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
ENV_URL = "SIGHTLINE_CLOUD_DB"


class DatabaseError(SightlineError):
    """The service's database cannot be opened, migrated or written."""


def default_url() -> str:
    """$SIGHTLINE_CLOUD_DB, else an SQLite file in the user's data directory."""
    if os.environ.get(ENV_URL):
        return os.environ[ENV_URL]
    from platformdirs import user_data_dir

    path = Path(user_data_dir("sightline")) / "cloud.db"
    return f"sqlite:///{path}"


def require_sqlalchemy() -> None:
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"the fleet service needs {exc.name}: "
                          "pip install 'sightline[cloud]'") from None


def normalise_url(url: str) -> str:
    """A plain path is an SQLite file; `postgresql://` means the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_engine(url: str):
    """An engine for `url`; for SQLite, the file's directory is made and WAL turned on
    (readers — the API, `sightline fleet history` — never block the ingest)."""
    require_sqlalchemy()
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    url = normalise_url(url)
    try:
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_connection, _record) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise DatabaseError(f"database URL {redact(url)!r} is not usable: {exc}; expected "
                            "e.g. sqlite:///fleet.db or postgresql://user@host/db") from exc
    except ImportError as exc:
        raise DatabaseError(f"database URL {redact(url)!r} needs the driver {exc.name}: "
                            "pip install 'sightline[cloud]'") from exc
    return engine


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{host}" if sep else url


def alembic_config(engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def migrate(engine) -> str:
    """Bring the schema to the newest migration; returns the revision now in force."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.exc import OperationalError

    # Alembic logs every plugin it sets up at INFO: noise in the service's log.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        command.upgrade(alembic_config(engine), "head")
        with engine.connect() as connection:
            revision = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise DatabaseError(f"cannot open the database {redact(str(engine.url))}: "
                            f"{exc.orig}") from exc
    log.info("database %s at schema revision %s", redact(str(engine.url)), revision)
    return revision


def open_database(url: str, *, migrate_schema: bool = True):
    """(engine, sessionmaker) for `url`, migrated to the newest schema; with
    `migrate_schema=False` (the readers), a database the service never set up is a
    DatabaseError instead (and an absent SQLite file is not created)."""
    from sqlalchemy.orm import sessionmaker

    if not migrate_schema:
        _check_exists(url)
    engine = open_engine(url)
    if migrate_schema:
        migrate(engine)
    else:
        from alembic.runtime.migration import MigrationContext
        from sqlalchemy.exc import OperationalError

        try:
            with engine.connect() as connection:
                revision = MigrationContext.configure(connection).get_current_revision()
        except OperationalError as exc:
            engine.dispose()
            raise DatabaseError(f"cannot open the database {redact(str(engine.url))}: "
                                f"{exc.orig}") from exc
        if revision is None:
            engine.dispose()
            raise DatabaseError(f"{redact(url)} is not a fleet service database (no schema); "
                                "`sightline cloud serve --db URL` creates it")
    return engine, sessionmaker(engine, expire_on_commit=False)


def _check_exists(url: str) -> None:
    url = normalise_url(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.split(":///", 1)[1])
        if not path.is_file():
            raise DatabaseError(f"no fleet service database at {path}; start "
                                "`sightline cloud serve` (or give --db / $SIGHTLINE_CLOUD_DB)")
