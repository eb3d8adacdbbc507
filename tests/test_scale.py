"""Deferred evaluation, workers, leases, crash recovery, migrations — on SQLite and on a real
PostgreSQL server (``SCRUTINY_TEST_POSTGRES_URL``; `.ci/run` starts one and sets
``SCRUTINY_REQUIRE_POSTGRES=1`` so these tests fail rather than skip without it)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from scrutiny import (
    ConfigurationError,
    Feedback,
    FeedbackMode,
    FeedbackStatus,
    Record,
    Session,
    StorageError,
)
from scrutiny.core import _feedback
from scrutiny.core._worker import Worker
from scrutiny.core.storage import HEAD_REVISION, SQLStore, UpdateResult, current_revision, upgrade
from tests.support import deferred_feedbacks as fbs
from tests.support import other_feedbacks
from tests.support.postgres import postgres_url

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table_prefix): a fresh SQLite file, or fresh tables on the PostgreSQL server."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/scale.sqlite", prefix
    return postgres_url(), prefix


@pytest.fixture
def pg() -> tuple[str, str]:
    """(url, table_prefix) of fresh tables on the PostgreSQL server."""
    return postgres_url(), f"t{uuid.uuid4().hex[:10]}_"


@dataclasses.dataclass
class _Answer:
    text: str


def make_record(i: int = 0) -> Record:
    now = time.time()
    return Record(app_name="scale", app_version="v1", input=f"q{i}", output=f"out-{i}",
                  start_time=now, end_time=now)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # polling the database under test, bounded by the deadline


def _worker(url: str, prefix: str, *extra: str, env: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "scrutiny.cli", "worker", "--table-prefix", prefix,
           "--import-path", str(REPO), "--poll-interval", "0.05", "--log-every", "1", *extra]
    full_env = {**os.environ, "SCRUTINY_DATABASE_URL": url, **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return out


# ---------------------------------------------------------------------- deferred mode
def test_deferred_refuses_a_lambda_at_registration(backend: tuple[str, str]) -> None:
    url, prefix = backend
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as s:
        with pytest.raises(ConfigurationError, match="lambda cannot be imported"):
            s.check_feedbacks([Feedback(lambda output: 1.0, name="l").on_output()])
        s.check_feedbacks([Feedback(fbs.length).on_output()])


def test_deferred_app_stores_pending_and_an_in_process_worker_evaluates(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    app = Session(url, table_prefix=prefix, feedback_mode=FeedbackMode.DEFERRED)
    fb = Feedback(fbs.length).on_output()
    records = [app.ingest(make_record(i), [fb]) for i in range(10)]
    assert app.flush(10)
    df, _ = app.get_records_and_feedback()
    assert (df["length status"] == "pending").all()
    with Session(url, table_prefix=prefix) as worker_session:
        worker = worker_session.start_worker(poll_interval=0.05)
        results = records[0].wait_for_feedback_results(timeout=30)  # watched in the app
        assert results[fb].status is FeedbackStatus.DONE
        assert app.wait_for_feedback(30)
        worker.stop(10)
    df, _ = app.get_records_and_feedback()
    assert (df["length status"] == "done").all()
    app.close()


@pytest.mark.parametrize("how", ["start_worker", "resume_pending"])
def test_a_deferred_record_evaluated_by_its_own_sessions_worker_resolves_here(
        backend: tuple[str, str], how: str) -> None:
    """The app's session evaluating its own deferred results: the record's wait, callback
    and the session's listeners must see them (they stayed pending for ever: the worker
    finished a copy of the record read back from the database)."""
    url, prefix = backend
    heard: list[str] = []
    with Session(url, table_prefix=prefix, feedback_mode=FeedbackMode.DEFERRED,
                 on_result=[lambda result, record: heard.append(result.feedback_name)]) as s:
        fb = Feedback(fbs.length).on_output()
        record = s.ingest(make_record(), [fb])
        called = threading.Event()
        record.wait_for_feedback_results(callback=lambda results: called.set())
        assert s.flush(10)
        if how == "start_worker":
            worker = s.start_worker(poll_interval=0.05)
            results = record.wait_for_feedback_results(timeout=30)
            worker.stop(10)
        else:
            assert s.resume_pending(timeout=30) == 1
            results = record.wait_for_feedback_results(timeout=30)
        assert results[fb].status is FeedbackStatus.DONE
        assert results[fb].result == pytest.approx(0.05)
        assert called.wait(10)
    # once, not once per path that saw it end (after close(), which delivers what the
    # notifier still held: the record's callback runs before the session's listeners, so
    # right after `called` the listener may not have run yet)
    assert heard == ["length"]


def test_late_result_of_an_expired_lease_cannot_overwrite(backend: tuple[str, str]) -> None:
    url, prefix = backend
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        app.ingest(make_record(), [Feedback(fbs.length).on_output()])
        assert app.flush(10)
        store = app.store
        now = datetime.now(timezone.utc)
        first = store.claim(worker_id="a", token="tok-a", limit=10, lease_seconds=1, now=now)
        assert len(first) == 1
        assert store.claim(worker_id="b", token="tok-b", limit=10, lease_seconds=60,
                           now=now) == []  # held: nobody else gets it
        later = now + timedelta(seconds=5)  # a's lease ran out
        second = store.claim(worker_id="b", token="tok-b", limit=10, lease_seconds=60,
                             now=later)
        assert [r["result_id"] for r in second] == [first[0]["result_id"]]
        assert second[0]["attempts"] == 2
        rid = first[0]["result_id"]
        store.write([UpdateResult(rid, {"status": "done", "score": 0.1}, lease_token="tok-a")])
        store.write([UpdateResult(rid, {"status": "done", "score": 0.9}, lease_token="tok-b")])
        store.write([UpdateResult(rid, {"status": "done", "score": 0.5}, lease_token="tok-a")])
        row = store.results_by_ids([rid])[0]
        assert (row["status"], row["score"]) == ("done", 0.9)


def test_resume_pending_finishes_what_a_closed_session_left(backend: tuple[str, str]) -> None:
    url, prefix = backend
    first = Session(url, table_prefix=prefix)
    hang = Feedback(fbs.slow_forever_unless_resumed).on_output()
    quick = Feedback(fbs.length).on_output()
    first.ingest(make_record(), [hang, quick])
    assert first.flush(10)
    _wait_until(lambda: first.stats()["unfinished_feedback"] == 1, 20, "the quick one")
    assert first.close(timeout=0.5) is False  # the slow one is released as pending
    with Session(url, table_prefix=prefix) as second:
        counts = second.store.count_results()
        assert counts == {"done": 1, "pending": 1}
        os.environ["SCRUTINY_TEST_RESUMED"] = "1"
        try:
            assert second.resume_pending(timeout=30) == 1  # only the unfinished one
        finally:
            del os.environ["SCRUTINY_TEST_RESUMED"]
        assert second.store.count_results() == {"done": 2}


@pytest.mark.parametrize("how", ["start_worker", "resume_pending"])
def test_a_deferred_feedback_reads_the_stored_record_in_the_apps_process_too(
        backend: tuple[str, str], how: str) -> None:
    """Evaluated by the app's own session, a deferred feedback got the live objects (a
    Document, a pydantic model); by a worker elsewhere, their stored JSON form — so it
    passed in development and failed in production."""
    url, prefix = backend
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as s:
        fb = Feedback(fbs.output_kind).on_output()
        record = s.ingest(Record(app_name="scale", app_version="v1", input="q",
                                 output=_Answer("hi"), start_time=1.0, end_time=2.0), [fb])
        assert s.flush(10)
        if how == "start_worker":
            worker = s.start_worker(poll_interval=0.05)
            result = record.wait_for_feedback_results(timeout=30)[fb]
            worker.stop(10)
        else:
            assert s.resume_pending(timeout=30) == 1
            result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.explanation == "dict"  # as a worker in another process reads it


def test_a_worker_without_a_feedbacks_code_leaves_its_results_for_one_with_it(
        backend: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker deployed without a feedback's module failed its results for good: the
    worker that had the code never got them. Now it gives the claims back (pending, free,
    attempts as before), says why, and claims none of that feedback for a while."""
    url, prefix = backend
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        fb = Feedback(fbs.length).on_output()
        record = app.ingest(make_record(), [fb])
        assert app.flush(10)
        other = app.ingest(make_record(1), [Feedback(other_feedbacks.text_length).on_output()])
        assert app.flush(10)
        monkeypatch.setitem(sys.modules, fbs.__name__, None)  # "not installed here"
        # (nor defined here: a worker's process holds no Feedback of the app's)
        monkeypatch.setattr(_feedback, "_DEFINED_HERE", weakref.WeakValueDictionary())
        with Session(url, table_prefix=prefix) as lacking, caplog.at_level(
                logging.ERROR, logger="scrutiny"):
            worker = Worker(lacking, poll_interval=0.0, batch_size=1, max_claims=5)
            assert worker.drain() == 1  # past the one it gives back, to the one it can load
            assert worker.drain() == 0  # not claimed again meanwhile
            assert worker.claimed == 1
            assert lacking.wait_for_feedback(10)
        rows = [r for r in app.store.records_and_results()[1]
                if r["feedback_name"] == "length"]
        assert [(r["status"], r["worker_id"], r["lease_token"], r["attempts"])
                for r in rows] == [("pending", None, None, 0)]
        assert other.wait_for_feedback_results(timeout=10)[
            next(iter(other.feedback_results))].status is FeedbackStatus.DONE
        assert caplog.text.count("could not be loaded") == 1
        assert "stay pending for a worker that can load it" in caplog.text
        monkeypatch.undo()
        with Session(url, table_prefix=prefix) as equipped:
            assert equipped.resume_pending(timeout=30) == 1
        result = record.wait_for_feedback_results(timeout=30)[fb]
        assert result.status is FeedbackStatus.DONE
        assert result.attempts == 1


