"""A team on one PostgreSQL database: several app processes writing, workers evaluating,
readers (the dashboard, the command line) reading at once — and what the database does to
them: texts it cannot hold, locks and timeouts, commits whose answer is lost, readers that
see the tables change between two statements.

Needs a real server (``SCRUTINY_TEST_POSTGRES_URL``; `.ci/run` starts one and sets
``SCRUTINY_REQUIRE_POSTGRES=1`` so these tests fail rather than skip without it). Each test
uses tables of its own (a fresh table prefix) in that database."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.core.storage import SQLStore, build_tables
from tests.support import deferred_feedbacks as fbs
from tests.support.postgres import postgres_url

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pg() -> tuple[str, str]:
    """(url, table_prefix) of fresh tables on the PostgreSQL server."""
    return postgres_url(), f"t{uuid.uuid4().hex[:10]}_"


@pytest.fixture
def admin(pg: tuple[str, str]) -> Iterator[sa.Engine]:
    """An engine of the test's own, beside the sessions under test."""
    engine = sa.create_engine(pg[0], poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def make_record(i: int = 0, **extra: Any) -> Record:
    now = time.time()
    base: dict[str, Any] = {"app_name": "team", "app_version": "v1", "input": f"q{i}",
                            "output": f"answer {i}", "start_time": now, "end_time": now}
    base.update(extra)
    return Record(**base)


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Ask `check` (the API under test) until it says True; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # between two looks, bounded by the deadline


def with_options(url: str, options: str) -> str:
    """`url` with libpq `options` (e.g. "-c lock_timeout=100") for every connection."""
    return sa.engine.make_url(url).update_query_dict({"options": options}).render_as_string(
        hide_password=False)


# ---------------------------------------------------------------------- texts
def test_a_connection_handed_back_after_the_store_closed_is_closed(pg: tuple[str, str]
                                                                   ) -> None:
    """dispose() closes only the pooled connections: one still in use on another thread
    when the session closed went back to a pool no one held and stayed open until the
    garbage collector found it, where psycopg warned (an error under -W error, in
    whichever later test the collection fell)."""
    store = SQLStore(pg[0], table_prefix=pg[1])
    in_use = store.engine.connect()
    in_use.execute(sa.text("SELECT 1"))
    raw = in_use.connection.dbapi_connection
    idle = store.engine.connect()  # (one in the pool as well: dispose closes that one)
    idle_raw = idle.connection.dbapi_connection
    idle.close()
    store.close()
    assert idle_raw is not None
    assert idle_raw.closed
    assert raw is not None
    assert not raw.closed
    in_use.close()
    assert raw.closed


def test_a_store_never_closed_closes_its_connections_when_collected(pg: tuple[str, str]
                                                                     ) -> None:
    import gc
    import weakref

    store = SQLStore(pg[0], table_prefix=pg[1])
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
    assert raw is not None
    assert not raw.closed
    gone = weakref.ref(store)
    del store, conn
    gc.collect()
    assert gone() is None
    assert raw.closed


def test_nul_characters_in_names_explanations_and_errors_are_stored(
        pg: tuple[str, str]) -> None:
    """PostgreSQL's text cannot hold a NUL: the driver refused the whole row, so an app
    whose name held one lost every record, and a result whose explanation or error held
    one stayed pending for ever (its waiters were told it was not stored). They are
    stored with the NUL as U+FFFD; inputs and outputs (JSON, escaped) keep it as it is."""
    url, prefix = pg
    explain = Feedback(lambda output: (0.5, "why\x00after"), name="ex\x00plain").on_output()

    def boom(output: str) -> float:
        raise ValueError("bad\x00after")

    fail = Feedback(boom, name="fa\x00il").on_output()
    with Session(url, table_prefix=prefix) as s:
        records = [s.ingest(make_record(i, app_name="my\x00app", input=f"q\x00{i}",
                                        error="err\x00or"), [explain, fail])
                   for i in range(3)]
        for record in records:
            live = record.wait_for_feedback_results(timeout=20)
            assert [r.status for r in live.values()] == [FeedbackStatus.DONE,
                                                         FeedbackStatus.FAILED]
        assert s.stats()["failed_writes"] == 0
    with Session(url, table_prefix=prefix) as reader:
        df, cols = reader.get_records_and_feedback()
        assert len(df) == 3
        assert cols == ["ex\ufffdplain", "fa\ufffdil"]
        assert sorted(df["input"]) == ["q\x00" + str(i) for i in range(3)]
        assert set(df["app_name"]) == {"my\ufffdapp"}
        back = reader.get_record(records[0].record_id)
        assert back is not None
        assert back.error == "err\ufffdor"
        by_name = {r.feedback_name: r for r in back.feedback_results.values()}
        assert by_name["ex\ufffdplain"].explanation == "why\ufffdafter"
        assert by_name["fa\ufffdil"].error == "ValueError: bad\ufffdafter"
        # filters given with the NUL find what was stored with it (not a driver error)
        assert len(reader.get_records_and_feedback(["my\x00app"])[0]) == 3
        assert reader.query_records(app_ids=["my\x00app"], feedback_name="ex\x00plain",
                                    statuses=["done"]).total == 3
        assert reader.get_record("no\x00such") is None
        board = reader.get_leaderboard()
        assert board.loc[("my\ufffdapp", "v1"), "ex\ufffdplain"] == pytest.approx(0.5)
        assert reader.delete_records(app_ids=["my\x00app"]) == 3


def test_a_search_for_text_with_a_nul_finds_it_rather_than_failing(
        pg: tuple[str, str]) -> None:
    """PostgreSQL's text cannot hold a NUL, and a NUL given to the driver raises: a search
    term holding one (the dashboard's search box, `query_records(search=...)`) must find
    what was stored with it — inputs and outputs are JSON, the NUL escaped — or nothing,
    never a StorageError (a 503 in the dashboard)."""
    pytest.importorskip("starlette")
    import json
    import urllib.parse
    import urllib.request

    url, prefix = pg
    with Session(url, table_prefix=prefix) as app:
        app.ingest(make_record(0, input="before\x00after", output="out\x00put"))
        app.ingest(make_record(1))
        assert app.flush(20)
    with Session(url, table_prefix=prefix, migrate="refuse") as reader:
        assert reader.query_records(search="e\x00a").total == 1
        assert reader.query_records(search="T\x00P").total == 1  # (case-insensitive)
        assert reader.query_records(search="\x00").total == 1
        assert reader.query_records(search="no\x00such").total == 0
        handle = reader.run_dashboard()
        try:
            for term, found in (("before\x00after", 1), ("\x00q", 0)):
                with urllib.request.urlopen(
                        handle.url.rstrip("/") + "/api/records?"
                        + urllib.parse.urlencode({"q": term}), timeout=30) as answer:
                    assert answer.status == 200
                    assert json.loads(answer.read())["total"] == found
        finally:
            handle.stop()


def test_names_versions_and_run_ids_of_any_length_are_stored(pg: tuple[str, str]) -> None:
    """SQLite stores a name of any length; PostgreSQL's VARCHAR(255) refused the whole row
    of a longer one: an app whose version was a long description (a prompt template, a
    configuration) lost every record on PostgreSQL (schema 0005 makes them TEXT)."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    version = "prompt=" + "Answer from the context only. " * 12  # 367 characters
    with Session(url, table_prefix=prefix) as s:
        records = [s.ingest(make_record(0, app_version=version), [fb]),
                   s.ingest(make_record(1, app_name="n" * 300, record_id="r" * 100,
                                        root_run_id="Workflow.run-" + "x" * 200,
                                        framework="f" * 80), [fb])]
        for record in records:
            assert record.wait_for_feedback_results(timeout=20)[fb].status is \
                FeedbackStatus.DONE
        assert s.stats()["failed_writes"] == 0
    with Session(url, table_prefix=prefix) as reader:
        board = reader.get_leaderboard()
        assert sorted(board.index) == sorted([("team", version), ("n" * 300, "v1")])
        back = reader.get_record("r" * 100)
        assert back is not None
        assert (back.app_name, back.root_run_id, back.framework) == (
            "n" * 300, "Workflow.run-" + "x" * 200, "f" * 80)
        assert len(reader.get_records_and_feedback([f"team:{version}"])[0]) == 1


UPGRADING_APP = """
import sys, time
sys.path.insert(0, {repo!r})
from scrutiny import Feedback, Record, Session
from tests.support import deferred_feedbacks as fbs
s = Session({url!r}, table_prefix={prefix!r})
fb = Feedback(fbs.length).on_output()
now = time.time()
record = s.ingest(Record(app_name="team:qa", app_version="v1-" + "x" * 300, input="{i}",
                         output="o", start_time=now, end_time=now), [fb])
status = record.wait_for_feedback_results(timeout=30)[fb].status.value
print("opened", s.store.found_revision, status, flush=True)
s.close()
"""


@pytest.mark.timeout(180)
def test_several_processes_upgrading_an_old_database_at_once(pg: tuple[str, str],
                                                             admin: sa.Engine) -> None:
    """A team deploys a new version: several processes open a database of an older schema
    at the same moment. Exactly one upgrades it (the others wait for it, then find it
    upgraded), the data already there is kept (app ids rewritten by 0004), and every
    process stores its records."""
    from datetime import datetime, timezone

    from scrutiny.core._records import app_id_for
    from scrutiny.core.storage import HEAD_REVISION, current_revision, upgrade

    url, prefix = pg
    now = datetime.now(timezone.utc)
    with admin.begin() as conn:
        upgrade(conn, prefix, "0003")
        conn.execute(sa.text(
            f"INSERT INTO {prefix}apps (app_id, app_name, app_version, created_at) "
            "VALUES ('team:qa:v0', 'team', 'qa:v0', :now)"), {"now": now})
        conn.execute(sa.text(
            f"INSERT INTO {prefix}records (record_id, app_id, app_name, app_version, status,"
            " start_time, end_time, latency_s, created_at) VALUES ('old', 'team:qa:v0',"
            " 'team', 'qa:v0', 'ok', :now, :now, 1.0, :now)"), {"now": now})
    env = {**os.environ, "SCRUTINY_DATABASE_URL": url}
    apps = [subprocess.Popen(
        [sys.executable, "-c", UPGRADING_APP.format(repo=str(REPO), url=url, prefix=prefix,
                                                    i=i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(4)]
    outputs = [a.communicate(timeout=150)[0] for a in apps]
    opened = sorted(line.split()[1:] for out in outputs for line in out.splitlines()
                    if line.startswith("opened"))
    assert opened == [["0003", "done"]] + [[HEAD_REVISION, "done"]] * 3, outputs
    with admin.connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION
        rows = conn.execute(sa.text(
            f"SELECT record_id, app_id FROM {prefix}records ORDER BY record_id")).all()
    new_id = app_id_for("team:qa", "v1-" + "x" * 300)
    assert sorted(app_id for _, app_id in rows) == sorted(
        [app_id_for("team", "qa:v0")] + [new_id] * 4)


# ---------------------------------------------------------------------- reads
def test_a_page_read_while_apps_store_newer_records_has_every_records_results(
        pg: tuple[str, str], admin: sa.Engine) -> None:
    """A page of records was read in one statement and its results in a second one that
    took the page again: on PostgreSQL each statement sees what was committed before it,
    so records another process stored in between shifted the page, and the records at
    its end came back without their results ("n/a" where they were done)."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(url, table_prefix=prefix) as app:
        for i in range(5):
            app.ingest(make_record(i), [fb])
        assert app.wait_for_feedback(20)
        newer = [make_record(100 + i) for i in range(3)]
        reader = Session(url, table_prefix=prefix)
        store = reader.store
        assert isinstance(store, SQLStore)
        statements: list[str] = []

        def between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)
            if statement.lstrip().startswith("SELECT") and "feedback_results" in statement \
                    and newer:  # another app stores newer records now
                for record in newer:
                    app.ingest(record, [fb])
                newer.clear()
                assert app.wait_for_feedback(20)

        sa.event.listen(store.engine, "before_cursor_execute", between)
        try:
            df, cols = reader.get_records_and_feedback(limit=3)
            page = reader.query_records(limit=3)
        finally:
            sa.event.remove(store.engine, "before_cursor_execute", between)
            reader.close()
    assert cols == ["length"]
    assert list(df["input"]) == ["q4", "q3", "q2"]  # the page as it was when read
    assert list(df["length status"]) == ["done"] * 3
    assert [len(r.feedback_results) for r in page.records] == [1, 1, 1]


