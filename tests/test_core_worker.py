"""Workers in the app's own process and in `scrutiny worker`: claiming as room allows,
timeouts, stored values cut at storage, old definitions, changed specs, closing with a
worker running, and what the CLI refuses — on real SQLite files (and PostgreSQL where a
fixture says so, ``SCRUTINY_TEST_POSTGRES_URL``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from scrutiny import Feedback, FeedbackMode, FeedbackStatus, Record, Session
from scrutiny.core import _feedback
from scrutiny.core._worker import Worker
from scrutiny.core.storage import InsertRecord, MemoryStore, SQLStore, Store, UpdateResult
from tests.support import deferred_feedbacks as fbs
from tests.support.postgres import postgres_url

REPO = Path(__file__).resolve().parents[1]

# Feedbacks a worker in this process can import (this module is `tests.test_core_worker`).
GATE = threading.Event()
STARTED = threading.Event()


def gated(output: str) -> float:
    """Runs until the test opens GATE (STARTED says it began)."""
    STARTED.set()
    GATE.wait(20)
    return 0.5


ENTERED: dict[str, datetime] = {}  # output -> when a call of gated_timed began
_ENTERED_LOCK = threading.Lock()


def gated_timed(output: str) -> float:
    """`gated`, saying in ENTERED when its call began."""
    with _ENTERED_LOCK:
        ENTERED[output] = datetime.now(timezone.utc)
    GATE.wait(20)
    return 0.5


@pytest.fixture(autouse=True)
def _gate() -> Iterator[None]:
    GATE.clear()
    STARTED.clear()
    ENTERED.clear()
    yield
    GATE.set()  # whatever still runs ends now


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table_prefix): a fresh SQLite file, or fresh tables on the PostgreSQL server."""
    prefix = f"w{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/worker.sqlite", prefix
    return postgres_url(), prefix


@pytest.fixture
def sqlite(tmp_path: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp_path}/worker.sqlite", "scrutiny_"


def make_record(i: int = 0, output: object = None, **extra: Any) -> Record:
    now = time.time()
    return Record(app_name="work", app_version="v1", input=f"q{i}",
                  output=f"out-{i}" if output is None else output, start_time=now,
                  end_time=now, **extra)


def stored_results(url: str, prefix: str) -> list[dict[str, Any]]:
    """The results table as stored (read through a connection of its own)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(
                f"SELECT status, attempts, worker_id, lease_token, score, error "
                f"FROM {prefix}feedback_results"))]
    finally:
        engine.dispose()


def in_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """fn()'s value, or an AssertionError when it has not returned within `timeout`."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s"
    return out[0]


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Ask `check` (the API under test) until it says True; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # between two looks at the database, bounded by the deadline


def pending_rows(url: str, prefix: str, n: int, feedback: Feedback) -> None:
    """`n` records whose results wait in the database for a worker."""
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as app:
        for i in range(n):
            app.ingest(make_record(i), [feedback])
        assert app.flush(10)


# ---------------------------------------------------------------------- room to claim
@pytest.mark.parametrize("how", ["resume_pending", "start_worker"])
def test_a_deferred_apps_own_worker_claims_more_than_twice_max_concurrency(
        sqlite: tuple[str, str], how: str) -> None:
    """The results the app waits on counted as work in flight: with twice max_concurrency
    of them waiting, its own worker found no room, claimed nothing (start_worker) or
    looped for ever (resume_pending)."""
    url, prefix = sqlite
    with Session(url, feedback_mode="deferred", max_concurrency=2) as s:
        fb = Feedback(fbs.length).on_output()
        records = [s.ingest(make_record(i), [fb]) for i in range(9)]
        assert s.flush(10)
        if how == "resume_pending":
            assert in_thread(lambda: s.resume_pending(timeout=5), 8) == 9
        else:
            worker = s.start_worker(poll_interval=0.05)
            assert s.wait_for_feedback(5)
            assert worker.claimed == 9
        assert all(r.wait_for_feedback_results(timeout=5)[fb].status is FeedbackStatus.DONE
                   for r in records)
    assert {r["status"] for r in stored_results(url, prefix)} == {"done"}


def test_resume_pending_keeps_to_its_timeout_and_counts_what_it_claimed(
        sqlite: tuple[str, str]) -> None:
    """It looped waiting for room past its timeout, and counted each wait as a claim."""
    url, prefix = sqlite
    pending_rows(url, prefix, 6, Feedback(gated).on_output())
    with Session(url, max_concurrency=1) as s:
        start = time.monotonic()
        claimed = in_thread(lambda: s.resume_pending(timeout=0.5), 4)
        assert time.monotonic() - start < 2.0
        assert claimed == 2  # room for twice max_concurrency; those never finish
        # one runs; the other waits for the one slot: claimed, but not started
        poll(lambda: s.store.count_results() == {"running": 1, "pending": 5}, 5,
             "the evaluation that has the slot to be running")
        GATE.set()
        assert s.wait_for_feedback(5)


