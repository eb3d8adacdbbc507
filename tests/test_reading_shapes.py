"""What the readers (tables, leaderboard, pages, the dashboard's list) read and say: writes
still queued are named, lists do not decode span trees, wide leaderboards stay quiet, and
two results of one feedback name on one record are both shown."""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from scrutiny import Feedback, Record, Session
from tests.support.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table_prefix): a fresh SQLite file, or fresh tables on the PostgreSQL server."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reading.sqlite", prefix
    return postgres_url(), prefix


def _record(i: int, **extra: object) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=f"q{i}", output=f"answer {i}",
                  start_time=now + i * 0.001, end_time=now + i * 0.001 + 0.5,
                  **extra)  # type: ignore[arg-type]


def _queued_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "still queued" in r.getMessage()]


# ---------------------------------------------------------------------- 1: queued writes
def test_reads_say_how_many_writes_are_not_in_them(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the SQLite write lock: the records made meanwhile are not in
    the table, and the reader says so (it returned 1 row of 4 without a word)."""
    db = tmp_path / "held.sqlite"
    session = Session(database_url=f"sqlite:///{db}", flush_timeout=0.2)
    try:
        one = Feedback(lambda output: 1.0, name="one").on_output()
        session.ingest(_record(0), [one]).wait_for_feedback_results(timeout=30)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            for i in range(1, 4):
                session.ingest(_record(i))
            with caplog.at_level(logging.WARNING, logger="scrutiny"):
                frame, _ = session.get_records_and_feedback()
                board = session.get_leaderboard()
                session.query_records()
                session.get_apps()
                session.get_feedback_summary()
                frame_waited, _ = session.get_records_and_feedback(wait=True, timeout=0.2)
            said = _queued_warnings(caplog)
            assert len(frame) == 1
            assert len(frame_waited) == 1
            assert int(board["records"].iloc[0]) == 1
            assert len(said) == 6, said
            assert all("3 write(s)" in m for m in said), said
            assert "not in this table" in said[0]
            assert "leaderboard" in said[1]
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert session.flush(60)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scrutiny"):
            frame, _ = session.get_records_and_feedback()
        assert len(frame) == 4
        assert _queued_warnings(caplog) == []
    finally:
        session.close()
