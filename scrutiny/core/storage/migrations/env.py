"""Alembic environment: always run programmatically by `scrutiny.core.storage._migrate`."""

from __future__ import annotations

from alembic import context

config = context.config
prefix = config.attributes.get("table_prefix", "scrutiny_")
connection = config.attributes["connection"]

context.configure(
    connection=connection,
    target_metadata=None,
    version_table=f"{prefix}alembic_version",
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations(prefix=prefix)