# ---------------------------------------------------------------------- claimed, not started
def results_by_output(store: Any) -> dict[str, dict[str, Any]]:
    """Each result row as the store reads it back, by its record's output."""
    records, results = store.records_and_results()
    output = {r["record_id"]: json.loads(r["output_json"]) for r in records}
    return {output[r["record_id"]]: r for r in results}


def test_a_claim_waiting_for_a_slot_stays_pending_until_its_evaluation_starts(
        backend: tuple[str, str]) -> None:
    """A worker claims twice what it evaluates at once, and the claim stored every row
    `running` from the claim time: with max_concurrency=2 a user saw four evaluations
    running, two of them not started, with start times (and latencies) that were not
    theirs. Claimed rows now stay pending (held by the worker) until they get a slot."""
    url, prefix = backend
    fb = Feedback(gated_timed).on_output()
    pending_rows(url, prefix, 6, fb)
    status = f"{fb.name} status"
    with Session(url, table_prefix=prefix) as reader, \
            Session(url, table_prefix=prefix, max_concurrency=2) as s:
        before = datetime.now(timezone.utc)
        worker = s.start_worker(poll_interval=0.05)
        seen: list[dict[str, int]] = []

        def statuses() -> dict[str, int]:
            df, _ = reader.get_records_and_feedback()
            counts = {k: int(v) for k, v in df[status].value_counts().items()}
            seen.append(counts)
            assert counts.get("running", 0) <= 2, seen  # never more than its slots
            return counts

        poll(lambda: statuses() == {"running": 2, "pending": 4} and len(ENTERED) == 2, 10,
             "the two evaluations that have a slot to be running")
        rows = results_by_output(reader.store)
        running = {out: r for out, r in rows.items() if r["status"] == "running"}
        assert sorted(running) == sorted(ENTERED)  # the ones whose calls began
        for out, r in running.items():  # their own start, not the claim's
            assert before <= r["started_at"] <= ENTERED[out]
            assert (r["worker_id"], r["attempts"]) == (s.owner_id, 1)
        claimed = [r for r in rows.values() if r["status"] == "pending" and r["lease_token"]]
        assert [(r["worker_id"], r["attempts"], r["started_at"]) for r in claimed] == [
            (s.owner_id, 1, None)] * 2  # held by the worker, waiting for a slot
        free = [r for r in rows.values() if r["status"] == "pending" and not r["lease_token"]]
        assert len(free) == 2

        # Held rows are not claimable by anyone else; the free ones are, and go back.
        other = SQLStore(url, table_prefix=prefix)
        try:
            taken = other.claim(worker_id="other", token="tok", limit=10, lease_seconds=60,
                                now=datetime.now(timezone.utc))
            assert sorted(r["result_id"] for r in taken) == sorted(
                r["result_id"] for r in free)
            assert {r["status"] for r in taken} == {"pending"}
            assert other.release([r["result_id"] for r in taken], token="tok") == 2
        finally:
            other.close()
        assert statuses() == {"running": 2, "pending": 4}

        released = datetime.now(timezone.utc)
        GATE.set()
        poll(lambda: statuses() == {"done": 6}, 20, "all six to be done")
        assert worker.stop(5)
        rows = results_by_output(reader.store)
    assert sorted(ENTERED) == sorted(rows)  # each evaluated once
    for out, r in rows.items():
        assert r["attempts"] == 1
        assert r["started_at"] <= ENTERED[out] <= r["ended_at"]
        if out not in running:  # it waited for a slot: it started once the gate opened
            assert r["started_at"] >= released
            assert r["ended_at"] - r["started_at"] < timedelta(seconds=5)