def test_a_read_the_database_refuses_is_a_storage_error_everywhere(
        pg: tuple[str, str], admin: sa.Engine) -> None:
    """A read the database refused (a lock, the server down) raised SQLAlchemy's own error:
    the dashboard, whose handler answers 503 with the reason for a StorageError, answered
    500 with a traceback in its log, and `scrutiny leaderboard` printed a traceback."""
    pytest.importorskip("starlette")
    import urllib.error
    import urllib.request

    from scrutiny import StorageError

    url, prefix = pg
    with Session(url, table_prefix=prefix) as app:
        app.ingest(make_record(), [Feedback(fbs.length).on_output()])
        assert app.wait_for_feedback(20)
    locked_url = with_options(url, "-c lock_timeout=100")
    with Session(locked_url, table_prefix=prefix, migrate="refuse") as reader:
        handle = reader.run_dashboard()
        try:
            with admin.connect() as locker:
                locker.execute(sa.text(f"LOCK TABLE {prefix}records IN ACCESS EXCLUSIVE MODE"))
                with pytest.raises(StorageError, match="could not read") as raised:
                    reader.get_leaderboard()
                assert "lock timeout" in str(raised.value)
                assert isinstance(raised.value.__cause__, sa.exc.OperationalError)
                with pytest.raises(urllib.error.HTTPError) as answered:
                    urllib.request.urlopen(handle.url.rstrip("/") + "/api/leaderboard",
                                           timeout=30)
                assert answered.value.code == 503
                assert "could not read" in answered.value.read().decode()
                cli = subprocess.run(
                    [sys.executable, "-m", "scrutiny.cli", "leaderboard", "--table-prefix",
                     prefix], env={**os.environ, "SCRUTINY_DATABASE_URL": locked_url},
                    capture_output=True, text=True, timeout=60)
                locker.rollback()
        finally:
            handle.stop()
        assert cli.returncode == 2, cli.stderr
        assert cli.stderr.startswith("scrutiny: error: could not read"), cli.stderr
        assert "Traceback" not in cli.stderr
        assert reader.get_leaderboard().loc[("team", "v1"), "records"] == 1


