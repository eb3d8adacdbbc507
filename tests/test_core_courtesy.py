"""Handing the GIL to late evaluation threads: when the app's thread offers it, and when not."""

from __future__ import annotations

import asyncio
import select
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.core import _courtesy
from scrutiny.core._courtesy import Courtesy, offer, register, unregister
from scrutiny.core._dispatch import _BusySelector


class _Clock:
    """A fake monotonic clock; each sleep of offer() 'costs' `cost` seconds."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.cost = 0.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += self.cost


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(_courtesy, "_monotonic", fake.monotonic)
    monkeypatch.setattr(_courtesy, "_sleep", fake.sleep)
    monkeypatch.setattr(_courtesy, "_live", ())  # only the courtesies a test registers
    return fake


def test_nothing_is_offered_while_the_loop_is_not_late(clock: _Clock) -> None:
    courtesy = Courtesy()
    register(courtesy)
    offer()  # polling without a timer
    courtesy.due = clock.now + 60
    offer()  # its next timer is not due
    assert clock.sleeps == 0
    unregister(courtesy)


def test_a_late_loop_is_offered_the_gil_within_the_apps_budget(clock: _Clock) -> None:
    courtesy = Courtesy()
    register(courtesy)
    courtesy.due = clock.now - 0.001  # its timer is due and it has not come back
    clock.cost = 0.001  # each offer costs the app 1 ms
    start = clock.now

    def within_budget() -> bool:  # what the offers cost <= what the app's time allows
        spent = clock.sleeps * clock.cost
        return spent <= _courtesy.BURST + (clock.now - start) * _courtesy.BUDGET + clock.cost

    for _ in range(20):
        offer()
    assert clock.sleeps >= round(_courtesy.BURST / clock.cost)
    assert within_budget()
    refused = clock.sleeps
    clock.now += 0.1  # 100 ms later: BUDGET of them may go to offers again
    for _ in range(20):
        offer()
    assert clock.sleeps > refused
    assert within_budget()
    unregister(courtesy)
    clock.now += 1
    before = clock.sleeps
    offer()  # a closed loop is never offered anything
    assert clock.sleeps == before
    assert courtesy.due == float("inf")


def test_blocked_sync_calls_are_offered_the_gil_at_most_every_sync_every(
        clock: _Clock) -> None:
    courtesy = Courtesy()
    register(courtesy)
    courtesy.blocked.add(1)
    offer()
    offer()
    assert clock.sleeps == 1
    clock.now += 2 * _courtesy.SYNC_EVERY
    offer()
    assert clock.sleeps == 2
    courtesy.blocked.clear()
    clock.now += 2 * _courtesy.SYNC_EVERY
    offer()  # nobody inside a call any more
    assert clock.sleeps == 2
    unregister(courtesy)


def _make_record() -> Record:
    now = time.time()
    return Record(app_name="app", app_version="v1", input="q", output="a",
                  start_time=now, end_time=now)


def test_the_pool_says_which_threads_are_inside_a_call_and_the_loop_registers(
        tmp_path: Path) -> None:
    inside = threading.Event()
    release = threading.Event()

    def blocking(output: str) -> float:
        inside.set()
        assert release.wait(10)
        return 1.0

    fb = Feedback(blocking, name="blocking").on_output()
    with Session(f"sqlite:///{tmp_path}/c.sqlite") as s:
        record = s.ingest(_make_record(), [fb])
        assert inside.wait(10)
        courtesy = s._evaluation_loop()._courtesy
        assert courtesy in _courtesy._live
        assert len(courtesy.blocked) == 1  # the pool thread inside `blocking`
        release.set()
        assert record.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE
        assert not courtesy.blocked
    assert courtesy not in _courtesy._live  # closed: never offered anything again
    assert courtesy.due == float("inf")


class _Probe(_BusySelector):
    """Sees what the loop's selector asks the system for, and what it published then."""

    seen: list[tuple[float | None, float]]

    def _wait(self, wait: float | None) -> list[Any]:
        self.seen.append((wait, self.courtesy.due))
        return super()._wait(wait)


