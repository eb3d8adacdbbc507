"""Bringing a database to the newest schema with the migrations shipped in the package.

Scrutiny keeps its own Alembic version table (``<prefix>alembic_version``), so it can share a
database that already has an Alembic history of its own.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text

from scrutiny.core._errors import ConfigurationError
from scrutiny.core.storage._schema import HEAD_REVISION

__all__ = ["MigratePolicy", "current_revision", "ensure_schema", "upgrade"]

logger = logging.getLogger("scrutiny")

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


def _config(conn: Connection, prefix: str) -> Config:
    config = Config()
    config.set_main_option("script_location", _SCRIPTS)
    config.attributes["connection"] = conn
    config.attributes["table_prefix"] = prefix
    return config


def upgrade(conn: Connection, prefix: str, revision: str = "head") -> None:
    """Run the migrations up to `revision` on `conn` (inside its transaction)."""
    command.upgrade(_config(conn, prefix), revision)


def _unstamped_revision(conn: Connection, prefix: str) -> str | None:
    """(The database has no revision stamp.) The revision its tables are at: None when it
    has no Scrutiny tables; "0001" for the first release's, which made its tables without
    Alembic and wrote `schema_version` 1 in ``<prefix>meta`` (they are 0001's, with two of
    0002's columns: 0002 adds only what is missing).

    Raises:
        ConfigurationError: Scrutiny's tables are there, but not as any release made them.
    """
    tables = set(inspect(conn).get_table_names())
    if f"{prefix}records" not in tables:
        return None
    version = None
    if f"{prefix}meta" in tables:
        version = conn.execute(text(
            f'SELECT value FROM "{prefix}meta" WHERE key = \'schema_version\'')).scalar()
    if version == "1":
        return "0001"
    raise ConfigurationError(
        f"the database has Scrutiny's tables with the prefix {prefix!r} but no record of "
        f"their schema revision (no {_version_table(prefix)} table; schema_version "
        f"{version!r}), so Scrutiny cannot tell how to upgrade them; nothing was changed. "
        "Was it made by another tool, or were its tables copied without that one? Open it "
        "with the release that made it, or give this Session another table_prefix")


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
            adopted = None if found is not None else _unstamped_revision(conn, prefix)
            if adopted is not None and policy == "refuse":
                raise ConfigurationError(
                    f"the database has the tables of Scrutiny's first release (revision "
                    f"{adopted}, with no Alembic stamp), older than {HEAD_REVISION}; run "
                    "`scrutiny db upgrade --database-url ...` or open the Session with "
                    "migrate='upgrade'")
            if adopted is not None:
                command.stamp(_config(conn, prefix), adopted)
                found = adopted
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
        if found is not None:
            logger.warning(
                "scrutiny: upgraded the database's Scrutiny schema from revision %s to %s "
                "(table prefix %r). Processes still running an older scrutiny release on it "
                "should be restarted with this one: an older release refuses it when it "
                "starts, and one already running may fail to store what it records",
                found, HEAD_REVISION, prefix)
        return found
