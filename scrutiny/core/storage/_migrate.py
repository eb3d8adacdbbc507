"""Bringing a database to the newest schema with the migrations shipped in the package.

Scrutiny keeps its own Alembic version table (``<prefix>alembic_version``), so it can share a
database that already has an Alembic history of its own.
"""

from __future__ import annotations

import os
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, text

from scrutiny.core._errors import ConfigurationError
from scrutiny.core.storage._schema import HEAD_REVISION

__all__ = ["MigratePolicy", "current_revision", "ensure_schema", "upgrade"]

MigratePolicy = Literal["upgrade", "refuse"]
_SCRIPTS = os.path.join(os.path.dirname(__file__), "migrations")


def _version_table(prefix: str) -> str:
    return f"{prefix}alembic_version"


def current_revision(conn: Connection, prefix: str) -> str | None:
    """The revision the database is at (None: Scrutiny's tables are not there)."""
    ctx = MigrationContext.configure(conn, opts={"version_table": _version_table(prefix)})
    return ctx.get_current_revision()


def _lock(conn: Connection) -> None:
    """Serialize concurrent upgrades (SQLite's write lock is already held)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(727274417)"))


def upgrade(conn: Connection, prefix: str, revision: str = "head") -> None:
    """Run the migrations up to `revision` on `conn` (inside its transaction)."""
    config = Config()
    config.set_main_option("script_location", _SCRIPTS)
    config.attributes["connection"] = conn
    config.attributes["table_prefix"] = prefix
    command.upgrade(config, revision)


def ensure_schema(engine: Engine, write_options: dict[str, object], prefix: str,
                  policy: MigratePolicy) -> str | None:
    """Make sure the tables are at the newest revision; returns the revision found first.

    Raises:
        ConfigurationError: the schema is older and `policy` is ``"refuse"``, or newer
            than this version of Scrutiny knows.
    """
    with engine.connect() as reader:
        found = current_revision(reader, prefix)
        reader.rollback()
    if found == HEAD_REVISION:
        return found
    with engine.connect() as raw:
        conn = raw.execution_options(**write_options)
        with conn.begin():
            _lock(conn)
            found = current_revision(conn, prefix)  # again, under the lock
            if found == HEAD_REVISION:
                return found
            if found is not None and (not found.isdigit() or found > HEAD_REVISION):
                raise ConfigurationError(
                    f"the database has Scrutiny schema revision {found!r}, newer than this "
                    f"version knows ({HEAD_REVISION}); upgrade the scrutiny package")
            if found is None and policy == "refuse":
                raise ConfigurationError(
                    f"the database has no Scrutiny tables with the prefix {prefix!r}: check "
                    "the database URL and table_prefix, or create them with `scrutiny db "
                    "upgrade --database-url ...` (or open the Session with "
                    "migrate='upgrade')")
            if found is not None and policy == "refuse":
                raise ConfigurationError(
                    f"the database has Scrutiny schema revision {found}, older than "
                    f"{HEAD_REVISION}; run `scrutiny db upgrade --database-url ...` or open "
                    "the Session with migrate='upgrade'")
            upgrade(conn, prefix)
        return found