def test_the_selector_publishes_when_its_wait_ends() -> None:
    courtesy = Courtesy()
    selector = _Probe(courtesy)
    selector.seen = []
    t0 = time.monotonic()
    assert selector.select(0.0123) == []
    waited = time.monotonic() - t0
    (asked, due), = selector.seen
    assert asked is not None
    assert 0.0 < asked <= 0.0123
    assert t0 + 0.0123 <= due < t0 + 0.5  # when the wait was due to end
    assert waited >= 0.0123  # never early
    assert courtesy.due == float("inf")  # back on the GIL: not waiting any more

    # callbacks ready (a zero timeout): a quick poll, and no deadline for the app to honour
    selector.seen = []
    selector._last_poll = 0.0  # (a zero-timeout poll right after another is skipped)
    assert selector.select(0) == []
    (asked, due), = selector.seen
    assert asked == 0
    assert due == float("inf")

    # a cap of our own (looking for handed-over records) is nobody's deadline
    selector.seen = []
    selector.before_poll = lambda: 0.001
    t0 = time.monotonic()
    selector.select(None)
    (asked, due), = selector.seen
    assert asked is not None
    assert asked <= 0.001
    assert due == float("inf")
    selector.close()


def test_a_timer_never_fires_early(tmp_path: Path) -> None:
    """The loop shortens its wait for I/O by the time it spent starting handed-over records,
    and caps it while it looks for more: timers must still never run before they are due."""
    early: list[float] = []

    async def precise(output: str) -> float:
        loop = asyncio.get_running_loop()
        for delay in (0.0004, 0.0015, 0.0101, 0.0237, 0.05):
            due = loop.time() + delay
            await asyncio.sleep(delay)
            if loop.time() < due:
                early.append(due - loop.time())
        return 1.0

    fb = Feedback(precise, name="precise").on_output()
    with Session(f"sqlite:///{tmp_path}/t.sqlite") as s:
        results = s.ingest(_make_record(), [fb]).wait_for_feedback_results(timeout=10)
    assert results[fb].status is FeedbackStatus.DONE
    assert early == []


def test_scrutinys_own_threads_offer_the_gil_without_spending_the_apps_budget(
        clock: _Clock) -> None:
    courtesy = Courtesy()
    register(courtesy)
    courtesy.due = clock.now - 0.001
    clock.cost = 0.001
    for _ in range(20):
        offer(budgeted=False)  # the writer, between the items of a batch
    assert clock.sleeps == 20
    assert courtesy.allowance == _courtesy.BURST  # the app's budget is untouched
    unregister(courtesy)


def test_timed_waits_end_on_time_not_at_the_next_millisecond(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """epoll rounds every wait up to a whole millisecond; a wait with a fraction of one
    waits with select() on the epoll descriptor (microseconds), and still reports events."""
    real = select.select
    asked: list[float | None] = []

    def spy(r: Any, w: Any, x: Any, timeout: float | None = None) -> Any:
        asked.append(timeout)
        return real(r, w, x, timeout)

    monkeypatch.setattr(select, "select", spy)
    selector = _BusySelector(Courtesy())
    reader, writer = socket.socketpair()
    try:
        t0 = time.monotonic()
        assert selector.select(0.0025) == []
        assert time.monotonic() - t0 >= 0.0025  # never early
        assert len(asked) == 1  # select(), not epoll: epoll would have waited 3 ms
        assert asked[0] is not None
        assert 0 < asked[0] <= 0.0025  # the fraction is kept, not rounded up

        selector.register(reader, selectors.EVENT_READ, "reader")
        writer.send(b"x")
        events = selector.select(0.0025)
        assert [(key.data, mask) for key, mask in events] == [("reader", selectors.EVENT_READ)]

        refused: list[int] = []

        def out_of_range(*args: Any) -> Any:
            refused.append(1)
            raise ValueError("filedescriptor out of range in select()")

        monkeypatch.setattr(select, "select", out_of_range)
        events = selector.select(0.0015)  # falls back to epoll, and stays there
        assert [(key.data, mask) for key, mask in events] == [("reader", selectors.EVENT_READ)]
        assert selector.select(0.0015) == [(selector.get_key(reader), selectors.EVENT_READ)]
        assert len(refused) == 1
    finally:
        selector.close()
        reader.close()
        writer.close()


def test_waking_an_idle_loop_for_a_record_makes_it_due(tmp_path: Path) -> None:
    """The first record after a quiet spell wakes the loop, which then waits for the GIL
    like an overdue timer does: the app's next callback offers it (before this, the first
    evaluations of a busy app's burst started 2-28 ms after the first call)."""
    with Session(f"sqlite:///{tmp_path}/t.sqlite") as s:
        loop = s._evaluation_loop()
        courtesy = loop._courtesy
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # the loop is busy, as if waiting for the GIL
            held.set()
            assert release.wait(10)

        loop._loop.call_soon_threadsafe(hold)
        assert held.wait(10)
        assert courtesy.due == float("inf")  # running: nobody is waiting for it
        started = threading.Event()
        loop.accept(started.set)
        assert courtesy.due <= time.monotonic()  # due now: offer() hands the GIL over
        release.set()
        assert started.wait(10)