# ---------------------------------------------------------------------- worker processes
@pytest.mark.timeout(240)
def test_four_worker_processes_evaluate_1000_results_exactly_once(
        pg: tuple[str, str], tmp_path: Path) -> None:
    url, prefix = pg
    calls = tmp_path / "calls.txt"
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        fb = Feedback(fbs.marks_calls).on_output()
        for i in range(1000):
            app.ingest(make_record(i), [fb])
        assert app.flush(60)
        assert app.store.count_results() == {"pending": 1000}
        workers = [_worker(url, prefix, "--concurrency", "8",
                           env={"SCRUTINY_TEST_CALLS": str(calls)}) for _ in range(4)]
        try:
            _wait_until(lambda: app.store.count_results().get("done") == 1000, 180,
                        "1000 results done")
        finally:
            outputs = [_stop(w) for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0, 0], outputs
        lines = calls.read_text().splitlines()
        assert len(lines) == 1000
        assert len(set(lines)) == 1000  # none twice, none lost
        df, _ = app.get_records_and_feedback(limit=2000)
    assert (df["marks_calls status"] == "done").all()
    assert sum("stopped cleanly" in out for out in outputs) == 4
    with _engine(url).connect() as conn:
        attempts = conn.execute(sa.text(
            f"SELECT max(attempts), count(DISTINCT worker_id) FROM {prefix}feedback_results"
        )).one()
    assert attempts[0] == 1
    assert attempts[1] >= 2  # the work was really shared


