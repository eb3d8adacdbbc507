"""A real database refusing writes for a moment, and refusing them for good.

A full disk (SQLite) or a server read-only during a failover (PostgreSQL) is a passing
refusal: the writer held nothing, tried each item once and gave it up, so a second's full
disk lost every record and result written meanwhile. They are now held and retried, as in
an outage. A refusal for good is logged without the records' content (SQLAlchemy's error
text held the statement and its parameters: the app's users' inputs, 1.8 KB per item).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from scrutiny import Feedback, Record, Session
from tests.support import deferred_feedbacks as fbs
from tests.support.postgres import postgres_url


def _record(i: int, text: str = "") -> Record:
    now = time.time()
    return Record(app_name="refusals", app_version="v1", input=f"q{i} {text}",
                  output=f"answer {i} " + "x" * 2000, start_time=now, end_time=now)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, str]:
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return request.param, f"sqlite:///{tmp_path}/refusals.sqlite", prefix
    return request.param, postgres_url(), prefix


def _refuse_writes_while(engine: sa.Engine, dialect: str, refusing: list[bool]) -> None:
    """Every connection the session checks out refuses writes while `refusing[0]`: SQLite
    as with its disk full (max_page_count at the file's size: SQLITE_FULL), PostgreSQL as
    a server read-only during a failover (SQLSTATE 25006)."""

    @sa.event.listens_for(engine, "checkout")
    def limit(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_conn.cursor()
        if dialect == "sqlite":
            cursor.execute(f"PRAGMA max_page_count = {1 if refusing[0] else 1073741823}")
        else:
            cursor.execute(f"SET default_transaction_read_only = {'on' if refusing[0] else 'off'}")
            dbapi_conn.commit()
        cursor.close()


def test_a_moment_of_refused_writes_loses_no_record_or_result(
        backend: tuple[str, str, str], caplog: pytest.LogCaptureFixture) -> None:
    dialect, url, prefix = backend
    refusing = [False]
    with Session(url, table_prefix=prefix) as session:
        _refuse_writes_while(session.store.engine, dialect, refusing)  # type: ignore[attr-defined]
        refusing[0] = True
        with caplog.at_level(logging.ERROR, logger="scrutiny"):
            records = [session.ingest(_record(i), [Feedback(fbs.length).on_output()])
                       for i in range(10)]
            assert not session.flush(1.0)  # held: the database refuses them for now
        assert "refuses writes for now" in caplog.text
        refusing[0] = False
        assert session.wait_for_feedback(60)
        frame, _ = session.get_records_and_feedback()
    assert sorted(frame["record_id"]) == sorted(r.record_id for r in records)
    assert set(frame["length status"]) == {"done"}
    assert session.stats()["failed_writes"] == 0


def test_a_write_refused_for_good_is_logged_without_the_records_content(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path}/policy.sqlite"
    with Session(url) as session:
        with session.store.engine.begin() as conn:  # type: ignore[attr-defined]
            conn.exec_driver_sql(
                "CREATE TRIGGER no_more BEFORE INSERT ON scrutiny_records "
                "BEGIN SELECT RAISE(ABORT, 'refused by the retention policy'); END")
        with caplog.at_level(logging.ERROR, logger="scrutiny"):
            session.ingest(_record(1, "my card is 4111 1111 1111 1111"))
            session.flush(10)
    assert "refused by the retention policy" in caplog.text
    assert "4111" not in caplog.text
    assert "INSERT INTO" not in caplog.text


def test_resume_pending_says_storage_error_when_the_database_refuses_the_claim(
        tmp_path: Path) -> None:
    """It raised SQLAlchemy's raw OperationalError (a PostgreSQL server down, a SQLite file
    locked past its busy timeout), where every read raises the documented StorageError."""
    from scrutiny import StorageError

    path = tmp_path / "claims.sqlite"
    with Session(f"sqlite:///{path}", feedback_mode="deferred") as session:
        session.ingest(_record(1), [Feedback(fbs.length).on_output()])
        assert session.flush(10)
        with sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool).begin() as conn:
            conn.exec_driver_sql("ALTER TABLE scrutiny_feedback_results RENAME TO gone")
        with pytest.raises(StorageError, match="could not claim the pending results"):
            session.resume_pending(timeout=5)


def test_the_sqlite_urls_timeout_is_the_busy_timeout(tmp_path: Path) -> None:
    """`?timeout=0.5` was replaced by a 30 s busy timeout on every connection: a claim
    or write behind another process's lock waited 30 s whatever the URL said."""
    for query, expected in (("?timeout=0.5", 500), ("", 30_000)):
        with Session(f"sqlite:///{tmp_path}/t.sqlite{query}") as session, \
                session.store.engine.connect() as conn:  # type: ignore[attr-defined]
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == expected


@pytest.mark.parametrize(("revision", "says"), [
    ("13", "holds revision '13', which is not one of Scrutiny's: the tables with the "
           "prefix 'trulens_' belong to another tool"),
    ("9999", "newer than this version knows"),
])
def test_a_version_table_of_another_tool_or_a_newer_scrutiny_is_told_apart(
        tmp_path: Path, revision: str, says: str) -> None:
    """TruLens keeps its Alembic table as trulens_alembic_version: opened with the prefix
    "trulens_" (a TruLens user's database_prefix), its revision '13' was called "newer than
    this version knows; upgrade the scrutiny package" — which cannot help."""
    from scrutiny import ConfigurationError

    url = f"sqlite:///{tmp_path}/shared.sqlite"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE trulens_alembic_version (version_num VARCHAR(32))"))
        conn.execute(sa.text("INSERT INTO trulens_alembic_version VALUES (:r)"),
                     {"r": revision})
    engine.dispose()
    with pytest.raises(ConfigurationError, match=says):
        Session(url, table_prefix="trulens_")


def test_a_full_disk_met_on_the_drivers_own_connection_is_held(tmp_path: Path) -> None:
    """SQLite's one-statement batches write on the driver's connection: its own
    OperationalError, not SQLAlchemy's wrapping, was taken for a refusal for good, and
    the records of a moment's full disk were lost (seen as a flaky CI failure)."""
    import sqlite3

    with Session(f"sqlite:///{tmp_path}/raw.sqlite") as session:
        store = session.store
        assert store.transient(sqlite3.OperationalError("database or disk is full"))
        assert store.transient(sqlite3.OperationalError("database is locked"))
        assert not store.transient(sqlite3.IntegrityError("UNIQUE constraint failed"))
