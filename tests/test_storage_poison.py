"""The storage writer and a database that keeps refusing one write for a passing reason.

A write refused with a "transient" error (the store's `transient(exc)`: a lock or statement
timeout) is held and retried, as in an outage — but one that always fails that way (a row
locked for good) held every later record and result behind it until the session closed.
Past `TRANSIENT_HOLD_MAX` the batch's items are tried one by one: those the database takes
are stored, those it still refuses are given up, logged, counted and their waiters told.
(The same on a real PostgreSQL server: tests/test_postgres_team.py.)"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy.exc import OperationalError

from scrutiny.core import _writer
from scrutiny.core._writer import StorageWriter, WriteItem
from scrutiny.core.storage import InsertRecord, MemoryStore, WriteOp


class _PoisonStore:
    """A memory store behind a database that answers pings but refuses, with a passing
    error, every write that holds a record in `poisoned` (all of them while `blocked`);
    while `down` it does not answer pings either."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.url = "memory://poison"
        self.poisoned: set[str] = set()
        self.down = False
        self.first_refusal = 0.0
        self.refused = threading.Event()
        self.refused_for_a_while = threading.Event()  # refusing for over a second
        self.slow = 0.0  # seconds each write takes


    def write(self, ops: Sequence[WriteOp]) -> None:
        ids = {op.record["record_id"] for op in ops if isinstance(op, InsertRecord)}
        if self.down or ids & self.poisoned:
            now = time.monotonic()
            self.refused.set()
            self.first_refusal = self.first_refusal or now
            if now - self.first_refusal > 1.0:
                self.refused_for_a_while.set()
            raise OperationalError("INSERT", {}, Exception(
                "canceling statement due to statement timeout" if not self.down
                else "connection refused"))
        if self.slow:
            threading.Event().wait(self.slow)  # (a database a little slower than the app)
        self.inner.write(ops)

    def ping(self) -> bool:
        return not self.down

    def transient(self, exc: BaseException) -> bool:
        return "timeout" in str(exc)

    def stored(self, record_ids: Sequence[str]) -> list[str]:
        return sorted(r["record_id"] for r in self.inner.records_by_ids(record_ids))


def _insert(record_id: str) -> list[WriteOp]:
    return [InsertRecord(app={"app_id": "app:v1", "app_name": "app", "app_version": "v1"},
                         record={"record_id": record_id, "app_id": "app:v1"})]


class _Told:
    """What the writer told each item's after_commit hook."""

    def __init__(self) -> None:
        self.stored: dict[str, bool] = {}

    def item(self, record_id: str) -> WriteItem:
        return WriteItem(lambda: _insert(record_id),
                         lambda ok: self.stored.__setitem__(record_id, ok))


IN_A_ROW = 3


@pytest.fixture
def store() -> _PoisonStore:
    return _PoisonStore()


@pytest.fixture
def writer(store: _PoisonStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageWriter]:
    monkeypatch.setattr(_writer, "TRANSIENT_HOLD_MAX", 0.2, raising=False)
    monkeypatch.setattr(_writer, "GIVE_UP_IN_A_ROW", IN_A_ROW, raising=False)
    w = StorageWriter(store, max_queue=1000)  # type: ignore[arg-type]
    yield w
    w.close(timeout=5)


def _one_batch(writer: StorageWriter, told: _Told, ids: list[str]) -> None:
    """Queue the items of `ids` so that the writer takes them as one batch: it is busy
    preparing an item of its own meanwhile."""
    busy, go = threading.Event(), threading.Event()

    def prepare() -> list[WriteOp]:
        busy.set()
        assert go.wait(10)
        return _insert("first")

    assert writer.submit(WriteItem(prepare, lambda ok: told.stored.__setitem__("first", ok)))
    assert busy.wait(10)
    for record_id in ids:
        assert writer.submit(told.item(record_id))
    go.set()


def test_one_item_refused_past_the_bound_is_given_up_and_the_others_are_stored(
        writer: StorageWriter, store: _PoisonStore, caplog: pytest.LogCaptureFixture) -> None:
    """One record whose write always timed out held its batch, and every later one, until
    the session closed: the others are stored, it is given up — logged by name, counted,
    its waiter told."""
    told = _Told()
    ids = ["r0", "r1", "bad", "r3", "r4"]
    store.poisoned.add("bad")
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        _one_batch(writer, told, ids)
        assert store.refused.wait(10)
        later = ["r5", "r6"]  # queued behind the stuck batch
        for record_id in later:
            assert writer.submit(told.item(record_id))
        assert writer.flush(30)
    assert store.stored([*ids, *later]) == ["r0", "r1", "r3", "r4", "r5", "r6"]
    assert told.stored == {"first": True, "r0": True, "r1": True, "bad": False, "r3": True,
                           "r4": True, "r5": True, "r6": True}
    assert writer.failed == 1
    assert "trying its 5 item(s) one by one" in caplog.text
    [lost] = [r.getMessage() for r in caplog.records if "gave up storing" in r.getMessage()]
    assert "record bad (app 'app:v1')" in lost
    assert "statement timeout" in lost