@pytest.mark.timeout(180)
def test_a_killed_workers_claims_are_completed_by_another(pg: tuple[str, str],
                                                           tmp_path: Path) -> None:
    url, prefix = pg
    flag = tmp_path / "hang"
    flag.write_text("1")
    env = {"SCRUTINY_TEST_HANG": str(flag)}
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        fb = Feedback(fbs.hangs_once).on_output()
        records = [app.ingest(make_record(i), [fb]) for i in range(5)]
        assert app.flush(10)
        victim = _worker(url, prefix, "--lease", "2", env=env)
        try:
            _wait_until(lambda: Path(str(flag) + ".started").exists(), 60, "the hang")
            # (the hanging one is stored `running` once it has run a quarter second)
            _wait_until(lambda: app.store.count_results() == {"done": 4, "running": 1}, 60,
                        "4 done and the hanging one running")
        finally:
            victim.kill()  # SIGKILL: no chance to release its claim
            victim.communicate(timeout=30)
        rows = app.store.records_and_results()[1]
        assert sorted(r["status"] for r in rows) == ["done"] * 4 + ["running"], [
            r["error"] for r in rows]
        rescuer = _worker(url, prefix, "--lease", "2", env=env)
        try:
            for record in records:
                assert record.wait_for_feedback_results(timeout=60)[fb].status is \
                    FeedbackStatus.DONE
        finally:
            _stop(rescuer)
    with _engine(url).connect() as conn:
        attempts = sorted(conn.execute(sa.text(
            f"SELECT attempts FROM {prefix}feedback_results")).scalars())
    assert attempts == [1, 1, 1, 1, 2]


APP_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from scrutiny import Feedback, Record, Session
from tests.support import deferred_feedbacks as fbs
s = Session({url!r}, table_prefix={prefix!r}, lease_seconds=2)
now = time.time()
s.ingest(Record(app_name="killed", app_version="v", input="q", output="o",
                start_time=now, end_time=now), [Feedback(fbs.hangs_once).on_output()])