def test_closing_gives_back_the_claims_that_waited_for_a_slot(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    pending_rows(url, prefix, 3, Feedback(gated_timed).on_output())
    s = Session(url, table_prefix=prefix, max_concurrency=1)
    s.start_worker(poll_interval=0.05)
    poll(lambda: s.store.count_results() == {"running": 1, "pending": 2}, 10,
         "one running, one claimed waiting for the slot, one free")
    assert sorted((r["status"], r["worker_id"] or "") for r in stored_results(url, prefix)
                  ) == [("pending", ""), ("pending", s.owner_id), ("running", s.owner_id)]
    assert s.close(timeout=0.5) is False  # the running one did not finish
    assert [(r["status"], r["attempts"], r["worker_id"], r["lease_token"])
            for r in stored_results(url, prefix)] == [("pending", 0, None, None)] * 3
    assert len(ENTERED) == 1  # the one that waited never started


def check_claims(store: Store) -> None:
    """What a claim does to the two pending rows in `store` (see the tests below)."""
    now = datetime.now(timezone.utc)

    def held(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((r["status"], r["worker_id"], r["lease_token"], r["attempts"],
                       r["started_at"]) for r in rows)

    first = store.claim(worker_id="a", token="ta", limit=1, lease_seconds=60, now=now)
    assert held(first) == [("pending", "a", "ta", 1, None)]
    x = first[0]["result_id"]
    second = store.claim(worker_id="b", token="tb", limit=5, lease_seconds=60, now=now)
    assert held(second) == [("pending", "b", "tb", 1, None)]  # not a's
    y = second[0]["result_id"]
    assert store.release([y], token="ta") == 0  # not a's to give back
    assert store.release([y], token="tb") == 1  # unstarted, given back
    assert held(store.results_by_ids([y])) == [("pending", None, None, 0, None)]
    store.write([UpdateResult(x, {"status": "running", "started_at": now},
                              from_statuses=("pending",), lease_token="ta")])  # a started
    assert store.results_by_ids([x])[0]["status"] == "running"
    assert [r["result_id"] for r in store.claim(
        worker_id="b", token="tb", limit=5, lease_seconds=60, now=now)] == [y]
    # a and b die; their leases run out: c takes both, started by nobody alive
    later = now + timedelta(seconds=120)
    third = store.claim(worker_id="c", token="tc", limit=5, lease_seconds=60, now=later)
    assert held(third) == [("pending", "c", "tc", 2, None)] * 2
    store.write([UpdateResult(x, {"status": "running", "started_at": now},
                              from_statuses=("pending",), lease_token="ta")])  # too late
    assert store.results_by_ids([x])[0]["status"] == "pending"
    assert store.release([x, y], token="tc") == 2
    assert held(store.results_by_ids([x, y])) == [("pending", None, None, 1, None)] * 2


def test_a_claim_holds_a_pending_row_until_released_or_its_lease_runs_out(
        backend: tuple[str, str]) -> None:
    """The store's side: a claimed row is pending with a live lease (its holder stores
    `running` when it starts); nobody else can claim it; a release or an expired lease
    makes it claimable again, pending and unstarted, its claims counted."""
    url, prefix = backend
    pending_rows(url, prefix, 2, Feedback(fbs.length).on_output())
    store = SQLStore(url, table_prefix=prefix)
    try:
        check_claims(store)
    finally:
        store.close()


def test_the_in_memory_store_claims_as_the_database_does() -> None:
    store = MemoryStore()
    with Session(store=store, feedback_mode="deferred") as app:
        for i in range(2):
            app.ingest(make_record(i), [Feedback(fbs.length).on_output()])
        assert app.flush(10)
    check_claims(store)


# ---------------------------------------------------------------------- what is evaluated
@pytest.mark.parametrize("where", ["own session", "another worker"])
def test_a_value_cut_at_storage_is_not_scored(sqlite: tuple[str, str], where: str) -> None:
    """A worker reads the record as stored: an output over max_payload_bytes is a
    truncation marker there, and the feedback scored the marker."""
    url, prefix = sqlite
    on_output = Feedback(fbs.length).on_output()
    on_input = Feedback(fbs.length, name="in_len").on_input()  # the input is whole
    with Session(url, feedback_mode="deferred", max_payload_bytes=1024) as app:
        cut = app.ingest(make_record(0, output="x" * 5000), [on_output])
        whole = app.ingest(make_record(1, output="y" * 5000), [on_input])
        contexts = app.ingest(make_record(2, contexts=["c" * 3000, "short"]),
                              [Feedback(fbs.length, name="ctx").on_contexts()])
        assert app.flush(10)
        if where == "own session":
            assert app.resume_pending(timeout=5) == 3
        else:
            with Session(url) as worker:
                assert worker.resume_pending(timeout=5) == 3
        result = cut.wait_for_feedback_results(timeout=5)[on_output]
        other = whole.wait_for_feedback_results(timeout=5)[on_input]
        ctx = next(iter(contexts.wait_for_feedback_results(timeout=5).values()))
    assert result.status is FeedbackStatus.SKIPPED
    assert result.result is None
    assert "truncated when the record was stored" in (result.error or "")
    assert "5002 bytes" in (result.error or "")  # how much there was
    assert other.status is FeedbackStatus.DONE  # what it selects was stored whole
    assert ctx.status is FeedbackStatus.SKIPPED
    assert "cut to its first" in (ctx.error or "")
    rows = stored_results(url, prefix)
    assert sorted(r["status"] for r in rows) == ["done", "skipped", "skipped"]


def _drop_specs(url: str, prefix: str) -> None:
    """As migration 0002 left a definition written before specs were stored."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {prefix}feedback_definitions SET spec_json = NULL"))
    engine.dispose()


def test_a_definition_without_a_stored_spec_leaves_its_results_pending(
        sqlite: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """After `scrutiny db upgrade` of an old database its definitions have no spec: their
    results failed for good, 'not importable by path' (they are)."""
    url, prefix = sqlite
    fb = Feedback(fbs.length).on_output()
    pending_rows(url, prefix, 1, fb)
    _drop_specs(url, prefix)
    with Session(url) as s, caplog.at_level(logging.ERROR, logger="scrutiny"), \
            pytest.MonkeyPatch.context() as patch:
        # (as in a worker's own process, which defines no feedback)
        patch.setattr(_feedback, "_DEFINED_HERE", weakref.WeakValueDictionary())
        assert Worker(s, poll_interval=0.0, batch_size=10, max_claims=5).drain() == 0
        assert s.wait_for_feedback(5)
    assert [(r["status"], r["attempts"], r["lease_token"])
            for r in stored_results(url, prefix)] == [("pending", 0, None)]
    assert "has no stored spec yet" in caplog.text
    assert "not importable" not in caplog.text
    pending_rows(url, prefix, 1, fb)  # the app records with it again: the spec is stored
    with Session(url) as s:
        assert s.resume_pending(timeout=5) == 2
    assert [r["status"] for r in stored_results(url, prefix)] == ["done", "done"]


def _feedback_module(path: Path, name: str, body: str, monkeypatch: pytest.MonkeyPatch
                     ) -> Any:
    """A module `name` written to `path` (on sys.path) with `body`, imported afresh."""
    monkeypatch.syspath_prepend(str(path))
    (path / f"{name}.py").write_text(body)
    monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    importlib.invalidate_caches()
    return importlib.import_module(name)


def test_a_feedback_module_that_raises_at_import_here_leaves_its_results_pending(
        sqlite: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A module that raises when imported (a variable it reads at import is not set for
    this worker) failed every pending result of its feedback for good, in one pass of one
    misdeployed worker, and said nothing in its log. A worker where it imports can
    evaluate them: they stay pending, and the worker says why and what to fix."""
    url, prefix = sqlite
    name = f"needs_key_{uuid.uuid4().hex[:8]}"
    module = _feedback_module(tmp_path, name, (
        "import os\n"
        "if os.environ.get('SCRUTINY_TEST_NO_KEY'):\n"
        "    raise RuntimeError('JUDGE_API_KEY is not set')\n"
        "def judged(output: str) -> float:\n"
        "    return 0.25\n"), monkeypatch)
    pending_rows(url, prefix, 3, Feedback(module.judged).on_output())
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("SCRUTINY_TEST_NO_KEY", "1")
    with Session(url) as s, caplog.at_level(logging.ERROR, logger="scrutiny"):
        assert Worker(s, poll_interval=0.0, batch_size=10, max_claims=5).drain() == 0
        assert s.wait_for_feedback(5)
    assert [(r["status"], r["attempts"], r["lease_token"])
            for r in stored_results(url, prefix)] == [("pending", 0, None)] * 3
    assert caplog.text.count("JUDGE_API_KEY is not set") == 1
    assert "stay pending for a worker where it imports" in caplog.text
    monkeypatch.delenv("SCRUTINY_TEST_NO_KEY")
    with Session(url) as s:  # deployed with what it needs
        assert s.resume_pending(timeout=10) == 3
    assert [(r["status"], r["score"]) for r in stored_results(url, prefix)] == [
        ("done", 0.25)] * 3


def test_a_feedback_that_cannot_be_loaded_anywhere_says_so_in_the_log(
        sqlite: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its function's parameter renamed since the app stored it: its results end failed
    (with the reason), and the worker's log said nothing of it — only its count of failed
    results grew."""
    url, prefix = sqlite
    name = f"renamed_{uuid.uuid4().hex[:8]}"
    module = _feedback_module(tmp_path, name, "def judged(output: str) -> float:\n"
                              "    return 0.25\n", monkeypatch)
    pending_rows(url, prefix, 2, Feedback(module.judged).on_output())
    _feedback_module(tmp_path, name, "def judged(answer: str) -> float:\n"
                     "    return 0.25\n", monkeypatch)
    with Session(url) as s, caplog.at_level(logging.ERROR, logger="scrutiny"):
        assert Worker(s, poll_interval=0.0, batch_size=10, max_claims=5).drain() == 2
        assert s.wait_for_feedback(5)
    rows = stored_results(url, prefix)
    assert [r["status"] for r in rows] == ["failed"] * 2
    assert all("has no parameter 'output'" in (r["error"] or "") for r in rows)
    assert caplog.text.count("has no parameter 'output'") == 1  # once, not per result
    assert "stored failed with that reason" in caplog.text


def test_a_claim_that_ends_a_result_without_evaluating_it_is_not_an_attempt(
        sqlite: tuple[str, str]) -> None:
    """A result abandoned after 5 claims (every worker died in it) was stored with
    attempts=6: the claim that gave it up counted as an attempt too."""
    url, prefix = sqlite
    pending_rows(url, prefix, 1, Feedback(fbs.length).on_output())
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # (five claims of workers that died)
        conn.execute(sa.text(f"UPDATE {prefix}feedback_results SET attempts = 5"))
    engine.dispose()
    with Session(url, table_prefix=prefix) as s:
        assert Worker(s, poll_interval=0.0, batch_size=10, max_claims=5).drain() == 1
        assert s.wait_for_feedback(5)
    [row] = stored_results(url, prefix)
    assert (row["status"], row["attempts"]) == ("failed", 5)
    assert "abandoned after 5 claims" in row["error"]


def test_a_running_worker_uses_a_feedbacks_newer_stored_spec(sqlite: tuple[str, str]) -> None:
    """Options are not part of a feedback's id: a worker kept the spec it loaded first."""
    url, prefix = sqlite
    pending_rows(url, prefix, 1, Feedback(fbs.slow_sync, timeout=0.01).on_output())
    with Session(url) as s:
        worker = Worker(s, poll_interval=0.0, batch_size=10, max_claims=5)
        assert worker.drain() == 1
        assert s.wait_for_feedback(5)
        assert "timed out" in (stored_results(url, prefix)[0]["error"] or "")
        longer = Feedback(fbs.slow_sync, timeout=30).on_output()  # the app changed it
        pending_rows(url, prefix, 1, longer)  # (its definition row is updated)
        assert json.loads(next(d["spec_json"] for d in s.store.definitions()))[
            "timeout"] == 30
        assert worker.drain() == 1
        assert s.wait_for_feedback(5)
    assert sorted(r["status"] for r in stored_results(url, prefix)) == ["done", "failed"]


# ---------------------------------------------------------------------- closing
def test_close_releases_what_its_own_worker_evaluates_for_a_deferred_app(
        backend: tuple[str, str]) -> None:
    """Stopping the watcher let go of the worker's jobs too (same result id): close()
    neither waited for them nor released them, and said True."""
    url, prefix = backend
    s = Session(url, table_prefix=prefix, feedback_mode="deferred")
    record = s.ingest(make_record(), [Feedback(gated).on_output()])
    assert s.flush(10)
    s.start_worker(poll_interval=0.05)
    assert STARTED.wait(5)
    assert s.close(timeout=0.5) is False
    assert [(r["status"], r["attempts"], r["worker_id"], r["lease_token"])
            for r in stored_results(url, prefix)] == [("pending", 0, None, None)]
    result = next(iter(record.wait_for_feedback_results(timeout=1).values()))
    assert result.status is FeedbackStatus.PENDING


def test_a_graceful_release_gives_the_claims_attempt_back(backend: tuple[str, str]) -> None:
    """Released by close(), a claim still counted as a worker that died: six graceful
    worker restarts ended a long feedback `failed: abandoned after 5 claims`."""
    url, prefix = backend
    pending_rows(url, prefix, 1, Feedback(gated).on_output())
    store = SQLStore(url, table_prefix=prefix)  # a worker that died holding it once
    long_ago = datetime.now(timezone.utc) - timedelta(seconds=600)
    assert len(store.claim(worker_id="dead", token="t", limit=1, lease_seconds=1,
                           now=long_ago)) == 1
    store.close()
    s = Session(url, table_prefix=prefix)
    s.start_worker(poll_interval=0.05)
    assert STARTED.wait(5)
    assert s.close(timeout=0.5) is False
    assert [(r["status"], r["attempts"]) for r in stored_results(url, prefix)] == [
        ("pending", 1)]  # the dead worker's claim counts, the graceful one does not


class _HeldClaims:
    """Wraps a store: a claim that took rows waits for `proceed` before returning."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.claimed = threading.Event()
        self.proceed = threading.Event()

    def claim(self, **kwargs: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.inner.claim(**kwargs)
        if rows:
            self.claimed.set()
            self.proceed.wait(10)
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_close_while_a_worker_holds_fresh_claims_leaves_none_running(
        sqlite: tuple[str, str]) -> None:
    """close() did not wait for its worker thread: rows it had just claimed went to the
    closed evaluation loop and stayed `running` under a lease, and close() said True."""
    url, prefix = sqlite
    pending_rows(url, prefix, 3, Feedback(fbs.length).on_output())
    held = _HeldClaims(SQLStore(url))
    s = Session(store=held)  # type: ignore[arg-type]
    worker = s.start_worker(poll_interval=0.05)
    assert held.claimed.wait(5)
    start = time.monotonic()
    s.close(timeout=0.5)  # the worker is still between its claim and the loop
    assert time.monotonic() - start < 3
    held.proceed.set()
    assert worker._thread is not None
    worker._thread.join(5)
    assert not worker.running
    assert [(r["status"], r["attempts"], r["lease_token"])
            for r in stored_results(url, prefix)] == [("pending", 0, None)] * 3


def test_closing_waits_for_a_worker_between_claim_and_hand_over(
        sqlite: tuple[str, str]) -> None:
    url, prefix = sqlite
    pending_rows(url, prefix, 3, Feedback(fbs.length).on_output())
    held = _HeldClaims(SQLStore(url))
    s = Session(store=held)  # type: ignore[arg-type]
    s.start_worker(poll_interval=0.05)
    assert held.claimed.wait(5)
    threading.Timer(0.2, held.proceed.set).start()
    assert s.close(timeout=5) is True
    assert {r["status"] for r in stored_results(url, prefix)} == {"pending"}


def test_a_closed_session_starts_no_worker(sqlite: tuple[str, str]) -> None:
    """start_worker() on a closed session returned a worker that logged 'session is
    closed' tracebacks for ever."""
    url, _ = sqlite
    s = Session(url)
    s.close()
    with pytest.raises(RuntimeError, match="session is closed"):
        s.start_worker(poll_interval=0.05)
    with pytest.raises(RuntimeError, match="session is closed"):
        s.resume_pending(timeout=1)


# ---------------------------------------------------------------------- stored end states
class _RefusingUpdates:
    """A store that refuses every result update (it answers: a refusal, not an outage)."""

    def __init__(self, inner: SQLStore) -> None:
        self.inner = inner

    def write(self, ops: list[Any]) -> None:
        if any(isinstance(op, UpdateResult) for op in ops):
            raise ValueError("refused")
        self.inner.write(ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_wait_for_feedback_is_false_when_end_states_were_not_stored(
        sqlite: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """It returned True while the results were still pending in the database."""
    url, prefix = sqlite
    s = Session(store=_RefusingUpdates(SQLStore(url)))  # type: ignore[arg-type]
    fb = Feedback(fbs.length).on_output()
    record = s.ingest(make_record(), [fb])
    start = time.monotonic()
    with caplog.at_level(logging.CRITICAL, logger="scrutiny"):
        assert s.wait_for_feedback(5) is False
        assert time.monotonic() - start < 3  # not waiting for what will not come
        result = record.wait_for_feedback_results(timeout=1)[fb]
        assert "storing the result failed" in (result.error or "")
        assert [r["status"] for r in stored_results(url, prefix)] == ["pending"]
        s.close(timeout=1)


class _RefusingEndsOf:
    """A store that refuses, for a passing reason (as a row locked past lock_timeout is),
    every end state of the results of the records in `records`."""

    def __init__(self, inner: SQLStore, records: set[str]) -> None:
        self.inner = inner
        self.records = records
        self.results: set[str] = set()

    def write(self, ops: list[Any]) -> None:
        for op in ops:
            if isinstance(op, InsertRecord) and op.record["record_id"] in self.records:
                self.results.update(r["result_id"] for r in op.results)
        if any(isinstance(op, UpdateResult) and op.result_id in self.results
               and op.values.get("status") in ("done", "failed", "skipped") for op in ops):
            raise sa.exc.OperationalError("UPDATE", {}, Exception("lock timeout"))
        self.inner.write(ops)

    def transient(self, exc: BaseException) -> bool:
        return "lock timeout" in str(exc) or self.inner.transient(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_result_whose_end_state_was_given_up_is_left_to_a_worker(
        backend: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An end state the writer gave up storing (refused past TRANSIENT_HOLD_MAX) left its
    row pending under this process's lease, renewed with the others' for as long as the
    process evaluated anything: no worker could take it over until the process exited. It
    is no longer renewed: once it runs out a worker evaluates it again — while the results
    still evaluated here stay held by this process."""
    from scrutiny.core import _writer

    monkeypatch.setattr(_writer, "TRANSIENT_HOLD_MAX", 0.2, raising=False)
    url, prefix = backend
    given_up = make_record(0, output="x" * 50)
    store: Any = _RefusingEndsOf(SQLStore(url, table_prefix=prefix), {given_up.record_id})
    quick, held = Feedback(fbs.length).on_output(), Feedback(gated).on_output()
    with Session(store=store, lease_seconds=3) as app, \
            Session(url, table_prefix=prefix) as other, \
            caplog.at_level(logging.CRITICAL, logger="scrutiny"):
        busy = app.ingest(make_record(1), [held])  # evaluated here all along
        assert STARTED.wait(10)
        app.ingest(given_up, [quick])
        told = given_up.wait_for_feedback_results(timeout=30)[quick]
        assert told.status is FeedbackStatus.FAILED
        assert "once its lease runs out" in (told.error or "")
        worker = other.start_worker(poll_interval=0.05)

        def evaluated_again() -> bool:
            got = other.get_record(given_up.record_id)
            return got is not None and [r.status for r in got.feedback_results.values()] \
                == [FeedbackStatus.DONE]

        poll(evaluated_again, 20, "a worker to evaluate the result given up")
        got = other.get_record(given_up.record_id)
        assert got is not None
        assert [r.result for r in got.feedback_results.values()] == [0.5]
        [row] = [r for r in stored_results(url, prefix) if r["status"] != "done"]
        assert row["worker_id"] == app.owner_id  # its lease is still renewed
        assert worker.claimed == 1
        GATE.set()
        assert busy.wait_for_feedback_results(timeout=30)[held].status is \
            FeedbackStatus.DONE
        assert worker.stop(10)


# ---------------------------------------------------------------------- the CLI
def test_cli_refuses_a_private_memory_store_and_a_negative_grace() -> None:
    from scrutiny.cli import main

    runner = CliRunner()
    for command in (["records"], ["leaderboard"]):
        out = runner.invoke(main, [*command, "--database-url", "memory://"])
        assert out.exit_code == 2, out.output
        assert "memory://" in out.output
    out = runner.invoke(main, ["worker", "--database-url", "sqlite:///unused.sqlite",
                               "--grace", "-5"])
    assert out.exit_code == 2
    assert "--grace" in out.output
    assert "flush_timeout" not in out.output
    # (processes of their own: a worker or dashboard that is not refused runs until it is
    # stopped; the dashboard served an empty store of its own)
    for command in ("worker", "dashboard"):
        proc = subprocess.run([sys.executable, "-m", "scrutiny.cli", command,
                               "--database-url", "memory://"], capture_output=True, text=True,
                              timeout=20, cwd=REPO)
        assert proc.returncode == 2
        assert "memory://" in proc.stderr
        assert "app's database" in proc.stderr


def test_a_deferred_session_and_its_worker_still_end_cleanly(sqlite: tuple[str, str]) -> None:
    url, prefix = sqlite
    with Session(url, feedback_mode=FeedbackMode.DEFERRED) as s:
        fb = Feedback(fbs.length).on_output()
        record = s.ingest(make_record(), [fb])
        worker = s.start_worker(poll_interval=0.05)
        assert record.wait_for_feedback_results(timeout=5)[fb].status is FeedbackStatus.DONE
        assert worker.stop(5)
    assert s.close() is True
    assert [r["status"] for r in stored_results(url, prefix)] == ["done"]


def record_tags(record: Record) -> Any:
    return record.tags


def test_a_tag_list_cut_at_storage_is_not_scored(sqlite: tuple[str, str]) -> None:
    """A tag list over max_payload_bytes is stored as a truncation marker (a JSON object):
    read back, Record made it the list of the marker's keys, which said nothing of the cut,
    and a feedback on the tags scored those keys."""
    url, _ = sqlite
    on_tags = Feedback(fbs.length, name="tag_length").on(record_tags)
    with Session(url, feedback_mode="deferred", max_payload_bytes=1024) as app:
        cut = app.ingest(make_record(0, tags=[f"tag-{i:04d}" for i in range(300)]),
                         [on_tags])
        assert app.flush(10)
        assert app.resume_pending(timeout=5) == 1
        result = cut.wait_for_feedback_results(timeout=5)[on_tags]
    assert result.status is FeedbackStatus.SKIPPED, result
    assert "truncated when the record was stored" in (result.error or "")


# ---------------------------------------------------------------------- end states refused
def _take_over(url: str, prefix: str, status: str, score: float | None) -> None:
    """What a worker does once this process's lease ran out (it was paused): claim the row
    with a token of its own, and maybe store its end state."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                f"UPDATE {prefix}feedback_results SET status = :status, score = :score, "
                f"lease_token = 'theirs', worker_id = 'another-process'"),
                {"status": status, "score": score})
    finally:
        engine.dispose()


@pytest.mark.parametrize("theirs", ["done", "running"])
def test_an_end_state_refused_after_a_takeover_is_not_told(backend: tuple[str, str],
                                                           theirs: str) -> None:
    """The lease ran out while this process evaluated (paused past lease_seconds) and a
    worker took the row over: this end state's update matched no row, yet its waiters and
    listeners were told it — a result the database does not hold."""
    url, prefix = backend
    with Session(url, table_prefix=prefix) as s:
        record = s.ingest(make_record(), [Feedback(gated).on_output()])
        assert STARTED.wait(10)
        assert s.flush(10)
        _take_over(url, prefix, theirs, 0.9 if theirs == "done" else None)
        GATE.set()  # this process's own end state (0.5) comes now, and is refused
        if theirs == "running":
            assert not s.wait_for_feedback(1.0)  # (followed until the other one ends)
            [mid] = record.wait_for_feedback_results(timeout=0).values()
            assert mid.status is not FeedbackStatus.DONE
            _take_over(url, prefix, "done", 0.9)
        [told] = record.wait_for_feedback_results(timeout=10).values()
        assert (told.status, told.result) == (FeedbackStatus.DONE, 0.9)
        assert s.wait_for_feedback(10)
    assert [(r["status"], r["score"]) for r in stored_results(url, prefix)] == [("done", 0.9)]


def test_a_result_whose_record_is_deleted_while_evaluated_ends_its_waits(
        backend: tuple[str, str]) -> None:
    url, prefix = backend
    with Session(url, table_prefix=prefix) as s:
        record = s.ingest(make_record(), [Feedback(gated).on_output()])
        assert STARTED.wait(10)
        assert s.delete_records(app_ids=["work"]) == 1
        GATE.set()
        [told] = record.wait_for_feedback_results(timeout=10).values()
        assert told.status is FeedbackStatus.PENDING  # (not `done`: nothing stored it)
        assert "deleted" in (told.error or "")
        assert s.wait_for_feedback(10)
    assert stored_results(url, prefix) == []


def test_a_deferred_wait_ends_once_its_record_is_deleted(backend: tuple[str, str]) -> None:
    """The watcher polled for a row that no longer existed: wait_for_feedback() and
    resume_pending() never returned, and close() always took its whole timeout."""
    url, prefix = backend
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as s:
        record = s.ingest(make_record(), [Feedback(fbs.length).on_output()])
        assert s.flush(10)
        assert s.delete_records(app_ids=["work"]) == 1
        assert s.wait_for_feedback(10)
        [told] = record.wait_for_feedback_results(timeout=0).values()
        assert told.status is FeedbackStatus.PENDING
        assert "deleted" in (told.error or "")
        assert s.stats()["unfinished_feedback"] == 0


_NOTEBOOK_CELLS = """
import sys, threading
from scrutiny import Feedback, Record, Session

url = sys.argv[1]
started, release = threading.Event(), threading.Event()

def judge(output: str) -> float:  # a notebook cell's function: in __main__
    if started.is_set():
        return 0.5
    started.set()
    release.wait(30)
    return 0.1

f_judge = Feedback(judge, name="judge").on_output()
"""


def _status_of(url: str) -> list[tuple[str, float | None]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT status, score FROM scrutiny_feedback_results"))]  # type: ignore[misc]


def test_results_of_a_feedback_defined_in_main_resume_where_it_is_defined(
        tmp_path: Path) -> None:
    """A notebook's feedbacks are in __main__, which no worker can import by path: after
    close() left a result pending (or a kernel restart left it), resume_pending() in the
    notebook — the function defined right there — stored it failed for good, "not
    importable by path". It is evaluated with the feedback of that id defined in this
    process; where none is, it stays pending, saying what to do."""
    url = f"sqlite:///{tmp_path}/nb.sqlite"
    closed_early = _NOTEBOOK_CELLS + """
session = Session(url)
session.ingest(Record(app_name="nb", app_version="v1", input="q", output="o"), [f_judge])
assert started.wait(20)
session.close(timeout=0.2)  # (the evaluation still runs: its result is left pending)
release.set()
"""
    ran = subprocess.run([sys.executable, "-c", closed_early, url], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert _status_of(url) == [("pending", None)]

    without_it = ("import sys\nfrom scrutiny import Session\n"
                  "session = Session(sys.argv[1])\n"
                  "print('claimed', session.resume_pending(timeout=20))\nsession.close()\n")
    ran = subprocess.run([sys.executable, "-c", without_it, url], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "run the code that defines it here" in ran.stderr
    assert _status_of(url) == [("pending", None)]  # (not failed for good)

    kernel_restarted = _NOTEBOOK_CELLS + """
started.set()  # (evaluated at once now)
session = Session(url)
print("claimed", session.resume_pending(timeout=20))
session.close()
"""
    ran = subprocess.run([sys.executable, "-c", kernel_restarted, url], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "claimed 1" in ran.stdout
    assert _status_of(url) == [("done", 0.5)]
