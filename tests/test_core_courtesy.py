"""Handing the GIL to late evaluation threads: when the app's thread offers it, and when not."""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.core import _courtesy
from scrutiny.core._courtesy import Courtesy, offer, register, unregister
from scrutiny.core._dispatch import _BusySelector


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every sleep offer() makes (instead of making it)."""
    calls: list[float] = []
    monkeypatch.setattr(_courtesy, "_sleep", calls.append)
    monkeypatch.setattr(_courtesy, "_live", ())  # only the courtesies a test registers
    return calls


def test_nothing_is_offered_while_the_loop_is_not_late(sleeps: list[float]) -> None:
    courtesy = Courtesy()
    register(courtesy)
    offer()  # polling without a timer
    courtesy.due = time.monotonic() + 60
    offer()  # its next timer is not due
    assert sleeps == []
    unregister(courtesy)


def test_a_late_loop_is_offered_the_gil_once_per_gap(sleeps: list[float]) -> None:
    courtesy = Courtesy()
    register(courtesy)
    courtesy.due = time.monotonic() - 0.001  # its timer is due and it has not come back
    offer()
    offer()  # at once again: within MIN_GAP, not again
    assert sleeps == [0]
    courtesy.last_offer -= _courtesy.MIN_GAP
    offer()
    assert sleeps == [0, 0]
    unregister(courtesy)
    courtesy.last_offer = 0.0
    offer()  # a closed loop is never offered anything
    assert sleeps == [0, 0]
    assert courtesy.due == float("inf")


def test_blocked_sync_calls_are_offered_the_gil_at_most_every_sync_every(
        sleeps: list[float]) -> None:
    courtesy = Courtesy()
    register(courtesy)
    courtesy.blocked.add(1)
    offer()
    offer()
    assert sleeps == [0]
    courtesy.last_offer -= _courtesy.SYNC_EVERY
    offer()
    assert sleeps == [0, 0]
    courtesy.blocked.clear()
    courtesy.last_offer -= _courtesy.SYNC_EVERY
    offer()  # nobody inside a call any more
    assert sleeps == [0, 0]
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


class _Spy(selectors.DefaultSelector):
    """Sees what the loop's selector asks the system for, and what it published then."""

    seen: list[tuple[float | None, float]]

    def select(self, timeout: float | None = None) -> list[Any]:
        self.seen.append((timeout, self.courtesy.due))  # type: ignore[attr-defined]
        return super().select(timeout)


class _Probe(_BusySelector, _Spy):
    pass


def test_the_selector_publishes_when_its_wait_ends_and_waits_whole_milliseconds() -> None:
    courtesy = Courtesy()
    selector = _Probe(courtesy)
    selector.seen = []
    t0 = time.monotonic()
    assert selector.select(0.0123) == []
    waited = time.monotonic() - t0
    (asked, due), = selector.seen
    assert asked is not None
    assert 0.0119 < asked <= 0.012
    assert t0 + 0.0123 <= due < t0 + 0.5  # when the wait was due to end
    assert waited >= 0.0123  # never early
    assert courtesy.due == float("inf")  # back on the GIL: not waiting any more

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
    """The loop waits whole milliseconds for I/O and sleeps the rest: timers must still
    never run before they are due."""
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