s.flush(10)
print("stored", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(180)
def test_app_killed_with_work_in_flight_leaves_it_for_a_worker(pg: tuple[str, str],
                                                                tmp_path: Path) -> None:
    url, prefix = pg
    flag = tmp_path / "hang"
    flag.write_text("1")
    env = {**os.environ, "SCRUTINY_TEST_HANG": str(flag)}
    app = subprocess.Popen([sys.executable, "-c", APP_SCRIPT.format(
        repo=str(REPO), url=url, prefix=prefix)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "stored"
        _wait_until(lambda: Path(str(flag) + ".started").exists(), 60, "the evaluation")
    finally:
        app.kill()
        app.communicate(timeout=30)
    with Session(url, table_prefix=prefix) as reader:
        df, _ = reader.get_records_and_feedback()
        assert df.loc[0, "hangs_once status"] in ("pending", "running")  # not lost
        worker = _worker(url, prefix, "--lease", "2", env={"SCRUTINY_TEST_HANG": str(flag)})
        try:
            _wait_until(lambda: reader.store.count_results() == {"done": 1}, 60,
                        "the worker to finish the killed app's work")
        finally:
            _stop(worker)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_releases_unfinished_claims(pg: tuple[str, str], tmp_path: Path,
                                            signals: int) -> None:
    """Once: after --grace (1 s). Twice, with a grace of 300 s: at once — a worker told
    again used to go on waiting (a minute here: the feedback hangs that long), where an
    operator pressing Ctrl-C again expects it to let go now."""
    url, prefix = pg
    flag = tmp_path / "hang"
    flag.write_text("1")
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        app.ingest(make_record(), [Feedback(fbs.hangs_once).on_output()])
        assert app.flush(10)
        grace = "1" if signals == 1 else "300"
        worker = _worker(url, prefix, "--grace", grace, env={"SCRUTINY_TEST_HANG": str(flag)})
        _wait_until(lambda: Path(str(flag) + ".started").exists(), 60, "the claim")
        try:
            worker.send_signal(signal.SIGTERM)
            assert worker.stdout is not None
            lines = []
            while not lines or "claiming no more" not in lines[-1]:  # (heard the first)
                line = worker.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
            if signals == 2:
                worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=20)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate(timeout=30)
        assert worker.returncode == 0, out
        assert ("releasing the unfinished work as pending now" in out) == (signals == 2)
        assert "released as pending" in out
        # (the time it took, not the grace it was given: "after 300.0s" when told twice)
        took = float(out.split("had no stored end state after ")[1].split("s")[0])
        assert took < 30, out
        assert ("(told to stop again)" in out) == (signals == 2)
        rows = app.store.records_and_results()[1]
        assert [(r["status"], r["worker_id"]) for r in rows] == [("pending", None)]


@pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning")
def test_dropped_connection_is_survived(pg: tuple[str, str]) -> None:
    # The test kills the session's server connections under it; psycopg can then leave
    # a killed connection's object to the garbage collector unclosed (a ResourceWarning at
    # whatever moment the collector runs). It is collected here, inside this test.
    url, prefix = pg
    with Session(url, table_prefix=prefix) as s:
        fb = Feedback(fbs.length).on_output()
        s.ingest(make_record(1), [fb]).wait_for_feedback_results(timeout=10)
        with _engine(url).connect() as admin:
            killed = admin.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'")).scalar()
            admin.commit()
        assert killed
        assert killed >= 1
        result = s.ingest(make_record(2), [fb]).wait_for_feedback_results(timeout=30)[fb]
        assert result.status is FeedbackStatus.DONE
        assert len(s.get_records_and_feedback()[0]) == 2
    gc.collect()


# ---------------------------------------------------------------------- migrations
def _engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    return engine


def test_migrations_create_a_fresh_database_and_rerun_harmlessly(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    store = SQLStore(url, table_prefix=prefix)
    assert store.found_revision is None
    store.close()
    again = SQLStore(url, table_prefix=prefix)
    assert again.found_revision == HEAD_REVISION
    again.close()
    with _engine(url).connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION
        tables = set(sa.inspect(conn).get_table_names())
    assert {f"{prefix}records", f"{prefix}feedback_results",
            f"{prefix}alembic_version"} <= tables


def test_a_database_at_the_first_revision_is_upgraded_with_its_data(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    engine = _engine(url)
    with engine.begin() as conn:
        upgrade(conn, prefix, "0001")
        conn.execute(sa.text(
            f"INSERT INTO {prefix}apps (app_id, app_name, app_version, created_at) "
            "VALUES ('old:v0', 'old', 'v0', :now)"),
            # (as text: sqlite3's default datetime adapter is deprecated since Python 3.12)
            {"now": datetime.now(timezone.utc).isoformat(" ")})
    with pytest.raises(ConfigurationError, match="scrutiny db upgrade"):
        Session(url, table_prefix=prefix, migrate="refuse")
    with Session(url, table_prefix=prefix) as s:
        s.ingest(make_record(), [Feedback(fbs.length).on_output()])
        assert s.wait_for_feedback(20)
        assert len(s.get_records_and_feedback()[0]) == 1
    with engine.connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION
        assert conn.execute(sa.text(f"SELECT app_name FROM {prefix}apps "
                                    "WHERE app_id = 'old:v0'")).scalar() == "old"


def _first_release_tables(conn: sa.Connection, prefix: str) -> None:
    """The tables as Scrutiny's first release made them: 0001's, with `worker_id` and
    `lease_expires_at` on the results, a `meta` table saying schema_version 1, and no
    Alembic stamp; holding one record with a done result."""
    upgrade(conn, prefix, "0001")
    conn.execute(sa.text(f"DROP TABLE {prefix}alembic_version"))
    conn.execute(sa.text(f"ALTER TABLE {prefix}feedback_results ADD COLUMN worker_id "
                         "VARCHAR(255)"))
    conn.execute(sa.text(f"ALTER TABLE {prefix}feedback_results ADD COLUMN "
                         "lease_expires_at TIMESTAMP"))
    conn.execute(sa.text(f"CREATE TABLE {prefix}meta (key VARCHAR(64) PRIMARY KEY, "
                         "value TEXT NOT NULL)"))
    conn.execute(sa.text(f"INSERT INTO {prefix}meta VALUES ('schema_version', '1')"))
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).isoformat(" ")
    conn.execute(sa.text(f"INSERT INTO {prefix}apps VALUES ('first:v0', 'first', 'v0', NULL, "
                         ":now)"), {"now": now})
    conn.execute(sa.text(
        f"INSERT INTO {prefix}records (record_id, app_id, app_name, app_version, status, "
        "input_json, output_json, start_time, end_time, latency_s, created_at) VALUES "
        "('r-first', 'first:v0', 'first', 'v0', 'ok', '\"q\"', '\"an answer\"', :now, :now, "
        "0.5, :now)"), {"now": now})
    conn.execute(sa.text(
        f"INSERT INTO {prefix}feedback_results (result_id, record_id, app_id, feedback_id, "
        "feedback_name, status, score, attempts, created_at, updated_at) VALUES "
        "('res-first', 'r-first', 'first:v0', 'fb', 'length', 'done', 0.25, 1, :now, :now)"),
        {"now": now})


def test_a_database_of_the_first_release_is_adopted_and_upgraded(
        backend: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """The first release made its tables without Alembic: opening them said "no Scrutiny
    tables", and `scrutiny db upgrade` then failed creating a table that was there."""
    url, prefix = backend
    engine = _engine(url)
    with engine.begin() as conn:
        _first_release_tables(conn, prefix)
    with pytest.raises(ConfigurationError, match=r"first release.*scrutiny db upgrade"):
        Session(url, table_prefix=prefix, migrate="refuse")
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        session = Session(url, table_prefix=prefix)
    with session as s:
        assert s.store.found_revision == "0001"  # type: ignore[attr-defined]
        frame, _ = s.get_records_and_feedback()
        assert frame["record_id"].tolist() == ["r-first"]
        assert frame["length"].tolist() == [0.25]
        assert frame["length status"].tolist() == ["done"]
        s.ingest(make_record(), [Feedback(fbs.length).on_output()])
        assert s.wait_for_feedback(20)
        assert len(s.get_records_and_feedback()[0]) == 2
    assert f"from revision 0001 to {HEAD_REVISION}" in caplog.text
    with engine.connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION


def test_unstamped_tables_of_no_release_are_refused_and_left_alone(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    engine = _engine(url)
    with engine.begin() as conn:
        _first_release_tables(conn, prefix)
        conn.execute(sa.text(f"DROP TABLE {prefix}meta"))
    with pytest.raises(ConfigurationError, match="no record of their schema revision"):
        Session(url, table_prefix=prefix)
    with engine.connect() as conn:
        assert current_revision(conn, prefix) is None
        assert conn.execute(sa.text(f"SELECT count(*) FROM {prefix}records")).scalar() == 1


def test_records_older_releases_dated_1970_get_the_time_they_were_stored(
        backend: tuple[str, str]) -> None:
    """Hand-built records without times were stored at the epoch before 0006: a 30-day
    retention run deleted records stored minutes before."""
    url, prefix = backend
    engine = _engine(url)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc).isoformat(" ", "microseconds")[:26]
    stored = datetime.now(timezone.utc).replace(microsecond=0)
    timed = datetime(2026, 1, 2, tzinfo=timezone.utc).isoformat(" ", "microseconds")[:26]
    with engine.begin() as conn:
        upgrade(conn, prefix, "0005")
        conn.execute(sa.text(f"INSERT INTO {prefix}apps VALUES ('b:v', 'b', 'v', NULL, :t)"),
                     {"t": timed})
        for record_id, start in (("untimed", epoch), ("timed", timed)):
            conn.execute(sa.text(
                f"INSERT INTO {prefix}records (record_id, app_id, app_name, app_version, "
                "status, start_time, end_time, latency_s, created_at) VALUES "
                "(:id, 'b:v', 'b', 'v', 'ok', :start, :start, 0.0, :created)"),
                {"id": record_id, "start": start,
                 "created": stored.isoformat(" ", "microseconds")[:26]})
    with Session(url, table_prefix=prefix) as s:
        frame, _ = s.get_records_and_feedback()
        starts = dict(zip(frame["record_id"], frame["start_time"], strict=True))
        assert starts["untimed"].to_pydatetime() == stored
        assert starts["timed"].to_pydatetime() == datetime(2026, 1, 2, tzinfo=timezone.utc)
        assert s.delete_records(before=stored - timedelta(days=30)) == 1  # "timed" alone
        assert s.get_records_and_feedback()[0]["record_id"].tolist() == ["untimed"]


@pytest.fixture
def kept_out(pg: tuple[str, str], monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[tuple[str, str, sa.Connection]]:
    """(url, prefix, holder): tables at revision 0004, whose next migration alters them,
    and another connection that read them in a transaction it keeps open — a report query
    or a psql session, as a user has — so it holds a lock the upgrade must wait for."""
    from tenacity import wait_none

    from scrutiny.core.storage import _migrate

    monkeypatch.setattr(_migrate, "UPGRADE_ATTEMPTS", 3)
    monkeypatch.setattr(_migrate, "UPGRADE_LOCK_TIMEOUT", "300ms")
    monkeypatch.setattr(_migrate, "_UPGRADE_PAUSE", wait_none())
    url, prefix = pg
    engine = _engine(url)
    with engine.begin() as conn:
        upgrade(conn, prefix, "0004")
    holder = engine.connect()
    holder.execute(sa.text("SET application_name = 'monthly-report'"))
    holder.execute(sa.text(f"SELECT count(*) FROM {prefix}apps"))
    try:
        yield url, prefix, holder
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


def test_an_upgrade_kept_out_by_another_connection_says_which_and_changes_nothing(
        kept_out: tuple[str, str, sa.Connection]) -> None:
    """`scrutiny db upgrade` (or a Session opening the database) while another connection
    held a lock on the tables waited 30 s, stalling the apps' writes behind it, then
    failed with the driver's lock-timeout error and the ALTER's SQL — saying neither who
    held the lock, nor that nothing had changed, nor what to do."""
    url, prefix, _holder = kept_out
    with pytest.raises(StorageError) as raised:
        Session(url, table_prefix=prefix)
    said = str(raised.value)
    assert "other connections hold locks on them" in said
    assert "application 'monthly-report'" in said
    assert "pid " in said
    assert "nothing was changed" in said
    assert "scrutiny db upgrade" in said
    assert "ALTER" not in said
    assert "[SQL" not in said
    with _engine(url).connect() as conn:
        assert current_revision(conn, prefix) == "0004"


def test_an_upgrade_goes_ahead_once_the_lock_is_let_go(
        kept_out: tuple[str, str, sa.Connection], caplog: pytest.LogCaptureFixture) -> None:
    url, prefix, holder = kept_out

    class LetGo(logging.Handler):  # (the holder ends its transaction when told it blocks)
        def emit(self, record: logging.LogRecord) -> None:
            if "waits for locks" in record.getMessage():
                holder.rollback()

    handler = LetGo()
    logging.getLogger("scrutiny").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, "scrutiny"), \
                Session(url, table_prefix=prefix) as s:
            s.ingest(make_record(), [])
    finally:
        logging.getLogger("scrutiny").removeHandler(handler)
    waits = [r.getMessage() for r in caplog.records if "waits for locks" in r.getMessage()]
    assert len(waits) == 1
    assert "application 'monthly-report'" in waits[0]
    with _engine(url).connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION


def test_head_revision_is_the_newest_migration() -> None:
    versions = Path(__file__).parent.parent / "scrutiny/core/storage/migrations/versions"
    assert max(p.name[:4] for p in versions.glob("0*.py")) == HEAD_REVISION


def test_a_foreign_alembic_version_table_is_left_alone(backend: tuple[str, str]) -> None:
    url, prefix = backend
    foreign = f"{prefix}x_alembic_version"  # stands for the app's own `alembic_version`
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {foreign} (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text(f"INSERT INTO {foreign} VALUES ('app_rev_42')"))
    Session(url, table_prefix=prefix).close()
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {foreign}")).scalars().all() \
            == ["app_rev_42"]
        assert current_revision(conn, prefix) == HEAD_REVISION


def test_default_prefix_uses_scrutiny_alembic_version_next_to_alembic_version(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite"
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('their_head')"))
    Session(url).close()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() \
            == "their_head"
        assert conn.execute(sa.text(
            "SELECT version_num FROM scrutiny_alembic_version")).scalar() == HEAD_REVISION


def test_cli_db_upgrade(backend: tuple[str, str]) -> None:
    url, prefix = backend
    env = {**os.environ, "SCRUTINY_DATABASE_URL": url}
    cmd = [sys.executable, "-m", "scrutiny.cli", "db", "upgrade", "--table-prefix", prefix]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"upgraded from an empty database to {HEAD_REVISION}" in first.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"already at revision {HEAD_REVISION}" in again.stdout
    assert url.split("@")[0] not in first.stdout + first.stderr or "://" not in url


# ---------------------------------------------------------------------- retention
def test_delete_records_by_age_and_app(backend: tuple[str, str]) -> None:
    url, prefix = backend
    with Session(url, table_prefix=prefix) as s:
        old = make_record(1)
        old.start_time -= 86400 * 30
        s.ingest(old, [Feedback(fbs.length).on_output()])
        s.ingest(make_record(2), [Feedback(fbs.length).on_output()])
        assert s.wait_for_feedback(20)
        with pytest.raises(ConfigurationError):
            s.delete_records()
        cutoff = datetime.now(timezone.utc) - timedelta(days=1)
        assert s.delete_records(before=cutoff) == 1
        df, _ = s.get_records_and_feedback()
        assert list(df["input"]) == ["q2"]
        assert s.store.count_results() == {"done": 1}
        assert s.delete_records(app_ids=["scale"]) == 1
        assert s.get_records_and_feedback()[0].empty


def test_an_empty_app_selection_selects_no_app(backend: tuple[str, str]) -> None:
    """`app_ids=[]` (a selection that matched nothing) read as "every app":
    delete_records(before=..., app_ids=[]) deleted every app's old records."""
    url, prefix = backend
    with Session(url, table_prefix=prefix) as s:
        for i in range(2):
            old = make_record(i)
            old.start_time -= 86400 * 30
            s.ingest(old, [Feedback(fbs.length).on_output()])
        assert s.wait_for_feedback(20)
        cutoff = datetime.now(timezone.utc) - timedelta(days=1)
        assert s.delete_records(before=cutoff, app_ids=[]) == 0
        assert s.delete_records(app_ids=[]) == 0
        assert s.get_records_and_feedback(app_ids=[])[0].empty
        assert s.get_leaderboard(app_ids=[]).empty
        assert s.query_records(app_ids=[]).total == 0
        assert s.query_records(app_versions=[]).total == 0
        assert s.query_records(feedback_name="length", statuses=[]).total == 0
        assert len(s.get_records_and_feedback()[0]) == 2  # (None: every app)
        assert s.query_records(feedback_name="length", statuses=["done"]).total == 2


def test_paginated_reads(backend: tuple[str, str]) -> None:
    url, prefix = backend
    with Session(url, table_prefix=prefix) as s:
        for i in range(25):
            r = make_record(i)
            r.start_time = r.end_time = 1_700_000_000 + i
            s.ingest(r, [])
        pages = [s.get_records_and_feedback(limit=10, offset=o)[0] for o in (0, 10, 20)]
    assert [len(p) for p in pages] == [10, 10, 5]
    seen = [q for p in pages for q in p["input"]]
    assert seen == [f"q{i}" for i in range(24, -1, -1)]


# ---------------------------------------------------------------------- Dask
@pytest.fixture(scope="module")
def dask_client() -> Iterator[object]:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.timeout(180)
def test_on_a_cluster_a_timeout_counts_from_the_start_of_the_call_not_its_queue(
        dask_client: object, tmp_path: Path) -> None:
    """12 calls of 0.4 s at once on a cluster of 4 threads: the last ones wait 0.8 s in
    the cluster's queue. Counted from the hand-over, their 1 s timeout failed them before
    they had run; counted where they run, all are done. A call that does not come back
    still fails on its timeout, on a worker's thread."""
    executor = dask_client.get_executor()  # type: ignore[attr-defined]
    patient = Feedback(fbs.takes_a_while, timeout=1.0).on_output()
    stuck = Feedback(fbs.hangs, timeout=0.3).on_output()
    with Session(f"sqlite:///{tmp_path}/queue.sqlite", executor=executor,
                 max_concurrency=12) as s:
        records = [s.ingest(make_record(i), [patient]) for i in range(12)]
        statuses = [r.wait_for_feedback_results(timeout=60)[patient] for r in records]
        hung = s.ingest(make_record(99), [stuck]).wait_for_feedback_results(timeout=60)[stuck]
    assert [(r.status, r.error) for r in statuses] == [(FeedbackStatus.DONE, None)] * 12
    assert hung.status is FeedbackStatus.FAILED
    assert "timed out after 0.3 s" in (hung.error or ""), hung.error


def test_a_call_the_executor_never_runs_fails_after_its_queue_allowance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures

    from scrutiny.core import _evaluate

    class NoWorkers(concurrent.futures.Executor):
        """A cluster that accepts work and has nobody to run it."""

        def submit(self, fn: object, /, *args: object,
                   **kwargs: object) -> concurrent.futures.Future[object]:
            return concurrent.futures.Future()

    monkeypatch.setattr(_evaluate, "EXECUTOR_QUEUE_ALLOWANCE", 0.2)
    fb = Feedback(fbs.length, timeout=0.1).on_output()
    with Session(f"sqlite:///{tmp_path}/nowhere.sqlite", executor=NoWorkers()) as s:
        result = s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "the executor had not run the call 0.1 s long 0.3 s after" in (result.error or "")


def test_feedback_errors_come_back_from_a_worker_with_what_they_carry() -> None:
    import pickle

    from scrutiny.core._errors import InvalidFeedbackValue, TransientError

    limited = pickle.loads(pickle.dumps(TransientError("429", retry_after=7.5)))
    assert (type(limited), str(limited), limited.retry_after) == (TransientError, "429", 7.5)
    invalid = pickle.loads(pickle.dumps(InvalidFeedbackValue("not a score", value="x")))
    assert (str(invalid), invalid.value) == ("not a score", "x")


@pytest.mark.timeout(180)
def test_dask_cluster_evaluates_and_results_surface_here(dask_client: object,
                                                          tmp_path: Path) -> None:
    import threading

    executor = dask_client.get_executor()  # type: ignore[attr-defined]
    fired = threading.Event()
    with Session(f"sqlite:///{tmp_path}/dask.sqlite", executor=executor) as s:
        pid_fb = Feedback(fbs.worker_pid).on_output()
        async_fb = Feedback(fbs.slow_async).on_output()
        # The same call as async_fb, timing out: Dask named both by hashing their arguments
        # (pure=True), so they shared one task, and cancelling it left async_fb hanging.
        twin_fb = Feedback(fbs.slow_async, name="twin", timeout=0.01).on_output()
        record = s.ingest(make_record(), [pid_fb, async_fb, twin_fb])
        record.wait_for_feedback_results(callback=lambda results: fired.set())
        results = record.wait_for_feedback_results(timeout=120)
        assert fired.wait(30)
        assert results[twin_fb].status is FeedbackStatus.FAILED
        assert "timed out" in (results[twin_fb].error or "")
        assert results[pid_fb].status is FeedbackStatus.DONE
        assert results[async_fb].status is FeedbackStatus.DONE
        assert results[pid_fb].result != float(os.getpid())  # ran in a Dask worker
        assert results[async_fb].result == 0.5
        df, _ = s.get_records_and_feedback()
    assert df.loc[0, "worker_pid status"] == "done"


def test_failed_results_are_evaluated_again_on_request(backend: tuple[str, str]) -> None:
    """A judge's outage failed some results: giving the records again was refused (they
    have a result of that name), and the only ways out threw the good scores away too."""
    url, prefix = backend
    down = threading.Event()
    down.set()

    def judge(output: str) -> float:
        if down.is_set():
            raise ConnectionError("the judge is down")
        return 0.5

    fb = Feedback(judge, name="judge").on_output()
    steady = Feedback(lambda output: 1.0, name="steady").on_output()
    with Session(url, table_prefix=prefix) as session:
        kept = session.ingest(make_record(0), [fb, steady])
        other_app = session.ingest(dataclasses.replace(make_record(1), app_name="other"), [fb])
        assert session.wait_for_feedback(20)
        before, _ = session.get_records_and_feedback()
        ids = {r.result_id for r in kept.feedback_results.values()}
        down.clear()
        assert session.retry_failed([fb], app_ids=["scale"], timeout=20) == 1
        after, _ = session.get_records_and_feedback(reasons=True)
        stored = session.get_record(kept.record_id)
        assert session.retry_failed(timeout=20) == 1  # (the other app's, by its own feedback)
        last, _ = session.get_records_and_feedback()
    assert set(before["judge status"]) == {"failed"}
    by_app = dict(zip(after["app_name"], zip(after["judge status"], after["judge"],
                                              strict=True), strict=True))
    assert by_app["scale"] == ("done", 0.5)
    assert by_app["other"][0] == "failed"  # (not of the apps asked for)
    assert after.loc[after["app_name"] == "scale", "steady"].tolist() == [1.0]  # untouched
    assert stored is not None
    assert {r.result_id for r in stored.feedback_results.values()} == ids  # (not twice)
    assert set(last["judge status"]) == {"done"}
    assert other_app.record_id in set(last["record_id"])


def test_failed_results_are_evaluated_again_in_a_memory_session() -> None:
    tries: list[str] = []

    def flaky(output: str) -> float:
        tries.append(output)
        if len(tries) == 1:
            raise TimeoutError("once")
        return 0.25

    fb = Feedback(flaky, name="flaky").on_output()
    with Session("memory://") as session:
        record = session.ingest(make_record(), [fb])
        assert record.wait_for_feedback_results(timeout=10)["flaky"].status.value == "failed"
        assert session.retry_failed(timeout=10) == 1
        frame, _ = session.get_records_and_feedback()
    assert (frame.loc[0, "flaky status"], frame.loc[0, "flaky"]) == ("done", 0.25)
