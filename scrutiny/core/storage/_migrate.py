"""Bringing a database to the newest schema with the migrations shipped in the package.

Scrutiny keeps its own Alembic version table (``<prefix>alembic_version``), so it can share a
database that already has an Alembic history of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from scrutiny.core._errors import ConfigurationError, StorageError
from scrutiny.core.storage._schema import HEAD_REVISION

__all__ = ["MigratePolicy", "current_revision", "ensure_schema", "upgrade"]

logger = logging.getLogger("scrutiny")

MigratePolicy = Literal["upgrade", "refuse"]
_SCRIPTS = os.path.join(os.path.dirname(__file__), "migrations")

UPGRADE_LOCK_TIMEOUT = "2s"
"""(PostgreSQL) How long one attempt at an upgrade waits for a lock on a table. Another
connection with a transaction open on Scrutiny's tables (a report query, a psql session, an
old dashboard) holds one; while the upgrade waits for it, every other query on that table —
the running apps' writes too — waits behind the upgrade."""
UPGRADE_ATTEMPTS = 6
"""Attempts before an upgrade kept out by such locks gives up (pausing 0.5, 1, 2, 4 and 4 s
between them: with the waits, about 25 s in all)."""
_UPGRADE_PAUSE = wait_exponential(multiplier=0.5, max=4.0)


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
        StorageError: (PostgreSQL) other connections kept the upgrade out of the tables
            with their locks through every attempt; nothing was changed.
    """
    with engine.connect() as reader:
        found = current_revision(reader, prefix)
        reader.rollback()
    if found == HEAD_REVISION:
        return found
    retrying = Retrying(retry=retry_if_exception(_kept_out), stop=stop_after_attempt(
        UPGRADE_ATTEMPTS), wait=_UPGRADE_PAUSE, before_sleep=_still_kept_out(engine, prefix),
        reraise=True)
    try:
        found = retrying(_migrate, engine, write_options, prefix, policy)  # (under the lock)
    except OperationalError as exc:
        if not _kept_out(exc):
            raise
        raise StorageError(
            f"could not upgrade Scrutiny's tables (prefix {prefix!r}) to revision "
            f"{HEAD_REVISION}: other connections hold locks on them, and {UPGRADE_ATTEMPTS} "
            f"attempts each waited {UPGRADE_LOCK_TIMEOUT} for those; nothing was changed. "
            f"{_holders(engine, prefix)}End those transactions (commit or roll back them; "
            "an idle one can be ended with SELECT pg_terminate_backend(<pid>)) and run "
            "`scrutiny db upgrade` again (or restart the app)") from exc
    if found is not None and found != HEAD_REVISION:  # (not upgraded meanwhile by another)
        logger.warning(
            "scrutiny: upgraded the database's Scrutiny schema from revision %s to %s "
            "(table prefix %r). Processes still running an older scrutiny release on it "
            "should be restarted with this one: an older release refuses it when it "
            "starts, and one already running may fail to store what it records",
            found, HEAD_REVISION, prefix)
    return found


def _migrate(engine: Engine, write_options: dict[str, object], prefix: str,
             policy: MigratePolicy) -> str | None:
    """One attempt, in one transaction: the revision found under the lock."""
    with engine.connect() as raw:
        conn = raw.execution_options(**write_options)
        with conn.begin():
            _lock(conn)
            if conn.dialect.name == "postgresql":  # (for the tables' locks: the advisory
                # lock above waits as long as a concurrent upgrade takes)
                conn.execute(text(f"SET LOCAL lock_timeout = '{UPGRADE_LOCK_TIMEOUT}'"))
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
            if found is not None and not (found.isdigit() and len(found) == len(HEAD_REVISION)):
                # (TruLens keeps its Alembic table as trulens_alembic_version: opened with
                # the prefix "trulens_", its revision '13' was "newer than this version
                # knows; upgrade the scrutiny package" — which cannot help)
                raise ConfigurationError(
                    f"the table {_version_table(prefix)} holds revision {found!r}, which is "
                    f"not one of Scrutiny's: the tables with the prefix {prefix!r} belong "
                    "to another tool (TruLens's use 'trulens_'). Give Scrutiny a prefix of "
                    "its own (table_prefix=, or database_prefix= in the TruLens names), or "
                    "another database")
            if found is not None and found > HEAD_REVISION:
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


def _kept_out(exc: BaseException) -> bool:
    """A lock on a table not granted within the attempt's lock_timeout (SQLSTATE 55P03)."""
    return isinstance(exc, OperationalError) and \
        getattr(exc.orig, "sqlstate", None) == "55P03"


def _still_kept_out(engine: Engine, prefix: str) -> Callable[[RetryCallState], None]:
    def say(state: RetryCallState) -> None:
        logger.warning(
            "scrutiny: upgrading Scrutiny's tables (prefix %r) waits for locks other "
            "connections hold on them (attempt %d of %d; trying again in %.1f s). %s",
            prefix, state.attempt_number, UPGRADE_ATTEMPTS,
            state.next_action.sleep if state.next_action else 0.0, _holders(engine, prefix))
    return say


def _holders(engine: Engine, prefix: str) -> str:
    """Which other connections hold locks on the tables, as a sentence (empty when that
    cannot be read: they ended meanwhile, or this role may not see them)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT DISTINCT a.pid, a.application_name, a.usename, a.state, "
                "a.xact_start FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted "
                "AND a.pid <> pg_backend_pid() AND left(c.relname, length(:prefix)) = :prefix "
                "ORDER BY a.xact_start NULLS LAST, a.pid LIMIT 5"), {"prefix": prefix}).all()
            conn.rollback()
    except Exception:  # (only a hint: the error it goes into says what matters)
        logger.debug("scrutiny: reading who holds the tables' locks failed", exc_info=True)
        return ""
    if not rows:
        return ""
    described = "; ".join(
        f"pid {pid} (application {app or '?'!r}, user {user}, {state or 'state unknown'}"
        + (f", in a transaction since {since:%Y-%m-%d %H:%M:%S %Z}".rstrip()
           if since is not None else "") + ")"
        for pid, app, user, state, since in rows)
    return f"Holding them: {described}. "
