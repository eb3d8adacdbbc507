"""The futures of feedback results: their done-callbacks run on the callback thread."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

from scrutiny import Feedback, FeedbackResult, Record, Session


def make_record(i: int = 0) -> Record:
    return Record(app_name="app", app_version="v1", input=f"question {i}",
                  output=f"answer {i}")


def one(name: str = "one") -> Feedback:
    return Feedback(lambda output: 1.0, name=name).on_output()


def test_a_futures_done_callback_runs_on_the_callback_thread_not_the_writer(
        database_url: str) -> None:
    """add_done_callback's function ran on the writer thread: a slow one stalled the
    storing of every result, and one waiting for another result deadlocked the writer."""
    seen: dict[str, Any] = {}
    with Session(database_url) as session:
        first = session.ingest(make_record(1), [one()])
        second = session.ingest(make_record(2), [one()])

        def on_done(future: concurrent.futures.Future[FeedbackResult]) -> None:
            seen["thread"] = threading.current_thread().name
            seen["score"] = future.result().result
            seen["other"] = second.wait_for_feedback_results(timeout=10)[
                next(iter(second.feedback_results))].status.value

        for future in first.feedback_futures().values():
            future.add_done_callback(on_done)
        began = time.monotonic()
        third = session.ingest(make_record(3), [one()])
        result = next(iter(third.wait_for_feedback_results(timeout=10).values()))
        assert result.status.value == "done"
        assert time.monotonic() - began < 5
        assert session.wait_for_feedback(10)
        # (added once it is resolved: run at once, on the caller's thread, as Future does)
        (future,) = first.feedback_futures().values()
        threads: list[str] = []
        future.add_done_callback(lambda f: threads.append(threading.current_thread().name))
        assert threads == [threading.current_thread().name]
    assert seen == {"thread": "scrutiny-callbacks", "score": 1.0, "other": "done"}


async def test_a_slow_done_callback_holds_up_neither_storage_nor_awaits(
        database_url: str) -> None:
    """asyncio's wrapper of a future (await_feedback_results) only hands the result to its
    loop: it is told at once, not queued behind the app's slow done-callback."""
    release = threading.Event()
    ran = threading.Event()

    def slow(future: concurrent.futures.Future[FeedbackResult]) -> None:
        ran.set()
        release.wait(10)

    session = Session(database_url)
    try:
        first = session.ingest(make_record(1), [one()])
        for future in first.feedback_futures().values():
            future.add_done_callback(slow)
        assert ran.wait(10)
        second = session.ingest(make_record(2), [one()])
        began = time.monotonic()
        results = await second.await_feedback_results(timeout=5)
        assert [r.status.value for r in results.values()] == ["done"]
        assert time.monotonic() - began < 4
    finally:
        release.set()
        session.close(10)
