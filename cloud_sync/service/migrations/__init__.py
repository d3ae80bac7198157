"""Alembic migrations of the fleet service's schema, applied by database.migrate()."""