def test_a_whole_table_refusing_past_the_bound_costs_a_few_items_not_the_batch(
        writer: StorageWriter, store: _PoisonStore, caplog: pytest.LogCaptureFixture) -> None:
    """When every item is refused on its own too (a table locked for long, not one row),
    each would pay its timeout and the whole batch be given up: after GIVE_UP_IN_A_ROW
    the rest is held again, and stored once the table is free."""
    told = _Told()
    ids = [f"r{i}" for i in range(10)]
    store.poisoned.update(ids)
    lost: list[str] = []

    def item(record_id: str) -> WriteItem:
        def after_commit(ok: bool) -> None:
            told.stored[record_id] = ok
            if not ok:
                lost.append(record_id)
                if len(lost) == IN_A_ROW:
                    store.poisoned.clear()  # the table is free again
        return WriteItem(lambda: _insert(record_id), after_commit)

    told.item = item  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        _one_batch(writer, told, ids)
        assert writer.flush(30)
    assert lost == ids[:IN_A_ROW]
    assert store.stored(ids) == ids[IN_A_ROW:]
    assert writer.failed == IN_A_ROW
    assert f"holding the other {10 - IN_A_ROW} again" in caplog.text


def test_an_unreachable_database_is_waited_for_past_the_bound(
        writer: StorageWriter, store: _PoisonStore, caplog: pytest.LogCaptureFixture) -> None:
    """The bound is for a database that answers: one that does not (a server restarting)
    is waited for as long as it takes, and nothing made meanwhile is lost."""
    told = _Told()
    store.down = True
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        for record_id in ("r0", "r1", "r2"):
            assert writer.submit(told.item(record_id))
        assert store.refused_for_a_while.wait(30)  # five times the bound
        assert told.stored == {}
        store.down = False
        assert writer.flush(30)
    assert told.stored == {"r0": True, "r1": True, "r2": True}
    assert writer.failed == 0
    assert "gave up" not in caplog.text


class _Periodic:
    """A periodic task for the writer (the session's lease renewal): counts its calls."""

    def __init__(self, after: int) -> None:
        self.calls = 0
        self.after = after
        self.called = threading.Event()  # called `after` times

    def __call__(self) -> list[WriteOp]:
        self.calls += 1
        if self.calls >= self.after:
            self.called.set()
        return []


def test_the_periodic_task_runs_while_work_keeps_coming(store: _PoisonStore) -> None:
    """It ran only once the queue was empty: under steady traffic the leases were never
    renewed, and workers took over results still being evaluated."""
    periodic = _Periodic(after=3)
    store.slow = 0.005
    writer = StorageWriter(store, max_queue=100_000, max_batch=20,  # type: ignore[arg-type]
                           idle_interval=0.05, on_idle=periodic)
    told = _Told()
    try:
        i = 0
        deadline = time.monotonic() + 10
        while not periodic.called.is_set() and time.monotonic() < deadline:
            while writer.backlog < 100:  # (the writer takes 20 at a time: never empty)
                assert writer.submit(told.item(f"r{i}"))
                i += 1
            periodic.called.wait(0.001)
        assert periodic.called.is_set(), f"{periodic.calls} call(s) in 10 s of traffic"
    finally:
        assert writer.close(timeout=30)


def test_the_periodic_task_runs_while_a_batch_is_held(
        store: _PoisonStore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A batch refused for a passing reason is held up to TRANSIENT_HOLD_MAX seconds (60, as
    long as a lease): the periodic task did not run meanwhile, and the leases ran out."""
    monkeypatch.setattr(_writer, "TRANSIENT_HOLD_MAX", 60.0, raising=False)
    periodic = _Periodic(after=3)
    writer = StorageWriter(store, max_queue=1000,  # type: ignore[arg-type]
                           idle_interval=0.05, on_idle=periodic)
    told = _Told()
    store.poisoned.add("held")
    try:
        with caplog.at_level(logging.CRITICAL, logger="scrutiny"):
            assert writer.submit(told.item("held"))
            assert store.refused.wait(10)
            periodic.calls = 0  # (counting from the first refusal)
            assert periodic.called.wait(10), f"{periodic.calls} call(s)"
            assert told.stored == {}  # still held
            store.poisoned.clear()
            assert writer.flush(30)
        assert told.stored == {"held": True}
    finally:
        writer.close(timeout=5)
