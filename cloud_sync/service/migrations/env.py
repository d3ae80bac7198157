"""Alembic's entry point: runs the migrations on the engine database.migrate() passes in
(config.attributes["engine"]); there is no alembic.ini, the URL is the service's."""

from __future__ import annotations

from alembic import context

from cloud_sync.service.models import Base

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