# ---------------------------------------------------------------------- locks
@pytest.mark.parametrize("timeout_setting", ["lock_timeout", "statement_timeout"])
def test_writes_wait_for_a_locked_table_instead_of_being_lost(
        pg: tuple[str, str], admin: sa.Engine, caplog: pytest.LogCaptureFixture,
        timeout_setting: str) -> None:
    """With a lock or statement timeout (usual on managed servers), a table locked for a few
    seconds — a migration, VACUUM FULL, a long transaction — made every write fail while
    the database answered pings: each batch was given up after five quick retries, and the
    records made meanwhile were lost. They are held and stored once the lock is gone."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(with_options(url, f"-c {timeout_setting}=100"), table_prefix=prefix) as s, \
            caplog.at_level(logging.WARNING, logger="scrutiny"):
        first = s.ingest(make_record(0), [fb])
        assert first.wait_for_feedback_results(timeout=20)[fb].status is FeedbackStatus.DONE
        with admin.connect() as locker:
            locker.execute(sa.text(f"LOCK TABLE {prefix}records IN ACCESS EXCLUSIVE MODE"))
            records = [s.ingest(make_record(i), [fb]) for i in range(1, 6)]
            poll(lambda: "refuses writes for now" in caplog.text
                 or s.stats()["failed_writes"] > 0, 60, "the writer to meet the lock")
            assert s.stats()["failed_writes"] == 0, caplog.text
            locker.rollback()  # the lock goes
        for record in records:
            assert record.wait_for_feedback_results(timeout=30)[fb].status is \
                FeedbackStatus.DONE
        assert s.stats()["failed_writes"] == 0
        assert len(s.get_records_and_feedback()[0]) == 6
    assert "takes writes again" in caplog.text


@pytest.mark.parametrize("timeout_setting", ["lock_timeout", "statement_timeout", ""])
def test_one_write_that_always_times_out_does_not_hold_the_others_for_ever(
        pg: tuple[str, str], admin: sa.Engine, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, timeout_setting: str) -> None:
    """A write refused for a passing reason is held and retried — but one that always is
    (here a record whose key another transaction holds uncommitted, so its insert waits
    past the timeout every time) held every record and result made after it until the
    session closed. Past the bound the others are stored and it alone is given up: logged
    by name, counted, its waiter told. With no timeout set anywhere (""), the insert waited
    for ever and nothing more was stored: Scrutiny's connections set a lock_timeout of
    their own then (shortened here)."""
    from scrutiny.core import _writer
    from scrutiny.core.storage import _sql

    monkeypatch.setattr(_writer, "TRANSIENT_HOLD_MAX", 1.0, raising=False)
    monkeypatch.setattr(_sql, "LOCK_TIMEOUT_MS", 100)
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    poisoned = str(uuid.uuid4())
    own_url = with_options(url, f"-c {timeout_setting}=100") if timeout_setting else url
    with Session(own_url, table_prefix=prefix) as s, \
            caplog.at_level(logging.WARNING, logger="scrutiny"), admin.connect() as holder:
        first = s.ingest(make_record(0), [fb])
        assert first.wait_for_feedback_results(timeout=20)[fb].status is FeedbackStatus.DONE
        columns = ", ".join(c.name for c in build_tables(prefix).records.columns
                            if c.name != "record_id")
        holder.execute(sa.text(  # (uncommitted: an insert of this key waits for it)
            f"INSERT INTO {prefix}records (record_id, {columns}) "
            f"SELECT :id, {columns} FROM {prefix}records"), {"id": poisoned})
        try:
            stuck = s.ingest(make_record(1, record_id=poisoned), [fb])
            others = [s.ingest(make_record(i), [fb]) for i in range(2, 7)]
            for record in others:
                assert record.wait_for_feedback_results(timeout=30)[fb].status is \
                    FeedbackStatus.DONE
            lost = stuck.wait_for_feedback_results(timeout=30)[fb]
        finally:
            holder.rollback()
        assert lost.status is FeedbackStatus.FAILED
        assert "could not be stored" in (lost.error or "")
        assert s.stats()["failed_writes"] == 1
    told = [r.getMessage() for r in caplog.records if "gave up storing" in r.getMessage()]
    assert len(told) == 1, told
    assert f"record {poisoned}" in told[0]
    assert "timeout" in told[0]
    with Session(url, table_prefix=prefix, migrate="refuse") as reader:
        df, _ = reader.get_records_and_feedback()
        assert sorted(df["record_id"]) == sorted(r.record_id for r in [first, *others])
        assert (df["length status"] == "done").all()
        assert reader.get_record(poisoned) is None


@pytest.mark.parametrize("timeout_setting", ["", "lock_timeout"])
def test_a_row_locked_for_good_does_not_keep_the_other_leases_from_being_renewed(
        pg: tuple[str, str], admin: sa.Engine, timeout_setting: str) -> None:
    """The lease renewal was one UPDATE of every row the process held: one row another
    transaction kept locked made each renewal wait for it (for ever without lock_timeout,
    the writer storing nothing meanwhile) or fail past lock_timeout — no lease was renewed,
    and workers took over every result still being evaluated. The locked row is skipped:
    the others' leases move forward every renewal, and the writer goes on storing."""
    url, prefix = pg
    gate = threading.Event()

    def held(output: str) -> float:  # evaluating until the test is done looking
        gate.wait(60)
        return 0.5

    fb = Feedback(held).on_output()
    results = build_tables(prefix).results
    if timeout_setting:
        url = with_options(url, f"-c {timeout_setting}=100")

    def leases() -> dict[str, Any]:
        with admin.connect() as conn:
            return {r.result_id: r for r in conn.execute(
                sa.select(results.c.result_id, results.c.status,
                          results.c.lease_expires_at))}

    with Session(url, table_prefix=prefix, lease_seconds=3) as s, \
            admin.connect() as locker:
        try:
            records = [s.ingest(make_record(i), [fb]) for i in range(3)]
            # (once every row is stored `running`, only renewals write to them)
            poll(lambda: [r.status for r in leases().values()] == ["running"] * 3, 30,
                 "the evaluations to be stored running")
            before = leases()
            locked, *others = sorted(before)
            locker.execute(sa.select(results.c.result_id)
                           .where(results.c.result_id == locked).with_for_update())
            poll(lambda: all(leases()[rid].lease_expires_at > before[rid].lease_expires_at
                             for rid in others), 10,
                 "the leases of the rows not locked to be renewed")
            late = s.ingest(make_record(9))  # the writer is not held by the locked row
            assert s.flush(10)
            assert s.get_record(late.record_id) is not None
        finally:
            locker.rollback()
            gate.set()
        for record in records:
            assert record.wait_for_feedback_results(timeout=30)[fb].status is \
                FeedbackStatus.DONE
        assert s.stats()["failed_writes"] == 0


def test_a_worker_says_once_that_it_cannot_claim_while_the_database_is_busy(
        pg: tuple[str, str], admin: sa.Engine, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose claims failed (the server restarting, a table locked) logged a full
    traceback at every poll for as long as it lasted — hundreds of lines a second with a
    short poll interval. It says so once, backs off, and says when claiming works again."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app, \
            Session(with_options(url, "-c lock_timeout=100"), table_prefix=prefix) as ws, \
            caplog.at_level(logging.WARNING, logger="scrutiny"):
        record = app.ingest(make_record(), [fb])
        assert app.flush(10)
        store = ws.store
        real_claim = store.claim
        failed: list[BaseException] = []

        def claim(**kwargs: Any) -> Any:
            try:
                return real_claim(**kwargs)
            except Exception as exc:
                failed.append(exc)
                raise

        monkeypatch.setattr(store, "claim", claim)
        with admin.connect() as locker:
            locker.execute(sa.text(
                f"LOCK TABLE {prefix}feedback_results IN ACCESS EXCLUSIVE MODE"))
            worker = ws.start_worker(poll_interval=0.02)
            poll(lambda: len(failed) >= 4, 60, "four failed claims")
            locker.rollback()  # the lock goes
        assert record.wait_for_feedback_results(timeout=30)[fb].status is FeedbackStatus.DONE
        assert worker.stop(10)
    told = [r for r in caplog.records if "claiming failed" in r.getMessage()]
    assert len(told) == 1, [r.getMessage()[:80] for r in told]
    assert told[0].exc_info is None  # a line, not a traceback
    assert "claiming works again" in caplog.text


def test_a_commit_whose_answer_was_lost_is_stored_once_and_not_reported_lost(
        pg: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection dropped after the server committed a batch but before its answer
    came (a network blip, a failover): the writer retried the batch, the results' rows
    were already there, and the duplicate key failed it for good — the record and its
    results were reported not stored (waiters told 'failed', counted as failed writes)
    though the database held them."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(url, table_prefix=prefix) as s:
        store = s.store
        assert isinstance(store, SQLStore)
        real_write = store.write
        lost: list[int] = []

        def write_then_lose_the_answer(ops: Any) -> None:
            real_write(ops)
            if not lost and any(type(op).__name__ == "InsertRecord" for op in ops):
                lost.append(len(ops))
                raise OperationalError("COMMIT", {}, Exception(
                    "server closed the connection unexpectedly"))

        monkeypatch.setattr(store, "write", write_then_lose_the_answer)
        record = s.ingest(make_record(), [fb])
        result = record.wait_for_feedback_results(timeout=30)[fb]
        assert lost
        assert result.status is FeedbackStatus.DONE, result.error
        assert s.stats()["failed_writes"] == 0
        df, _ = s.get_records_and_feedback()
    assert list(df["length status"]) == ["done"]


@pytest.mark.parametrize("how", ["callback", "wait"])
def test_waiting_on_a_stored_record_outlasts_a_read_that_fails_for_a_while(
        pg: tuple[str, str], admin: sa.Engine, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    """A reader (the dashboard, a script) waiting on a record read back from the database
    reads its results again until they end. One read that failed — the results table
    locked past lock_timeout, a server restarting — ended that wait: a blocking wait
    returned `pending` long before its timeout, and a callback was never called."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app, \
            Session(with_options(url, "-c lock_timeout=100"), table_prefix=prefix) as reader, \
            caplog.at_level(logging.WARNING, logger="scrutiny"):
        record = app.ingest(make_record(), [fb])
        assert app.flush(10)
        stored = reader.get_record(record.record_id)
        assert stored is not None
        fired = threading.Event()
        waited: list[dict[Any, Any]] = []
        with admin.connect() as locker:
            locker.execute(sa.text(
                f"LOCK TABLE {prefix}feedback_results IN ACCESS EXCLUSIVE MODE"))
            if how == "callback":
                stored.wait_for_feedback_results(callback=lambda results: fired.set())
            else:
                waiter = threading.Thread(target=lambda: waited.append(
                    stored.wait_for_feedback_results(timeout=60)), daemon=True)
                waiter.start()
            poll(lambda: f"record {record.record_id}" in caplog.text, 30,
                 "a read of the record's results to fail")
            locker.rollback()  # the lock goes
        assert app.resume_pending(timeout=30) == 1
        if how == "callback":
            assert fired.wait(30), caplog.text
            # (and its reader done with its connection before the session closes)
            assert [r.status for r in stored.wait_for_feedback_results(timeout=10)
                    .values()] == [FeedbackStatus.DONE]
        else:
            waiter.join(60)
            assert not waiter.is_alive()
            assert [r.status for r in waited[0].values()] == [FeedbackStatus.DONE], \
                caplog.text


def test_a_wait_on_a_record_deleted_meanwhile_ends(pg: tuple[str, str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Retention deleted a record whose results a reader waited on: they never end, and a
    wait without a timeout blocked for ever (a callback's thread read it every second for
    the life of the session). The wait ends, saying why."""
    url, prefix = pg
    fb = Feedback(fbs.length).on_output()
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app, \
            Session(url, table_prefix=prefix) as reader, \
            caplog.at_level(logging.WARNING, logger="scrutiny"):
        record = app.ingest(make_record(), [fb])
        assert app.flush(10)
        stored = reader.get_record(record.record_id)
        assert stored is not None
        assert reader.delete_records(app_ids=["team"]) == 1
        waited: list[dict[Any, Any]] = []
        waiter = threading.Thread(target=lambda: waited.append(
            stored.wait_for_feedback_results()), daemon=True)
        waiter.start()
        waiter.join(30)
        assert not waiter.is_alive(), "the wait did not end"
    assert [r.status for r in waited[0].values()] == [FeedbackStatus.PENDING]
    assert f"record {record.record_id} was deleted" in caplog.text


# ---------------------------------------------------------------------- a team at work
TEAM_APP = """
import sys, time
sys.path.insert(0, {repo!r})
from scrutiny import Feedback, Record, Session
from tests.support import deferred_feedbacks as fbs
s = Session({url!r}, table_prefix={prefix!r}, feedback_mode={mode!r})
fbs_ = [Feedback(fbs.length).on_output(), Feedback(fbs.slow_async).on_output()]
for i in range({n}):
    now = time.time()
    s.ingest(Record(app_name="team", app_version="v1", input="{tag}-%d" % i, output="o" * i,
                    start_time=now, end_time=now), fbs_)
clean = s.close(60)
print("closed", clean, s.stats()["failed_writes"], s.stats()["dropped_writes"], flush=True)
"""


@pytest.mark.timeout(240)
def test_apps_a_worker_and_readers_share_one_database(pg: tuple[str, str],
                                                      admin: sa.Engine) -> None:
    """Two app processes of the same app and version (one evaluating itself, one deferred
    to a worker process), while this process reads pages, the leaderboard and queries: every
    record stored once, every result evaluated once, and no page read meanwhile shows a
    record without its results."""
    url, prefix = pg
    n = 150
    SQLStore(url, table_prefix=prefix).close()  # (the tables: the processes race otherwise)
    env = {**os.environ, "SCRUTINY_DATABASE_URL": url}
    apps = [subprocess.Popen(
        [sys.executable, "-c", TEAM_APP.format(repo=str(REPO), url=url, prefix=prefix,
                                               mode=mode, n=n, tag=tag)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for tag, mode in (("a", "with_app_thread"), ("b", "deferred"))]
    worker = subprocess.Popen(
        [sys.executable, "-m", "scrutiny.cli", "worker", "--table-prefix", prefix,
         "--import-path", str(REPO), "--poll-interval", "0.05", "--log-every", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pages = 0
    try:
        with Session(url, table_prefix=prefix, migrate="refuse") as reader:
            def all_done() -> bool:
                nonlocal pages
                df, cols = reader.get_records_and_feedback(limit=40)
                pages += 1
                assert cols in ([], ["length", "slow_async"])
                for col in cols:  # a record on the page without its result: "n/a"
                    assert "n/a" not in set(df[f"{col} status"]), df[f"{col} status"]
                reader.get_leaderboard()
                reader.query_records(app_ids=["team"], feedback_name="length",
                                     statuses=["done"], limit=10)
                return reader.store.count_results() == {"done": 4 * n} and all(
                    a.poll() is not None for a in apps)

            poll(all_done, 180, "every result done")
            df, _ = reader.get_records_and_feedback()
            board = reader.get_leaderboard()
        outputs = [a.communicate(timeout=60)[0] for a in apps]
    finally:
        for a in apps:
            if a.poll() is None:
                a.kill()
        worker.terminate()
        worker_out = worker.communicate(timeout=60)[0]
    assert [o.strip().splitlines()[-1] for o in outputs] == ["closed True 0 0"] * 2, outputs
    assert worker.returncode == 0, worker_out
    assert pages > 1
    assert len(df) == 2 * n
    assert df["input"].nunique() == 2 * n  # none twice, none lost
    assert (df["length status"] == "done").all()
    assert (df["slow_async status"] == "done").all()
    assert list(board.index) == [("team", "v1")]
    assert board.loc[("team", "v1"), "records"] == 2 * n
    with admin.connect() as conn:
        apps_rows = conn.execute(sa.text(f"SELECT count(*) FROM {prefix}apps")).scalar()
        attempts = conn.execute(sa.text(
            f"SELECT max(attempts) FROM {prefix}feedback_results")).scalar()
    assert apps_rows == 1
    assert attempts == 1
