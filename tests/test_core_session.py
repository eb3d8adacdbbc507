"""The session: storage before evaluation, visibility, waiting, failures, lifecycle."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from scrutiny import (
    ConfigurationError,
    Feedback,
    FeedbackMode,
    FeedbackResult,
    FeedbackStatus,
    Record,
    RecordStatus,
    RetryPolicy,
    Select,
    Session,
    SkipFeedback,
    Span,
    TokenUsage,
)


def make_record(i: int = 0, **kw: object) -> Record:
    now = time.time()
    base: dict[str, object] = {
        "app_name": "app", "app_version": "v1", "input": f"question {i}",
        "output": f"answer {i}", "contexts": ["ctx a", "ctx b"], "start_time": now,
        "end_time": now + 0.01,
    }
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/scrutiny.sqlite"


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    s = Session(db_url)
    yield s
    s.close()


def _gate() -> tuple[threading.Event, Feedback]:
    gate = threading.Event()

    def gated(output: str) -> float:
        assert gate.wait(10)
        return 1.0

    return gate, Feedback(gated, name="gated").on_output()


def test_results_are_visible_as_pending_right_after_ingest(session: Session) -> None:
    gate, fb = _gate()
    record = session.ingest(make_record(), [fb])
    df, cols = session.get_records_and_feedback()
    try:
        assert cols == ["gated"]
        assert len(df) == 1
        assert df.loc[0, "record_id"] == record.record_id
        assert df.loc[0, "gated status"] in ("pending", "running")
        assert df["gated"].isna().all()
    finally:
        gate.set()
    record.wait_for_feedback_results(timeout=10)


def test_after_wait_a_new_session_on_the_same_file_shows_the_scores(
        session: Session, db_url: str) -> None:
    fb = Feedback(lambda output: len(output) / 10, name="len").on_output()
    record = session.ingest(make_record(), [fb])
    results = record.wait_for_feedback_results(timeout=10)
    assert results[fb].status is FeedbackStatus.DONE
    with Session(db_url) as other:
        df, cols = other.get_records_and_feedback()
    assert cols == ["len"]
    assert df.loc[0, "len"] == pytest.approx(0.8)
    assert df.loc[0, "len status"] == "done"


def test_callback_returns_at_once_and_runs_once_with_all_results(session: Session) -> None:
    async def slow(output: str) -> float:
        await asyncio.sleep(1.0)
        return 0.5

    def slow_sync(output: str) -> float:
        time.sleep(1.0)
        return 0.25

    f1, f2 = Feedback(slow).on_output(), Feedback(slow_sync).on_output()
    record = session.ingest(make_record(), [f1, f2])
    calls: list[dict[Feedback, object]] = []
    fired = threading.Event()

    def on_done(results: dict[Feedback, object]) -> None:
        calls.append(results)
        fired.set()

    start = time.perf_counter()
    record.wait_for_feedback_results(callback=on_done)
    assert time.perf_counter() - start < 0.05
    assert not fired.is_set()
    assert fired.wait(10)
    session.wait_for_feedback(5)
    assert len(calls) == 1
    got = calls[0]
    assert set(got) == {f1, f2}
    assert {r.status for r in got.values()} == {FeedbackStatus.DONE}  # type: ignore[attr-defined]


def test_callback_sees_results_that_are_already_stored(session: Session, db_url: str) -> None:
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    record = session.ingest(make_record(), [fb])
    seen: list[str] = []
    done = threading.Event()

    def check(results: dict[Feedback, object]) -> None:
        with Session(db_url) as reader:
            df, _ = reader.get_records_and_feedback()
        seen.append(str(df.loc[0, "one status"]))
        done.set()

    record.wait_for_feedback_results(callback=check)
    assert done.wait(10)
    assert seen == ["done"]


@pytest.mark.parametrize("feedbacks", [1, 0])
def test_a_callback_with_nothing_left_to_wait_for_runs_on_a_thread_of_scrutiny(
        session: Session, feedbacks: int) -> None:
    """Once every result was stored (or the record has none), `callback=` ran on the
    caller's thread, before the call returned: a slow callback blocked the app."""
    fbs = [Feedback(lambda output: 1.0, name="one").on_output()][:feedbacks]
    record = session.ingest(make_record(), fbs)
    record.wait_for_feedback_results(timeout=10)
    release, ran = threading.Event(), threading.Event()
    where: list[str] = []

    def on_done(results: dict[Feedback, FeedbackResult]) -> None:
        where.append(threading.current_thread().name)
        ran.set()
        release.wait(10)  # (a slow callback: the caller must not wait for it)

    try:
        got = record.wait_for_feedback_results(callback=on_done)
        assert [r.status for r in got.values()] == [FeedbackStatus.DONE] * feedbacks
        assert ran.wait(10)
    finally:
        release.set()
    assert where == ["scrutiny-callbacks"]


def test_a_record_keeps_the_values_it_was_given_when_the_app_changes_them_after(
        session: Session) -> None:
    """A dataset loop that fills one dict and one list per row and builds a record of each
    stored every record, and had every feedback judge, the last row's values: the record
    held the app's dict and list, read on the writer thread long after."""
    row: dict[str, Any] = {"question": "", "meta": {"row": -1}}
    contexts: list[str] = []
    step = Span("s", None, "retrieve", "retriever", time.time(), inputs=row)
    seen: list[tuple[str, int]] = []

    def judged(question: dict[str, Any], row: int) -> float:
        seen.append((question["question"], row))
        return 1.0

    fb = Feedback(judged, name="judged").on(question=Select.input, row=Select.metadata("row"))
    records = []
    for i in range(30):
        row["question"] = f"q{i}"
        row["meta"]["row"] = i
        contexts.append(f"ctx {i}")
        records.append(session.ingest(make_record(i, input=row, metadata=row["meta"],
                                                  contexts=contexts, spans=[step]), [fb]))
    for i, record in enumerate(records):  # (each its own values, whatever the app does)
        assert record.input == {"question": f"q{i}", "meta": {"row": i}}
        assert record.metadata == {"row": i}
        assert record.contexts == [f"ctx {j}" for j in range(i + 1)]
        assert record.spans[0].inputs == record.input
    assert session.wait_for_feedback(20)
    assert sorted(seen) == sorted((f"q{i}", i) for i in range(30))
    stored, _ = session.get_records_and_feedback()
    assert sorted(stored["input"].map(lambda v: v["meta"]["row"])) == list(range(30))


def test_raising_timing_out_and_non_number_feedbacks_fail_with_reasons(
        session: Session) -> None:
    def boom(output: str) -> float:
        raise ValueError("the judge exploded")

    async def sleepy(output: str) -> float:
        await asyncio.sleep(5)
        return 1.0

    fbs = [
        Feedback(boom).on_output(),
        Feedback(sleepy, timeout=0.2).on_output(),
        Feedback(lambda output: "very good", name="words").on_output(),
        Feedback(lambda output: 0.9, name="good").on_output(),
    ]
    record = session.ingest(make_record(), fbs)
    results = record.wait_for_feedback_results(timeout=10)
    by_name = {fb.name: r for fb, r in results.items()}
    assert by_name["boom"].status is FeedbackStatus.FAILED
    assert "ValueError: the judge exploded" in (by_name["boom"].error or "")
    assert by_name["sleepy"].status is FeedbackStatus.FAILED
    assert "timed out after 0.2 s" in (by_name["sleepy"].error or "")
    assert by_name["words"].status is FeedbackStatus.FAILED
    assert "'very good'" in (by_name["words"].error or "")
    assert by_name["good"].status is FeedbackStatus.DONE
    assert by_name["good"].result == pytest.approx(0.9)
    for name in ("boom", "sleepy", "words"):
        assert by_name[name].result is None  # never 0, -1 or NaN
    df, _ = session.get_records_and_feedback()
    assert df.loc[0, "boom status"] == "failed"
    assert df.loc[0, "good status"] == "done"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_feedback_raising_an_exception_whose_message_cannot_be_read_fails_naming_it(
        session: Session, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Describing the error raised in turn: the result failed as an "internal error" of
    Scrutiny's, with a traceback in the log, rather than with the feedback's own error."""
    from tests.support.errors import UNREADABLE, Unprintable

    def unprintable(output: str) -> float:
        raise Unprintable

    async def aunprintable(output: str) -> float:
        raise Unprintable

    fn = unprintable if kind == "sync" else aunprintable
    with caplog.at_level(logging.ERROR, logger="scrutiny"):
        record = session.ingest(make_record(), [Feedback(fn, name="f", retries=0).on_output()])
        (result,) = record.wait_for_feedback_results(timeout=10).values()
    assert (result.status, result.error) == (FeedbackStatus.FAILED, UNREADABLE)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("error", [StopIteration, GeneratorExit])
def test_a_feedback_raising_what_a_future_cannot_hold_fails_and_loses_no_other_result(
        session: Session, kind: str, error: type[BaseException]) -> None:
    """A plain feedback's StopIteration (a `next()` on an empty iterator) was refused by
    the loop's future: its result stayed `running` for ever, and so did the results
    delivered with it. A GeneratorExit was taken for the loop closing the evaluation."""

    def raises(output: str) -> float:
        raise error("the feedback's own")

    async def araises(output: str) -> float:
        raise error("the feedback's own")

    fbs = [Feedback(raises if kind == "sync" else araises, name="raises").on_output(),
           *(Feedback(lambda output: 1.0, name=f"fine{i}").on_output() for i in range(3))]
    record = session.ingest(make_record(), fbs)
    results = {fb.name: r for fb, r in record.wait_for_feedback_results(timeout=10).items()}
    failed = results.pop("raises")
    assert failed.status is FeedbackStatus.FAILED
    # (an async one's StopIteration reaches its awaiter wrapped in a RuntimeError, which
    # named Python's wrapping rather than the feedback's error)
    assert failed.error == f"{error.__name__}: the feedback's own"
    assert {r.status for r in results.values()} == {FeedbackStatus.DONE}
    assert session.wait_for_feedback(10)


def test_feedbacks_given_as_a_generator_are_all_evaluated(session: Session) -> None:
    """The checks used the generator up: the record was evaluated with nothing, and the
    session counted an ingest in flight for good (its waits never ended, close() always
    took its whole timeout)."""
    names = ["relevance", "length"]
    record = session.ingest(make_record(), (Feedback(lambda output: 1.0, name=n).on_output()
                                            for n in names))
    results = record.wait_for_feedback_results(timeout=10)
    assert sorted(fb.name for fb in results) == sorted(names)
    assert {r.status for r in results.values()} == {FeedbackStatus.DONE}
    assert session.wait_for_feedback(10)
    with pytest.raises(ConfigurationError, match="must be a list of Feedback"):
        session.ingest(make_record(), None)  # type: ignore[arg-type]
    assert session.wait_for_feedback(10)


def test_an_infinite_timeout_waits_without_a_limit(tmp_path: Path) -> None:
    """timeout=float("inf") raised OverflowError from every wait, and close(inf) left the
    session marked closed with its threads still running."""
    inf = float("inf")
    session = Session(f"sqlite:///{tmp_path}/inf.sqlite")
    slow = Feedback(lambda output: (time.sleep(0.2), 1.0)[1], name="slow").on_output()
    record = session.ingest(make_record(), [slow])
    assert record.wait_for_feedback_results(timeout=inf)[slow].status is FeedbackStatus.DONE
    session.ingest(make_record(), [slow])
    assert session.wait_for_feedback(inf)
    assert session.flush(inf)
    session.ingest(make_record(), [slow])
    writer = session._writer
    assert writer is not None
    assert session.close(inf)
    assert not writer._thread.is_alive()


def test_a_nan_timeout_is_refused_by_every_wait(tmp_path: Path) -> None:
    """A NaN timeout (an unset setting read as float("nan")) passed every check: the
    session's waits took it as no limit at all, a record's wait as none left."""
    nan = float("nan")
    session = Session(f"sqlite:///{tmp_path}/nan.sqlite")
    gate = threading.Event()
    held = Feedback(lambda output: (gate.wait(10), 1.0)[1], name="held").on_output()
    record = session.ingest(make_record(), [held])
    waits = [lambda: session.wait_for_feedback(nan), lambda: session.flush(nan),
             lambda: session.get_records_and_feedback(wait=True, timeout=nan),
             lambda: record.wait_for_feedback_results(timeout=nan),
             lambda: session.close(nan)]
    for wait in waits:
        with pytest.raises(ValueError, match="timeout is NaN"):
            wait()
    gate.set()
    assert record.wait_for_feedback_results(timeout=10)[held].status is FeedbackStatus.DONE
    assert session.close(10)


def test_sync_feedback_timeout_fails(session: Session) -> None:
    release = threading.Event()

    def stuck(output: str) -> float:
        release.wait(5)
        return 1.0

    fb = Feedback(stuck, timeout=0.2).on_output()
    record = session.ingest(make_record(), [fb])
    result = record.wait_for_feedback_results(timeout=10)[fb]
    release.set()
    assert result.status is FeedbackStatus.FAILED
    assert "timed out" in (result.error or "")


def test_retries_stop_at_their_budget(session: Session) -> None:
    attempts: list[int] = []

    def flaky(output: str) -> float:
        attempts.append(1)
        raise ConnectionError("429 too many requests")

    fb = Feedback(flaky, retry=RetryPolicy(attempts=3, initial_backoff=0.01)).on_output()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert len(attempts) == 3
    assert result.status is FeedbackStatus.FAILED
    assert result.attempts == 3
    assert "after 3 attempts" in (result.error or "")


def test_a_retry_that_succeeds_is_done(session: Session) -> None:
    attempts: list[int] = []

    async def flaky(output: str) -> float:
        attempts.append(1)
        if len(attempts) < 2:
            raise ConnectionError("transient")
        return 0.75

    fb = Feedback(flaky, retries=2).on_output()
    fb = Feedback(flaky, retry=RetryPolicy(attempts=3, initial_backoff=0.01)).on_output()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.result == 0.75
    assert result.attempts == 2


@pytest.mark.parametrize("max_backoff", [30.0, 0.05])
def test_retry_after_hint_is_honoured(session: Session, max_backoff: float) -> None:
    """Also a hint longer than max_backoff: that caps the doubling backoff, not the wait a
    server asks for (such a hint failed the result though the server would have answered)."""
    times: list[float] = []

    class RateLimited(Exception):
        retry_after = 0.3

    def limited(output: str) -> float:
        times.append(time.monotonic())
        if len(times) == 1:
            raise RateLimited("slow down")
        return 1.0

    fb = Feedback(limited, retry=RetryPolicy(attempts=2, initial_backoff=0.0,
                                             max_backoff=max_backoff)).on_output()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.DONE
    assert times[1] - times[0] >= 0.29


def test_a_retry_after_attribute_given_as_text_or_an_http_date_is_read() -> None:
    """README: a `retry_after` hint on the error, "seconds or an HTTP date". Only a number
    was read: "3" or a date were ignored, and the normal backoff ran instead."""
    import email.utils

    from scrutiny.core._evaluate import retry_after_hint

    def error(value: object) -> Exception:
        exc = Exception("429")
        exc.retry_after = value  # type: ignore[attr-defined]
        return exc

    assert retry_after_hint(error(3)) == 3.0
    assert retry_after_hint(error("3")) == 3.0
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < (retry_after_hint(error(later)) or 0) <= 120
    assert retry_after_hint(error("soon")) is None
    assert retry_after_hint(error(True)) is None


def test_empty_selection_is_skipped_with_a_reason(session: Session) -> None:
    fb = Feedback(lambda context: 1.0, name="ctx").on_contexts()
    record = session.ingest(make_record(contexts=[]), [fb])
    result = record.wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.SKIPPED
    assert "Select.contexts found nothing" in (result.error or "")
    assert result.result is None


def test_an_empty_output_is_evaluated_not_skipped(session: Session) -> None:
    """An app that answered "" is what a non-empty check is for: the feedback gets the
    empty text (skipping it hid those records from every mean); no output at all (None)
    is nothing to evaluate."""
    fb = Feedback(lambda output: 1.0 if output.strip() else 0.0, name="nonempty").on_output()
    for output in ("", "  \n"):
        result = session.ingest(make_record(output=output), [fb]).wait_for_feedback_results(
            timeout=10)[fb]
        assert result.status is FeedbackStatus.DONE, result.error
        assert result.result == 0.0
    missing = session.ingest(make_record(output=None), [fb]).wait_for_feedback_results(
        timeout=10)[fb]
    assert missing.status is FeedbackStatus.SKIPPED
    assert "Select.output found nothing" in (missing.error or "")


def test_ingest_refuses_two_feedbacks_with_one_name_before_storing_anything(
        session: Session) -> None:
    """Stored and shown by name, the second result hid the first; recorders refuse such a
    list when they are made, and Session.ingest — called by hand — now does too."""
    twins = [Feedback(lambda output: 0.1).on_output(), Feedback(lambda output: 0.9).on_output()]
    with pytest.raises(ConfigurationError, match="two feedbacks are named 'feedback'"):
        session.ingest(make_record(), twins)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 0


def test_a_stored_record_can_be_given_more_feedbacks(session: Session, db_url: str) -> None:
    """Evaluating a new feedback on a stored record failed with the database's raw
    IntegrityError and 'the record could not be stored', though it was."""
    first = Feedback(lambda output: 0.1, name="first").on_output()
    second = Feedback(lambda output: 0.2, name="second").on_output()
    record = session.ingest(make_record(), [first])
    assert record.wait_for_feedback_results(timeout=10)[first].status is FeedbackStatus.DONE
    stored = session.get_record(record.record_id)
    assert stored is not None
    added = session.ingest(stored, [second]).wait_for_feedback_results(timeout=10)
    assert {fb.name: r.result for fb, r in added.items()} == {"first": 0.1, "second": 0.2}
    assert session.stats()["failed_writes"] == 0
    with pytest.raises(ConfigurationError, match="already has a result of \\['first'\\]"):
        session.ingest(stored, [first])
    with Session(db_url) as reader:
        df, _ = reader.get_records_and_feedback()
    assert len(df) == 1
    assert (df.loc[0, "first"], df.loc[0, "second"]) == (0.1, 0.2)


def test_one_record_object_given_twice_waits_for_both(session: Session) -> None:
    slow_started, release = threading.Event(), threading.Event()

    def slow(output: str) -> float:
        slow_started.set()
        assert release.wait(10)
        return 0.5

    record = make_record()
    quick = Feedback(lambda output: 1.0, name="quick").on_output()
    waits = Feedback(slow).on_output()
    session.ingest(record, [waits])
    session.ingest(record, [quick])
    assert slow_started.wait(10)
    results = record.wait_for_feedback_results(timeout=0.5)
    assert results[waits].status in (FeedbackStatus.PENDING, FeedbackStatus.RUNNING)
    release.set()
    results = record.wait_for_feedback_results(timeout=10)
    assert {fb.name: r.status for fb, r in results.items()} == {
        "slow": FeedbackStatus.DONE, "quick": FeedbackStatus.DONE}


def test_skip_feedback_raised_by_the_function(session: Session) -> None:
    def picky(output: str) -> float:
        raise SkipFeedback("not applicable to greetings")

    fb = Feedback(picky).on_output()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.SKIPPED
    assert result.error == "not applicable to greetings"


def test_fan_out_aggregates_with_mean_and_keeps_each_call(session: Session) -> None:
    fb = Feedback(lambda c: 1.0 if c.endswith("a") else 0.0, name="ctx").on_contexts()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.result == pytest.approx(0.5)
    assert [c.score for c in result.calls] == [1.0, 0.0]


def test_custom_aggregate(session: Session) -> None:
    fb = Feedback(lambda c: 1.0 if c.endswith("a") else 0.0, name="ctx",
                  aggregate=max).on_contexts()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.result == 1.0


def test_a_custom_aggregate_applies_to_a_single_context_too(session: Session) -> None:
    """With one retrieved context the aggregate was skipped: a share of relevant contexts
    stored the raw 0.7 instead of 1.0."""
    def share_relevant(scores: list[float]) -> float:
        return sum(x > 0.5 for x in scores) / len(scores)

    fb = Feedback(lambda context: 0.7, name="precision",
                  aggregate=share_relevant).on_contexts()
    results = [session.ingest(make_record(i, contexts=contexts), [fb])
               .wait_for_feedback_results(timeout=10)[fb]
               for i, contexts in enumerate([["only"], ["one", "two"]])]
    assert [r.result for r in results] == [1.0, 1.0]


def test_a_fan_outs_explanations_are_numbered_by_call(session: Session) -> None:
    """Numbers counted the explanations given, not the calls: with call 1 skipped, calls
    2 and 3 were labelled [0] and [1]. They count from 1 (groundedness's sources do), and
    each says its score (a context's relevance was not in the explanation)."""
    def judge(context: str) -> tuple[float, str | None]:
        if context == "b":
            raise SkipFeedback("empty context")
        return 1.0, (None if context == "a" else f"{context} ok")

    fb = Feedback(judge, name="judge").on_contexts()
    record = make_record(contexts=["a", "b", "c", "d"])
    result = session.ingest(record, [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.explanation == "[2] skipped: empty context\n[3] 1: c ok\n[4] 1: d ok"


def test_one_failing_call_of_a_fan_out_fails_the_result(session: Session) -> None:
    def half(c: str) -> float:
        if c.endswith("b"):
            raise RuntimeError("no")
        return 1.0

    fb = Feedback(half).on_contexts()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "1 of 2 calls failed" in (result.error or "")


def test_wait_with_timeout_returns_pending_status_not_a_score(session: Session) -> None:
    gate, fb = _gate()
    record = session.ingest(make_record(), [fb])
    try:
        results = record.wait_for_feedback_results(timeout=0.05)
        assert results[fb].status in (FeedbackStatus.PENDING, FeedbackStatus.RUNNING)
        assert results[fb].result is None
    finally:
        gate.set()
    assert record.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE


async def test_await_feedback_results_does_not_block_the_loop(session: Session) -> None:
    async def judge(output: str) -> float:
        await asyncio.sleep(0.05)
        return 1.0

    fb = Feedback(judge).on_output()
    record = session.ingest(make_record(), [fb])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    results = await record.await_feedback_results(timeout=10)
    task.cancel()
    assert results[fb].status is FeedbackStatus.DONE
    assert ticks > 3


async def test_a_timed_out_await_leaves_later_waits_callbacks_and_listeners_working(
        session: Session) -> None:
    """Giving up an await (its timeout) must not cancel what other waiters share: a later
    wait with no timeout hung for ever, and the callback and the session's listeners were
    never called, once one short await had timed out."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def judge(output: str) -> float:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(release.wait(), loop))
        return 0.8

    heard: list[str] = []
    session.add_listener(lambda result, record: heard.append(result.feedback_name))
    fb = Feedback(judge, name="slow").on_output()
    record = session.ingest(make_record(), [fb])
    early = await record.await_feedback_results(timeout=0.01)
    assert early[fb].status in (FeedbackStatus.PENDING, FeedbackStatus.RUNNING)
    called = threading.Event()
    record.wait_for_feedback_results(callback=lambda results: called.set())
    future = record.feedback_futures()[fb]
    assert not future.cancel()  # shared: no one waiter can cancel it for the others
    release.set()
    later = await record.await_feedback_results(timeout=10)
    assert later[fb].status is FeedbackStatus.DONE
    assert later[fb].result == 0.8
    waited = await asyncio.to_thread(record.wait_for_feedback_results)  # no timeout
    assert waited[fb].result == 0.8
    assert await asyncio.to_thread(called.wait, 10)
    assert future.result(timeout=10).result == 0.8
    assert heard == ["slow"]


def test_a_feedback_that_blocks_the_loop_fails_no_other_feedback_and_is_named_in_the_log(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    """An async feedback that makes a blocking call holds the whole loop: a quick
    feedback whose work was done on time then failed by its own timeout (both timers came
    due together when the loop got free), and nothing said why."""
    async def quick(output: str) -> float:
        await asyncio.sleep(0.01)
        return 1.0

    async def blocking(output: str) -> float:
        time.sleep(1.2)  # the mistake this test is about: a blocking call in async def
        return 0.5

    f_quick = Feedback(quick, name="quick", timeout=0.3).on_output()
    f_block = Feedback(blocking, name="blocking").on_output()
    record = session.ingest(make_record(), [f_quick, f_block])
    results = record.wait_for_feedback_results(timeout=20)
    assert results[f_quick].status is FeedbackStatus.DONE, results[f_quick].error
    assert results[f_block].status is FeedbackStatus.DONE
    assert "the evaluation loop was held for" in caplog.text
    assert "asyncio.to_thread" in caplog.text


def test_an_async_feedback_blocking_past_its_timeout_fails_as_a_timeout(
        session: Session) -> None:
    """It never gave the loop back, so its timer never fired and it ended `done` after
    three times its timeout; the same call in a plain def, or awaited, fails."""
    async def blocking(output: str) -> float:
        time.sleep(0.4)  # the mistake: a blocking call in async def
        return 0.5

    async def awaiting(output: str) -> float:
        await asyncio.sleep(0.01)
        return 1.0

    f_block = Feedback(blocking, name="blocking", timeout=0.15).on_output()
    f_ok = Feedback(awaiting, name="awaiting", timeout=0.15).on_output()
    results = session.ingest(make_record(), [f_block, f_ok]).wait_for_feedback_results(
        timeout=20)
    assert results[f_block].status is FeedbackStatus.FAILED
    assert "timed out after 0.15 s: it ran" in (results[f_block].error or "")
    assert "without once giving the event loop back" in (results[f_block].error or "")
    assert results[f_ok].status is FeedbackStatus.DONE, results[f_ok].error


def test_an_async_feedback_that_swallows_its_timeouts_cancellation_still_fails(
        session: Session) -> None:
    """It caught the CancelledError sent at its timeout and returned a value later: it
    ended `done` with that value, ten times past its timeout."""
    async def stubborn(output: str) -> float:
        try:
            await asyncio.sleep(5)
            return 0.9
        except asyncio.CancelledError:  # (cleanup that returns a default)
            await asyncio.sleep(0.2)
            return 0.0

    async def fine(output: str) -> float:  # (evaluated on the same loop, after it)
        await asyncio.sleep(0.01)
        return 1.0

    f_stubborn = Feedback(stubborn, name="stubborn", timeout=0.1).on_output()
    f_fine = Feedback(fine, name="fine", timeout=5).on_output()
    results = session.ingest(make_record(), [f_stubborn, f_fine]).wait_for_feedback_results(
        timeout=20)
    assert (results[f_stubborn].status, results[f_stubborn].result) == (
        FeedbackStatus.FAILED, None)
    assert "timed out after 0.1 s: it caught the cancellation" in (
        results[f_stubborn].error or "")
    assert results[f_fine].status is FeedbackStatus.DONE, results[f_fine].error


def test_mode_none_stores_skipped_with_the_reason(db_url: str) -> None:
    with Session(db_url, feedback_mode=FeedbackMode.NONE) as s:
        fb = Feedback(lambda output: 1.0, name="x").on_output()
        result = s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
        assert result.status is FeedbackStatus.SKIPPED
        assert "feedback_mode is 'none'" in (result.error or "")


def test_session_listener_gets_each_stored_result(session: Session) -> None:
    got: list[tuple[str, str]] = []
    done = threading.Event()

    def listener(result: object, record: Record) -> None:
        got.append((result.feedback_name, record.record_id))  # type: ignore[attr-defined]
        if len(got) == 2:
            done.set()

    session.add_listener(listener)
    fbs = [Feedback(lambda output: 1.0, name="a").on_output(),
           Feedback(lambda output: 0.0, name="b").on_output()]
    record = session.ingest(make_record(), fbs)
    assert done.wait(10)
    assert sorted(got) == [("a", record.record_id), ("b", record.record_id)]


def test_a_raising_callback_is_logged_and_others_still_run(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    fb = Feedback(lambda output: 1.0, name="a").on_output()
    record = session.ingest(make_record(), [fb])
    fired = threading.Event()

    def bad(results: object) -> None:
        raise RuntimeError("callback bug")

    record.wait_for_feedback_results(callback=bad)
    record.wait_for_feedback_results(callback=lambda results: fired.set())
    assert fired.wait(10)
    assert "callback bug" in caplog.text


def test_a_slow_callback_is_named_once_in_a_warning(
        session: Session, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Callbacks run one after another on one thread: a slow one (an HTTP post) held every
    other callback and feedback event up, and nothing said which or why."""
    from scrutiny.core import _runtime

    monkeypatch.setattr(_runtime, "SLOW_CALLBACK", 0.05)
    fb = Feedback(lambda output: 1.0, name="a").on_output()
    records = [session.ingest(make_record(i), [fb]) for i in range(3)]
    never = threading.Event()
    fired = threading.Event()

    def post_to_slack(results: object) -> None:
        never.wait(0.1)  # (the callback's own slow work)

    for record in records:
        record.wait_for_feedback_results(callback=post_to_slack)
    records[-1].wait_for_feedback_results(callback=lambda results: fired.set())
    assert fired.wait(10)  # (in order: every slow one has run)
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "post_to_slack" in slow[0]
    assert "Keep callbacks short" in slow[0]


async def forever(output: str) -> float:
    """A feedback that does not finish while a test runs."""
    await asyncio.sleep(30)
    return 1.0


def test_close_is_bounded_and_leaves_unfinished_work_pending(db_url: str) -> None:
    release = threading.Event()
    s = Session(db_url)
    fb = Feedback(forever, timeout=60).on_output()
    record = s.ingest(make_record(), [fb])
    assert s.flush(10)
    start = time.monotonic()
    clean = s.close(timeout=0.5)
    assert time.monotonic() - start < 5
    assert clean is False
    release.set()
    with Session(db_url) as reader:
        df, _ = reader.get_records_and_feedback()
    assert df.loc[0, "record_id"] == record.record_id
    assert df.loc[0, "forever status"] == "pending"


def test_waits_on_what_close_left_pending_return_with_it_pending(db_url: str) -> None:
    """Nothing in this process finishes them after close(): a wait without a timeout, a
    callback and the session's own wait used to block (or never fire) for ever."""
    s = Session(db_url)
    fb = Feedback(forever, timeout=60).on_output()
    record = s.ingest(make_record(), [fb])
    called: list[dict[Feedback, FeedbackResult]] = []
    fired = threading.Event()
    record.wait_for_feedback_results(callback=lambda results: (called.append(results),
                                                               fired.set()))
    assert s.flush(10)
    assert s.close(timeout=0.2) is False
    waited: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: waited.update(
        record=record.wait_for_feedback_results(), session=s.wait_for_feedback()))
    waiter.start()
    waiter.join(20)
    assert not waiter.is_alive(), "a wait on a closed session's unfinished result hangs"
    assert waited["record"][fb].status is FeedbackStatus.PENDING  # type: ignore[index]
    assert waited["session"] is False  # close left work unfinished: not "all done"
    assert fired.wait(10)
    assert [r[fb].status for r in called] == [FeedbackStatus.PENDING]
    assert s.stats()["unfinished_feedback"] == 0


def test_close_is_idempotent_and_finishes_quick_work(db_url: str) -> None:
    s = Session(db_url)
    fb = Feedback(lambda output: 1.0, name="quick").on_output()
    s.ingest(make_record(), [fb])
    assert s.close(timeout=10) is True
    assert s.close() is True
    with Session(db_url) as reader:
        df, _ = reader.get_records_and_feedback()
    assert df.loc[0, "quick status"] == "done"


def test_many_records_and_leaderboard_respects_direction(session: Session) -> None:
    good = Feedback(lambda output: 1.0 if output.endswith("v2") else 0.5,
                    name="quality").on_output()
    harm = Feedback(lambda output: 0.1 if output.endswith("v2") else 0.2, name="harm",
                    higher_is_better=False).on_output()
    for version in ("v1", "v2"):
        for i in range(5):
            session.ingest(make_record(i, app_version=version, output=f"out {version}"),
                           [good, harm])
    assert session.wait_for_feedback(20)
    board = session.get_leaderboard()
    assert list(board.index) == [("app", "v2"), ("app", "v1")]
    assert board.loc[("app", "v2"), "quality"] == pytest.approx(1.0)
    assert board.loc[("app", "v1"), "harm"] == pytest.approx(0.2)
    assert board.loc[("app", "v1"), "records"] == 5
    assert board.loc[("app", "v1"), "failed"] == 0
    assert board.attrs["higher_is_better"] == {"harm": False, "quality": True}


def test_leaderboard_counts_pending_and_failed(session: Session) -> None:
    gate, gated = _gate()
    bad = Feedback(lambda output: "x", name="bad").on_output()
    session.ingest(make_record(), [gated, bad])
    try:
        bad_done = threading.Event()
        session.add_listener(lambda r, rec: bad_done.set() if r.feedback_name == "bad" else None)
        assert bad_done.wait(10)
        board = session.get_leaderboard()
        row = board.loc[("app", "v1")]
        assert row["failed"] == 1
        assert row["pending"] + row["running"] == 1
    finally:
        gate.set()


def test_filter_by_app_name_or_id(session: Session) -> None:
    session.ingest(make_record(app_name="one"), [])
    session.ingest(make_record(app_name="two"), [])
    df, _ = session.get_records_and_feedback(app_ids=["one"])
    assert list(df["app_name"]) == ["one"]
    df, _ = session.get_records_and_feedback(app_ids=["two:v1"])
    assert list(df["app_name"]) == ["two"]


def test_a_table_of_two_apps_says_which_feedbacks_an_app_never_had(session: Session) -> None:
    """Score NaN with a status beside it, always: `n/a` where the app has no such
    feedback, so that a blank never reads like a lost result."""
    fa = Feedback(lambda output: 0.5, name="only_a").on_output()
    fb = Feedback(lambda output: 0.7, name="only_b").on_output()
    session.ingest(make_record(app_name="a"), [fa])
    session.ingest(make_record(app_name="b"), [fb])
    df, cols = session.get_records_and_feedback(wait=True, timeout=10)
    assert cols == ["only_a", "only_b"]
    by_app = df.set_index("app_name")
    assert by_app.loc["a", "only_a status"] == "done"
    assert by_app.loc["a", "only_b status"] == "n/a"
    assert by_app.loc["b", "only_a status"] == "n/a"
    assert by_app.loc["b", "only_b"] == 0.7
    assert not df[[c + " status" for c in cols]].isna().any().any()


def test_get_record_reads_back_spans_and_results(session: Session) -> None:
    from scrutiny import Span

    spans = [Span("r", None, "root", "chain", 1.0, 2.0, inputs={"q": 1}, outputs="o")]
    fb = Feedback(lambda output: 0.5, name="half").on_output()
    record = session.ingest(make_record(spans=spans), [fb])
    record.wait_for_feedback_results(timeout=10)
    back = session.get_record(record.record_id)
    assert back is not None
    assert back.spans[0].inputs == {"q": 1}
    assert back.start_datetime.tzinfo is not None
    results = back.wait_for_feedback_results(timeout=1)
    assert [(r.feedback_name, r.result) for r in results.values()] == [("half", 0.5)]
    assert session.get_record("missing") is None


def test_invalid_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="max_concurrency"):
        Session(f"sqlite:///{tmp_path}/x.sqlite", max_concurrency=0)
    with pytest.raises(ConfigurationError, match="unknown feedback mode"):
        Session(f"sqlite:///{tmp_path}/x.sqlite", feedback_mode="sometimes")
    with pytest.raises(ConfigurationError, match="not a database URL"):
        Session("this is not a url")
    with pytest.raises(ConfigurationError, match="does not exist"):
        Session(f"sqlite:///{tmp_path}/missing/dir/x.sqlite")
    with pytest.raises(ConfigurationError, match="postgres"):
        Session("postgresql+nosuchdriver://u@localhost/db")
    with pytest.raises(ConfigurationError, match=r"the SQLite driver of .* is not available"):
        Session(f"sqlite+pysqlit:///{tmp_path}/typo.sqlite")
    with pytest.raises(ConfigurationError, match=r"max_concurrency must be a whole number, "
                                                 r"got '8' \(str\)"):
        Session(f"sqlite:///{tmp_path}/x.sqlite", max_concurrency="8")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="flush_timeout must be a finite number of "):
        Session(f"sqlite:///{tmp_path}/x.sqlite", flush_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"'mysql' databases are not supported: "
                                                 r"Scrutiny stores into SQLite"):
        Session("mysql://u@localhost/db")
    for name in ("lease_seconds", "flush_timeout", "feedback_timeout"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigurationError, match=f"{name} must be a finite number"):
                Session(f"sqlite:///{tmp_path}/x.sqlite", **{name: bad})
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as s:
        with pytest.raises(ConfigurationError, match="poll_interval must be > 0"):
            s.start_worker(poll_interval=-1)
        with pytest.raises(ConfigurationError, match="limit must be >= 1"):
            s.get_records_and_feedback(limit=-1)
        with pytest.raises(ConfigurationError, match=r"offset 0\.\."):
            s.get_records_and_feedback(offset=-5)


def test_default_database_is_a_file_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCRUTINY_DATABASE_URL", raising=False)
    with Session() as s:
        s.ingest(make_record(), [])
        assert s.flush(10)
    assert (tmp_path / "scrutiny.sqlite").exists()


def test_environment_variable_sets_the_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCRUTINY_DATABASE_URL", f"sqlite:///{tmp_path}/env.sqlite")
    with Session() as s:
        assert s.database_url.endswith("env.sqlite")


def test_a_second_session_on_another_database_is_not_mixed_up(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/a.sqlite") as a, \
            Session(f"sqlite:///{tmp_path}/b.sqlite") as b:
        a.ingest(make_record(1), [])
        b.ingest(make_record(2), [])
        b.ingest(make_record(3), [])
        assert len(a.get_records_and_feedback()[0]) == 1
        assert len(b.get_records_and_feedback()[0]) == 2
        assert Session.current() is b


def test_memory_store_session() -> None:
    with Session("memory://") as s:
        fb = Feedback(lambda output: 1.0, name="x").on_output()
        s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)
        df, _ = s.get_records_and_feedback()
        assert df.loc[0, "x status"] == "done"


def test_concurrency_limit_is_respected(db_url: str) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    async def judge(output: str) -> float:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        await asyncio.sleep(0.02)
        with lock:
            running -= 1
        return 1.0

    with Session(db_url, max_concurrency=3) as s:
        fb = Feedback(judge).on_output()
        for i in range(20):
            s.ingest(make_record(i), [fb])
        assert s.wait_for_feedback(20)
    assert peak == 3


def test_sync_and_async_feedbacks_run_concurrently(db_url: str) -> None:
    def slow(output: str) -> float:
        time.sleep(0.2)
        return 1.0

    with Session(db_url, max_concurrency=16) as s:
        fb = Feedback(slow).on_output()
        start = time.monotonic()
        for i in range(16):
            s.ingest(make_record(i), [fb])
        assert s.wait_for_feedback(20)
        elapsed = time.monotonic() - start
    assert elapsed < 16 * 0.2 / 2  # far from sequential (3.2 s)


class _GatedStore:
    """A memory store whose writes wait for a gate: the database is 'slow or down'."""

    def __init__(self) -> None:
        from scrutiny.core.storage import MemoryStore

        self.inner = MemoryStore()
        self.url = "memory://gated"
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write(self, ops: object) -> None:
        self.entered.set()
        assert self.gate.wait(30)
        self.inner.write(ops)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_slow_storage_never_blocks_the_app_and_counts_what_it_drops() -> None:
    store = _GatedStore()
    store.gate.set()
    s = Session(store=store, max_queue_size=5)  # type: ignore[arg-type]
    fb = Feedback(lambda output: 1.0, name="x").on_output()
    # Stored before the database turns slow. (Made during the slowness, whether its result
    # got into the writer's stuck batch or came after the queue had filled was a race.)
    first = s.ingest(make_record(0), [fb])
    assert first.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE
    store.gate.clear()
    store.entered.clear()
    try:
        s.ingest(make_record(1), [])
        assert store.entered.wait(10)  # the writer is now stuck in the database
        start = time.perf_counter()
        records = [s.ingest(make_record(i), [fb]) for i in range(2, 22)]
        assert time.perf_counter() - start < 1.0  # the app's thread never waited
        assert s.stats()["dropped_writes"] >= 15
        lost = []
        for record in records:
            result = record.wait_for_feedback_results(timeout=5)[fb]
            if "the record could not be stored" in (result.error or ""):
                assert result.status is FeedbackStatus.FAILED
                lost.append(record.input)
        # The queue holds five items: the last fifteen records at least were not stored
        # (more if an evaluation's update took a place first).
        assert lost[-15:] == [f"question {i}" for i in range(7, 22)]
    finally:
        store.gate.set()
    # Dropped end states stay pending in the database: the wait says it was not clean.
    assert s.wait_for_feedback(10) is False
    df, _ = s.get_records_and_feedback()
    assert len(df) == 2 + len(records) - len(lost)  # nothing that was queued is lost
    assert df.loc[df["input"] == "question 0", "x status"].tolist() == ["done"]
    s.close()


class _BrokenStore:
    url = "memory://broken"

    def write(self, ops: object) -> None:
        from sqlalchemy.exc import OperationalError

        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    def close(self) -> None:
        return None


def test_storage_errors_are_counted_and_results_fail_with_a_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    s = Session(store=_BrokenStore())  # type: ignore[arg-type]
    fb = Feedback(lambda output: 1.0, name="x").on_output()
    record = s.ingest(make_record(), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "could not be stored" in (result.error or "")
    assert s.stats()["failed_writes"] == 1
    assert "disk I/O error" in caplog.text
    assert s.close(timeout=1) is False  # the record was lost: not a clean close


class _RefusesEndStates:
    """A memory store that stores records and pending rows but refuses end states."""

    def __init__(self) -> None:
        from scrutiny.core.storage import MemoryStore

        self.inner = MemoryStore()
        self.url = "memory://refuses-end-states"

    def write(self, ops: list[object]) -> None:
        from scrutiny.core.storage import UpdateResult

        if any(isinstance(op, UpdateResult) and op.values.get("status") in
               ("done", "failed", "skipped") for op in ops):
            raise ValueError("the database refused the row")
        self.inner.write(ops)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class _OutageStore:
    """A memory store behind a database that can go away: while `down`, every write fails
    and so does the ping."""

    def __init__(self) -> None:
        from scrutiny.core.storage import MemoryStore

        self.inner = MemoryStore()
        self.url = "memory://outage"
        self.down = False
        self.refused = threading.Event()
        self.refusals = 0
        self.outlasted_quick_retries = threading.Event()

    def write(self, ops: object) -> None:
        from sqlalchemy.exc import OperationalError

        if self.down:
            self.refusals += 1
            self.refused.set()
            if self.refusals == 12:  # more than one batch's five quick retries, and more
                self.outlasted_quick_retries.set()
            raise OperationalError("INSERT", {}, Exception("connection refused"))
        self.inner.write(ops)  # type: ignore[arg-type]

    def ping(self) -> bool:
        return not self.down

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_records_made_while_the_database_is_unreachable_are_stored_once_it_is_back() -> None:
    """A few seconds of outage lost every record made during it (each batch was given up
    after five quick retries): they are held, bounded by the queue, until it answers."""
    store = _OutageStore()
    s = Session(store=store)  # type: ignore[arg-type]
    fb = Feedback(lambda output: 0.5, name="x").on_output()
    try:
        s.ingest(make_record(0), [fb]).wait_for_feedback_results(timeout=10)
        store.down = True
        records = [s.ingest(make_record(i), [fb]) for i in range(1, 6)]
        assert store.outlasted_quick_retries.wait(20)
        assert records[0].feedback_results[fb].status is not \
            FeedbackStatus.FAILED  # held, not given up
        store.down = False
        for record in records:
            assert record.wait_for_feedback_results(timeout=30)[fb].status is \
                FeedbackStatus.DONE
        df, _ = s.get_records_and_feedback()
        assert len(df) == 6
        assert (df["x status"] == "done").all()
        assert s.stats()["failed_writes"] == 0
    finally:
        s.close(timeout=5)


def test_closing_while_the_database_is_unreachable_is_bounded_and_counts_the_loss() -> None:
    store = _OutageStore()
    s = Session(store=store, flush_timeout=0.5)  # type: ignore[arg-type]
    fb = Feedback(lambda output: 0.5, name="x").on_output()
    s.ingest(make_record(0), [fb]).wait_for_feedback_results(timeout=10)
    store.down = True
    record = s.ingest(make_record(1), [fb])
    assert store.refused.wait(10)
    started = time.monotonic()
    s.close(timeout=0.5)
    assert time.monotonic() - started < 5
    assert s.stats()["failed_writes"] >= 1
    assert record.wait_for_feedback_results(timeout=5)[fb].status is FeedbackStatus.FAILED


def test_an_end_state_that_could_not_be_stored_is_not_reported_as_stored() -> None:
    """Waiters were told `done` although the database kept the row pending (the writer's
    verdict was ignored): every returned end state must be a stored one."""
    s = Session(store=_RefusesEndStates())  # type: ignore[arg-type]
    fb = Feedback(lambda output: 0.7, name="x").on_output()
    try:
        result = s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=30)[fb]
        df, _ = s.get_records_and_feedback()
    finally:
        s.close(timeout=1)
    assert result.status is FeedbackStatus.FAILED
    assert result.result is None
    assert "evaluated (done with score 0.7) but storing the result failed" in (
        result.error or "")
    assert list(df["x status"]) == ["pending"]  # what the database holds, for a worker


def test_undecodable_text_in_errors_and_names_is_stored_not_lost(db_url: str) -> None:
    """A lone surrogate (an undecodable file name read with surrogateescape) cannot be
    encoded as UTF-8: the database refused the whole row and the record or result was
    lost. It is stored as a backslash escape."""
    name = "file-\udcff.txt"

    def missing(output: str) -> float:
        raise FileNotFoundError(f"no such file: {name}")

    fb = Feedback(missing, name="reads_a_file").on_output()
    explained = Feedback(lambda output: (0.5, f"looked at {name}"), name="ex").on_output()
    with Session(db_url) as s:
        record = s.ingest(make_record(error=f"app failed on {name}", app_version=name),
                          [fb, explained])
        live = record.wait_for_feedback_results(timeout=10)
    with Session(db_url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert back.error == "app failed on file-\\udcff.txt"
    assert back.app_version == "file-\\udcff.txt"
    stored = {r.feedback_name: r for r in back.feedback_results.values()}
    assert stored["reads_a_file"].status is FeedbackStatus.FAILED
    assert stored["reads_a_file"].error == "FileNotFoundError: no such file: file-\\udcff.txt"
    assert stored["ex"].explanation == "looked at file-\\udcff.txt"
    assert live[explained].status is FeedbackStatus.DONE


def test_feedback_that_uses_its_own_thread_pool_does_not_deadlock(db_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def fan(output: str) -> float:
        with ThreadPoolExecutor(2) as pool:
            return sum(pool.map(len, [output, output])) / 100

    with Session(db_url, max_concurrency=1, thread_pool_size=1) as s:
        fb = Feedback(fan).on_output()
        records = [s.ingest(make_record(i), [fb]) for i in range(5)]
        assert s.wait_for_feedback(20)
        assert all(r.feedback_results[fb].status is FeedbackStatus.DONE for r in records)


def test_rate_limit_holds_its_rate(db_url: str) -> None:
    from scrutiny import RateLimit

    starts: list[float] = []

    async def judge(output: str) -> float:
        starts.append(time.monotonic())
        return 1.0

    # 240 per minute: one call every 0.25 s, never a burst
    fb = Feedback(judge, rate_limit=RateLimit(per_minute=240, max_concurrent=1)).on_output()
    with Session(db_url) as s:
        for i in range(6):
            s.ingest(make_record(i), [fb])
        assert s.wait_for_feedback(30)
    assert len(starts) == 6
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.2, gaps  # spaced out, not all at once


def test_a_timeout_error_raised_by_the_function_is_not_called_our_timeout(
        session: Session) -> None:
    async def network(output: str) -> float:
        raise TimeoutError("upstream read timed out")

    fb = Feedback(network, timeout=30).on_output()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert result.error == "TimeoutError: upstream read timed out"


def test_a_retry_after_longer_than_max_retry_after_fails_at_once(session: Session) -> None:
    class RateLimited(Exception):
        retry_after = 3600

    calls: list[int] = []

    def limited(output: str) -> float:
        calls.append(1)
        raise RateLimited("429 slow down")

    fb = Feedback(limited, retry=RetryPolicy(attempts=5, max_retry_after=600)).on_output()
    start = time.monotonic()
    result = session.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
    assert time.monotonic() - start < 5
    assert len(calls) == 1
    assert result.status is FeedbackStatus.FAILED
    assert "asked to wait 3600 s before retrying, longer than max_retry_after=600 s" in (
        result.error or "")


def test_concurrency_limit_holds_for_sync_and_async_together(db_url: str) -> None:
    """Plain and async feedbacks share one limit, however the slots are handed on."""
    running = 0
    peak = 0
    lock = threading.Lock()

    def enter() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)

    def leave() -> None:
        nonlocal running
        with lock:
            running -= 1

    def plain(output: str) -> float:
        enter()
        time.sleep(0.02)
        leave()
        return 1.0

    async def awaiting(output: str) -> float:
        enter()
        await asyncio.sleep(0.02)
        leave()
        return 1.0

    fbs = [Feedback(plain, name="plain").on_output(),
           Feedback(awaiting, name="awaiting").on_output()]
    with Session(db_url, max_concurrency=4) as s:
        records = [s.ingest(make_record(i), fbs) for i in range(15)]
        assert s.wait_for_feedback(30)
        statuses = {r.status for rec in records
                    for r in rec.wait_for_feedback_results(timeout=5).values()}
    assert statuses == {FeedbackStatus.DONE}
    assert peak == 4


def test_a_sync_timeout_counts_from_its_start_not_its_wait_for_a_slot(db_url: str) -> None:
    def long(output: str) -> float:
        time.sleep(0.4)
        return 1.0

    def short(output: str) -> float:
        time.sleep(0.02)
        return 1.0

    f_long = Feedback(long, name="long", timeout=5).on_output()
    f_short = Feedback(short, name="short", timeout=0.2).on_output()
    with Session(db_url, max_concurrency=1) as s:
        record = s.ingest(make_record(), [f_long, f_short])
        results = record.wait_for_feedback_results(timeout=20)
    first, second = sorted(results.values(), key=lambda r: r.started_at)  # type: ignore[arg-type, return-value]
    # one slot: the second waited about 0.4 s for it, twice its own timeout, and is done
    assert {first.status, second.status} == {FeedbackStatus.DONE}
    assert second.started_at is not None
    assert first.ended_at is not None
    assert second.started_at >= first.ended_at - dt.timedelta(milliseconds=50)


def test_a_timed_out_sync_call_gives_its_slot_back(db_url: str) -> None:
    release = threading.Event()

    def stuck(output: str) -> float:
        release.wait(10)
        return 1.0

    async def quick(output: str) -> float:
        return 1.0

    f_stuck = Feedback(stuck, name="stuck", timeout=0.2).on_output()
    f_quick = Feedback(quick, name="quick").on_output()
    try:
        with Session(db_url, max_concurrency=1) as s:
            record = s.ingest(make_record(), [f_stuck, f_quick])
            results = record.wait_for_feedback_results(timeout=10)
    finally:
        release.set()
    assert results[f_stuck].status is FeedbackStatus.FAILED
    assert "timed out" in (results[f_stuck].error or "")
    assert results[f_quick].status is FeedbackStatus.DONE  # the stuck thread's slot moved on


def test_evaluations_leave_no_reference_cycles_behind(db_url: str) -> None:
    """Records, jobs and results are freed by reference counting when their evaluation
    ends, not kept for the garbage collector (a cycle per evaluation once kept each
    record alive until a full collection: memory and long GC pauses in the app)."""
    import gc

    def plain(output: str) -> float:
        return 1.0

    async def awaiting(output: str) -> float:
        return 1.0

    fbs = [Feedback(plain, name="plain", timeout=5).on_output(),
           Feedback(awaiting, name="awaiting", timeout=5).on_output()]
    with Session(db_url) as s:
        s.ingest(make_record(), fbs).wait_for_feedback_results(timeout=10)  # warm up
        gc.collect()
        gc.disable()
        try:
            for i in range(50):
                s.ingest(make_record(i), fbs)
            assert s.wait_for_feedback(20)
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 50 * 3, f"{garbage} objects in reference cycles after 50 records"


def test_network_io_in_a_feedback_is_served_while_the_loop_is_busy(db_url: str) -> None:
    """The evaluation loop skips zero-timeout polls for a millisecond when it is busy;
    I/O must still be seen while other evaluations keep it busy."""
    stop = threading.Event()

    async def busy(output: str) -> float:
        while not stop.is_set():  # always ready: the loop never waits for I/O
            await asyncio.sleep(0)
        return 1.0

    async def echo(output: str) -> float:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for _ in range(20):  # 20 round trips through the selector
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"ping\n")
                assert await reader.readline() == b"ping\n"
                writer.close()
        finally:
            server.close()
            stop.set()
        return 1.0

    f_busy = Feedback(busy, name="busy", timeout=30).on_output()
    f_busy2 = Feedback(busy, name="busy2", timeout=30).on_output()
    f_echo = Feedback(echo, name="echo", timeout=30).on_output()
    with Session(db_url) as s:
        record = s.ingest(make_record(), [f_busy, f_busy2, f_echo])
        results = record.wait_for_feedback_results(timeout=30)
    stop.set()
    assert {r.status for r in results.values()} == {FeedbackStatus.DONE}


def test_records_arriving_as_the_writer_goes_idle_are_stored(db_url: str) -> None:
    """The writer polls while work keeps coming and sleeps after IDLE_AFTER without any;
    a record queued right at that moment must not wait for a wake-up that never comes."""
    from scrutiny.core._writer import IDLE_AFTER

    async def quick(output: str) -> float:
        return 1.0

    fb = Feedback(quick).on_output()
    with Session(db_url) as s:
        for i in range(12):
            # gaps around IDLE_AFTER, so some records arrive as the writer decides to sleep
            time.sleep(IDLE_AFTER * (0.9 + 0.02 * i))
            record = s.ingest(make_record(i), [fb])
            # waits on the result's future (stored by the writer), never wakes the writer
            result = record.wait_for_feedback_results(timeout=5)[fb]
            assert result.status is FeedbackStatus.DONE, f"record {i} was not stored"


def test_a_lazy_record_is_built_once_whoever_asks_first() -> None:
    """Integrations hand the session a LazyRecord at the end of a root run: the writer
    thread builds it when it stores it, or the user's thread when it looks first."""
    from scrutiny.core import LazyRecord

    calls: list[str] = []
    gate = threading.Event()

    def build(record_id: str) -> Record:
        calls.append(record_id)
        assert gate.wait(5)
        return make_record(record_id=record_id)

    lazy = LazyRecord(build)
    hooked: list[Record] = []
    lazy.on_build(hooked.append)
    got: list[Record] = []
    threads = [threading.Thread(target=lambda: got.append(lazy.get())) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1
    assert len(got) == 8
    assert all(r is got[0] for r in got)
    assert got[0].record_id == lazy.record_id == calls[0]
    assert hooked == [got[0]]
    late: list[Record] = []
    lazy.on_build(late.append)  # after the build: called at once
    assert late == [got[0]]


def test_a_sync_call_that_never_gets_a_thread_ends_with_the_reason(db_url: str) -> None:
    """Every pool thread stuck in a call that never returns (the pool replaces a stuck
    thread, once per thread of its size: here the second stuck call takes the last one):
    later sync calls hold a slot but get no thread, and must still end (failed, saying
    why) rather than wait forever."""
    release = threading.Event()

    def stuck(output: str) -> float:
        release.wait(10)
        return 1.0

    def later(output: str) -> float:
        return 1.0

    async def quick(output: str) -> float:
        return 1.0

    f_stuck = Feedback(stuck, name="stuck", timeout=0.2).on_output()
    f_later = Feedback(later, name="later", timeout=0.3).on_output()
    f_quick = Feedback(quick, name="quick").on_output()
    try:
        with Session(db_url, max_concurrency=4, thread_pool_size=1) as s:
            first = s.ingest(make_record(0), [f_stuck]).wait_for_feedback_results(timeout=10)
            second = s.ingest(make_record(2), [f_stuck]).wait_for_feedback_results(timeout=10)
            results = s.ingest(make_record(1), [f_later, f_quick]).wait_for_feedback_results(
                timeout=10)
    finally:
        release.set()
    assert first[f_stuck].status is FeedbackStatus.FAILED
    assert second[f_stuck].status is FeedbackStatus.FAILED
    assert results[f_later].status is FeedbackStatus.FAILED
    assert "waiting for a thread" in (results[f_later].error or "")
    assert results[f_quick].status is FeedbackStatus.DONE


def test_the_concurrency_slots_all_come_back_after_timeouts_failures_and_retries(
        db_url: str) -> None:
    """Slots are handed between the loop and the pool threads; whatever the mix of end
    states, every one of them is free again once the work is done."""
    release = threading.Event()
    seen: set[str] = set()

    def stuck(output: str) -> float:
        release.wait(10)
        return 1.0

    def flaky(output: str) -> float:  # fails the first attempt of each record
        if output not in seen:
            seen.add(output)
            raise ConnectionError("transient")
        return 1.0

    async def boom(output: str) -> float:
        raise ValueError("no")

    async def fine(output: str) -> float:
        await asyncio.sleep(0.001)
        return 1.0

    fbs = [Feedback(stuck, name="stuck", timeout=0.05).on_output(),
           Feedback(flaky, name="flaky", retry=RetryPolicy(
               attempts=3, initial_backoff=0.001, retry_on=(ConnectionError,))).on_output(),
           Feedback(boom, name="boom").on_output(),
           Feedback(fine, name="fine").on_output()]
    limit = 3
    with Session(db_url, max_concurrency=limit, thread_pool_size=8) as s:
        records = [s.ingest(make_record(i), fbs) for i in range(6)]
        assert s.wait_for_feedback(20), "a slot was lost: evaluations wait for it forever"
        outcome = [r.wait_for_feedback_results(timeout=1) for r in records]
        release.set()
        gate = s._evaluation_loop()._evaluator._gate  # type: ignore[union-attr]
        done = threading.Event()
        free: list[int] = []

        def look() -> None:  # on the loop, where the gate is handed out
            free.append(gate._free)
            free.append(len(gate._waiters))
            done.set()

        s._evaluation_loop()._loop.call_soon_threadsafe(look)
        assert done.wait(5)
    by_name = {fb.name: {o[fb].status for o in outcome} for fb in fbs}
    assert by_name == {"stuck": {FeedbackStatus.FAILED}, "flaky": {FeedbackStatus.DONE},
                       "boom": {FeedbackStatus.FAILED}, "fine": {FeedbackStatus.DONE}}
    assert free == [limit, 0]


def test_evaluation_starts_without_waiting_for_the_writer() -> None:
    """The evaluation loop starts a record's evaluations as soon as it sees the record, not
    when the writer gets to it (under a busy app every commit waits for the GIL several
    times); the result is still stored after its record and announced only then."""
    store = _GatedStore()
    s = Session(store=store)  # type: ignore[arg-type]
    seen: dict[str, threading.Event] = {"answer 0": threading.Event(),
                                        "answer 1": threading.Event()}

    async def probe(output: str) -> float:
        seen[output].set()
        return 1.0

    fb = Feedback(probe, name="probe").on_output()
    try:
        s.ingest(make_record(0), [fb])
        assert store.entered.wait(10)  # the writer is stuck storing the first record
        second = s.ingest(make_record(1), [fb])  # queued behind it
        assert seen["answer 1"].wait(10), "the second record waited for the writer"
        # evaluated, but not stored yet: still pending, its future unresolved
        assert second.feedback_results[fb].status is FeedbackStatus.PENDING
        assert not second.feedback_futures()[fb].done()
    finally:
        store.gate.set()
    assert second.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE
    assert s.wait_for_feedback(10)
    _, results = store.records_and_results()
    assert sorted(r["status"] for r in results) == ["done", "done"]
    s.close()


def test_the_loop_takes_records_handed_over_while_it_goes_idle(db_url: str) -> None:
    """The loop looks for handed-over records by itself while they keep coming and is woken
    once it stops looking; a record handed over right as it stops must still start."""
    from scrutiny.core._dispatch import ARRIVALS_IDLE_AFTER

    started: list[str] = []

    async def probe(output: str) -> float:
        started.append(output)
        return 1.0

    fb = Feedback(probe, name="probe").on_output()
    with Session(db_url) as s:
        s.ingest(make_record(-1), [fb]).wait_for_feedback_results(timeout=10)
        loop = s._evaluation_loop()
        for i in range(10):
            time.sleep(ARRIVALS_IDLE_AFTER * (0.9 + 0.03 * i))  # around the moment it stops
            record = s.ingest(make_record(i), [fb])
            result = record.wait_for_feedback_results(timeout=10)[fb]
            assert result.status is FeedbackStatus.DONE, f"record {i} was not evaluated"
        assert not loop._arrivals
    assert started.count("answer 9") == 1  # started once, by the loop or the writer


def test_an_idle_session_keeps_no_finished_record_alive(db_url: str) -> None:
    """Once a record's results are stored and the app lets go of it, nothing of ours
    holds it (the writer used to keep its last batch until the next one)."""
    import gc
    import weakref

    async def quick(output: str) -> float:
        return 1.0

    fb = Feedback(quick, name="quick").on_output()
    with Session(db_url) as s:
        record = s.ingest(make_record(), [fb])
        assert record.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE
        assert s.flush(10)
        ref = weakref.ref(record)
        del record
        gc.collect()
        assert ref() is None


class _FlakyStore:
    """A memory store whose every write fails twice (a locked database), then succeeds."""

    def __init__(self) -> None:
        from scrutiny.core.storage import MemoryStore

        self.inner = MemoryStore()
        self.url = "memory://flaky"
        self.failures = 0

    def write(self, ops: object) -> None:
        from sqlalchemy.exc import OperationalError

        if self.failures % 3 < 2:
            self.failures += 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        self.failures += 1
        self.inner.write(ops)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_every_write_retries_a_locked_database_afresh() -> None:
    """One retry policy serves every commit: each commit gets its full budget of attempts,
    whatever the commits before it used."""
    store = _FlakyStore()
    fb = Feedback(lambda output: 1.0, name="x").on_output()
    s = Session(store=store)  # type: ignore[arg-type]
    try:
        for i in range(3):  # one at a time: each record is its own commit
            record = s.ingest(make_record(i), [fb])
            assert record.wait_for_feedback_results(timeout=30)[fb].status is \
                FeedbackStatus.DONE
            assert s.flush(30)
        assert s.stats()["failed_writes"] == 0
        assert len(store.inner.records_and_results()[0]) == 3
    finally:
        s.close(timeout=1)


def test_a_burst_of_records_starts_evaluating_before_the_loop_has_taken_them_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records handed over faster than the loop takes them are taken a few per pass, and
    the evaluations of the first ones run in between: taking a whole burst at once made
    every evaluation wait until the jobs of all of them were made (500 records handed
    over during one GC pause or switch interval: tens of milliseconds)."""
    from scrutiny.core import _session

    log: list[tuple[str, str]] = []
    all_ran = threading.Event()
    burst = 20

    async def probe(output: str) -> float:
        log.append(("eval", output))
        if sum(kind == "eval" for kind, _ in log) == burst + 1:
            all_ran.set()
        return 1.0

    real_start = _session._Ingest.start

    def start(self: _session._Ingest) -> list[object]:
        if threading.current_thread() is loop.thread:
            log.append(("start", self.record.output))
        return real_start(self)  # type: ignore[return-value]

    monkeypatch.setattr(_session._Ingest, "start", start)
    store = _GatedStore()
    s = Session(store=store)  # type: ignore[arg-type]
    fb = Feedback(probe, name="probe").on_output()
    loop = s._evaluation_loop()
    try:
        s.ingest(make_record(0), [fb])
        assert store.entered.wait(10)  # the writer is stuck: only the loop starts records
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(10)

        loop._loop.call_soon_threadsafe(hold)
        assert held.wait(10)
        for i in range(1, burst + 1):  # handed over while the loop is busy
            s.ingest(make_record(i), [fb])
        release.set()
        assert all_ran.wait(10)
    finally:
        store.gate.set()
        s.close()
    burst_log = log[log.index(("start", "answer 1")):]
    first_eval = burst_log.index(("eval", "answer 1"))
    last_start = burst_log.index(("start", f"answer {burst}"))
    assert first_eval < last_start, burst_log


def test_a_chain_of_sync_calls_wakes_the_loop_only_at_its_end(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool thread runs the sync calls its slot is handed, one after another; waking the
    loop for each start and result (a write to its self-pipe) gave up the GIL between two
    calls, and under a busy app getting it back took up to a switch interval. The loop
    collects those results by itself meanwhile: stored while the chain still runs."""
    from scrutiny.core import _slots

    calls = 6
    pushed = 0
    all_queued, stored_before_last = threading.Event(), threading.Event()
    real_start_sync = _slots.SlotGate.start_sync

    def start_sync(self: _slots.SlotGate, call: _slots.SyncCall) -> None:
        nonlocal pushed
        real_start_sync(self, call)
        pushed += 1
        if pushed == calls:
            all_queued.set()

    monkeypatch.setattr(_slots.SlotGate, "start_sync", start_sync)
    ran = itertools.count(1)

    def step(output: str) -> float:
        n = next(ran)
        if n == 1:  # the others queue up behind the single slot, for this thread to run
            assert all_queued.wait(10)
        elif n == calls:  # the first results are stored while the chain still runs
            assert stored_before_last.wait(10)
        else:
            time.sleep(0.005)  # a call's own work: the loop would wake and go idle between
        return 1.0

    s = Session(db_url, max_concurrency=1)
    stored: list[str] = []

    def listener(result: object, record: Record) -> None:
        stored.append(result.feedback_name)  # type: ignore[attr-defined]
        if len(stored) == calls - 1:
            stored_before_last.set()

    s.add_listener(listener)
    loop = s._evaluation_loop()
    wakes_from_pool: list[str] = []
    real_wake = loop._loop.call_soon_threadsafe

    def call_soon_threadsafe(callback: object, *args: object, **kw: object) -> object:
        if "-sync" in threading.current_thread().name:
            wakes_from_pool.append(threading.current_thread().name)
        return real_wake(callback, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(loop._loop, "call_soon_threadsafe", call_soon_threadsafe)
    try:
        fbs = [Feedback(step, name=f"step_{i}").on_output() for i in range(calls)]
        record = s.ingest(make_record(), fbs)
        results = record.wait_for_feedback_results(timeout=20)
    finally:
        s.close()
    assert [r.status for r in results.values()] == [FeedbackStatus.DONE] * calls
    assert stored_before_last.is_set()
    assert len(set(wakes_from_pool)) == 1  # one thread ran the whole chain
    assert len(wakes_from_pool) == 1, wakes_from_pool  # and woke the loop once, at its end


def test_a_fault_in_the_writer_loses_its_batch_not_the_writer(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in the writer's own code (not a database error: those are
    handled) ended its thread: every later record was kept in memory, never stored, and
    only close() said anything. The batch it failed on is reported, the rest goes on."""
    s = Session(db_url)
    writer = s._start()
    prepare = writer._prepare
    faults = [RuntimeError("injected")]

    def faulty(batch: list[Any]) -> Any:
        if faults:
            raise faults.pop()
        return prepare(batch)

    fb = Feedback(lambda output: 1.0, name="one").on_output()
    try:
        writer._prepare = faulty  # type: ignore[method-assign]
        lost = s.ingest(make_record(1), [fb])
        lost_results = lost.wait_for_feedback_results(timeout=10)
        kept = s.ingest(make_record(2), [fb])
        kept_results = kept.wait_for_feedback_results(timeout=10)
        df, _ = s.get_records_and_feedback()
    finally:
        s.close(timeout=5)
    assert not faults
    assert "the storage writer failed on a batch" in caplog.text
    assert lost_results[fb].status is not FeedbackStatus.DONE  # never claimed stored
    assert kept_results[fb].status is FeedbackStatus.DONE
    assert list(df["input"]) == ["question 2"]
    assert list(df["one status"]) == ["done"]


def test_a_cancelled_error_the_feedback_lets_escape_fails_it(session: Session) -> None:
    """A client awaiting something another party cancelled raises CancelledError out of
    the feedback. Taken for a cancellation of the evaluation, the result stayed `running`
    for ever and every wait on it hung."""
    async def judge(output: str) -> float:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        asyncio.get_running_loop().call_later(0.01, inner.cancel)
        await inner
        return 1.0

    fb = Feedback(judge, name="judge").on_output()
    record = session.ingest(make_record(), [fb])
    result = record.wait_for_feedback_results(timeout=10)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "CancelledError (raised by the feedback itself" in (result.error or "")
    assert session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert list(df["judge status"]) == ["failed"]


def test_system_exit_and_keyboard_interrupt_in_feedbacks_fail_only_them(
        session: Session) -> None:
    """sys.exit() in a sync feedback, KeyboardInterrupt raised in an async one: each ended
    the evaluation thread, and every later result stayed pending."""
    def exits(output: str) -> float:
        sys.exit("feedback called sys.exit")

    async def interrupts(output: str) -> float:
        raise KeyboardInterrupt

    ok = Feedback(lambda output: 0.5, name="ok").on_output()
    bad = [Feedback(exits, name="exits").on_output(),
           Feedback(interrupts, name="interrupts").on_output()]
    first = session.ingest(make_record(1), [*bad, ok]).wait_for_feedback_results(timeout=10)
    later = session.ingest(make_record(2), [ok]).wait_for_feedback_results(timeout=10)
    assert first[bad[0]].status is FeedbackStatus.FAILED
    assert first[bad[0]].error == "SystemExit: feedback called sys.exit"
    assert first[bad[1]].status is FeedbackStatus.FAILED
    assert first[bad[1]].error == "KeyboardInterrupt"
    assert first[ok].status is FeedbackStatus.DONE
    assert later[ok].status is FeedbackStatus.DONE


def test_a_callback_calling_sys_exit_leaves_later_callbacks_working(
        session: Session) -> None:
    import logging

    exited = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[0] is SystemExit:
                exited.set()

    seen = Seen()
    logging.getLogger("scrutiny").addHandler(seen)
    try:
        fb = Feedback(lambda output: 1.0, name="one").on_output()
        session.ingest(make_record(1), [fb]).wait_for_feedback_results(
            callback=lambda results: sys.exit(0))
        assert exited.wait(10)  # the exiting callback has run (and was logged) first
        fired = threading.Event()
        session.ingest(make_record(2), [fb]).wait_for_feedback_results(
            callback=lambda results: fired.set())
        assert fired.wait(10)
    finally:
        logging.getLogger("scrutiny").removeHandler(seen)


def test_positional_only_functions_and_builtins_are_called_positionally(
        session: Session) -> None:
    """`def f(text, /)` and builtins such as `len` were called by keyword: a TypeError on
    every record."""
    def words(text: str, /) -> float:
        return float(len(text.split()))

    fbs = [Feedback(words).on_output(), Feedback(len, name="chars").on_output()]
    results = session.ingest(make_record(output="two words"), fbs).wait_for_feedback_results(
        timeout=10)
    assert [(r.status, r.result) for r in results.values()] == [
        (FeedbackStatus.DONE, 2.0), (FeedbackStatus.DONE, 9.0)]


def test_calls_queued_for_a_smaller_pool_are_not_timed_out(db_url: str) -> None:
    """thread_pool_size below max_concurrency: calls granted a slot waited for a thread
    and failed as 'stuck' timeouts although every call returned in time."""
    def takes_a_while(output: str) -> float:
        time.sleep(0.15)  # (the feedback's own work, not a wait on background work)
        return 1.0

    fb = Feedback(takes_a_while, name="slow", timeout=0.5).on_output()
    with Session(db_url, max_concurrency=16, thread_pool_size=2) as s:
        records = [s.ingest(make_record(i), [fb]) for i in range(12)]
        results = [r.wait_for_feedback_results(timeout=30)[fb] for r in records]
    assert [r.error for r in results if r.status is not FeedbackStatus.DONE] == []


def test_waiting_on_a_record_read_back_from_storage_sees_its_results_end(
        db_url: str) -> None:
    """A record from get_record() showed its result pending; waiting on it then blocked
    until the timeout (for ever without one) although the result had been stored."""
    gate, fb = _gate()
    with Session(db_url) as s:
        live = s.ingest(make_record(), [fb])
        stored = s.get_record(live.record_id)
        assert stored is not None
        assert [r.status for r in stored.feedback_results.values()] == [
            FeedbackStatus.PENDING]
        called = threading.Event()
        stored.wait_for_feedback_results(callback=lambda results: called.set())
        gate.set()
        results = stored.wait_for_feedback_results(timeout=10)
        assert [(r.status, r.result) for r in results.values()] == [
            (FeedbackStatus.DONE, 1.0)]
        assert called.wait(10)
        other = Session(db_url)  # a reader in another session (a dashboard, a script)
        try:
            page = other.query_records()
            assert [r.status for r in page.records[0].feedback_results.values()] == [
                FeedbackStatus.DONE]
        finally:
            other.close()


async def test_awaiting_a_stored_records_results_does_not_block_the_loop(
        db_url: str) -> None:
    gate, fb = _gate()
    with Session(db_url) as s:
        live = s.ingest(make_record(), [fb])
        stored = s.get_record(live.record_id)
        assert stored is not None
        waiting = asyncio.ensure_future(stored.await_feedback_results(timeout=10))
        await asyncio.sleep(0)  # (lets the wait begin: the loop must stay free meanwhile)
        assert not waiting.done()
        gate.set()
        results = await waiting
        assert [r.status for r in results.values()] == [FeedbackStatus.DONE]


def test_a_full_backlog_leaves_new_results_pending_in_the_database(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Feedbacks slower than the traffic kept every record and evaluation task in memory:
    RSS grew without limit. Past max_backlog the results of new records are stored
    pending (free for a worker), said so, and nothing else changes."""
    gate = threading.Event()

    def held_back(output: str) -> float:
        assert gate.wait(10)
        return 1.0

    gated = Feedback(held_back, name="first").on_output()
    quick = Feedback(held_back, name="second").on_output()
    s = Session(db_url, max_backlog=4)
    try:
        held = [s.ingest(make_record(i), [gated, quick]) for i in range(2)]
        for record in held:
            assert len(record.feedback_results) == 2  # (their evaluations are made now)
        assert s.stats()["unfinished_feedback"] <= 4
        shed = s.ingest(make_record(2), [gated, quick])
        at_once = shed.wait_for_feedback_results(timeout=10)
        assert [r.status for r in at_once.values()] == [FeedbackStatus.PENDING] * 2
        assert s.stats()["left_pending_over_backlog"] == 2
        assert "evaluation is falling behind" in caplog.text
        gate.set()
        for record in held:
            results = record.wait_for_feedback_results(timeout=10)
            assert [r.status for r in results.values()] == [FeedbackStatus.DONE] * 2
        # (what is left pending waits in the database: not done, nor will it be here
        # until resume_pending(); said True, as if every result had been evaluated)
        assert not s.wait_for_feedback(10)
        page = s.query_records(search="question 2")
        stored = list(page.records[0].feedback_results.values())
        assert [r.status for r in stored] == [FeedbackStatus.PENDING] * 2
        rows = s.store.record(shed.record_id)[1]
        assert [(r["status"], r["worker_id"]) for r in rows] == [("pending", None)] * 2
    finally:
        gate.set()
        s.close(timeout=5)



def test_results_left_pending_over_the_backlog_are_resumed_with_their_own_feedback(
        db_url: str) -> None:
    """The log says to run session.resume_pending() for them: it ended those of a lambda
    (a feedback no worker can load) `failed`, "cannot be loaded by a worker"."""
    gate = threading.Event()
    held = Feedback(lambda output: 1.0 if gate.wait(10) else 0.0, name="held").on_output()
    s = Session(db_url, max_backlog=1)
    try:
        first = s.ingest(make_record(0), [held])
        assert len(first.feedback_results) == 1  # (its evaluation is made now)
        shed = [s.ingest(make_record(i), [held]) for i in (1, 2)]
        for record in shed:
            assert len(record.feedback_results) == 1
        assert s.stats()["left_pending_over_backlog"] == 2
        gate.set()
        assert first.wait_for_feedback_results(timeout=10)[held].status is FeedbackStatus.DONE
        assert not s.wait_for_feedback(10)  # (two are left pending over the backlog)
        assert s.resume_pending(10) == 2
        assert s.wait_for_feedback(10)
        df, _ = s.get_records_and_feedback()
        assert list(df["held status"]) == ["done"] * 3
        assert list(df["held"]) == [1.0] * 3
        assert all(r.record_id in set(df["record_id"]) for r in shed)
    finally:
        gate.set()
        s.close(timeout=5)


def test_close_on_a_stalled_database_keeps_to_its_timeout() -> None:
    """The writer's flush took the whole timeout and its join as long again, after a
    first flush that had taken it too: close(0.4) on a stalled database took ~2.5 s."""
    store = _GatedStore()
    s = Session(store=store)  # type: ignore[arg-type]
    try:
        s.ingest(make_record(), [Feedback(lambda output: 1.0, name="x").on_output()])
        assert store.entered.wait(10)  # the writer is stuck in a write
        started = time.monotonic()
        assert s.close(timeout=0.4) is False
        took = time.monotonic() - started
    finally:
        store.gate.set()
    assert took < 1.5, took


def test_a_stored_records_wait_keeps_to_its_timeout_and_ends_when_its_session_closes(
        db_url: str) -> None:
    """After reading the database until the timeout, the wait blocked on the results as
    long again; once the reading session closed, a wait without a timeout never ended."""
    gate, fb = _gate()
    s = Session(db_url)
    try:
        live = s.ingest(make_record(), [fb])
        stored = s.get_record(live.record_id)
        assert stored is not None
        started = time.monotonic()
        results = stored.wait_for_feedback_results(timeout=0.3)
        took = time.monotonic() - started
        assert [r.status.is_final for r in results.values()] == [False]
        assert took < 0.55, took  # (it was 0.6: twice the timeout)
        reader = Session(db_url)
        elsewhere = reader.get_record(live.record_id)
        assert elsewhere is not None
        reader.close()
        ended = threading.Event()
        threading.Thread(target=lambda: (elsewhere.wait_for_feedback_results(), ended.set()),
                         daemon=True).start()
        assert ended.wait(10)
    finally:
        gate.set()
        s.close(timeout=5)


def test_a_callback_on_a_stored_record_may_wait_on_it(db_url: str) -> None:
    """The callback ran while the record's reader held its lock: a wait inside it
    deadlocked the reading thread."""
    gate, fb = _gate()
    with Session(db_url) as s:
        live = s.ingest(make_record(), [fb])
        stored = s.get_record(live.record_id)
        assert stored is not None
        inner: list[FeedbackStatus] = []
        done = threading.Event()

        def callback(results: dict[Any, FeedbackResult]) -> None:
            again = stored.wait_for_feedback_results(timeout=5)
            inner.extend(r.status for r in again.values())
            done.set()

        stored.wait_for_feedback_results(callback=callback)
        gate.set()
        assert done.wait(10)
        assert inner == [FeedbackStatus.DONE]


def test_deferred_results_are_never_shed_by_the_backlog(db_url: str) -> None:
    """In deferred mode this process evaluates nothing: the backlog cap left the waits of
    records past it resolved `pending` at once, although a worker finished them."""
    from tests.support.deferred_feedbacks import length

    fb = Feedback(length).on_output()
    with Session(db_url, feedback_mode="deferred", max_backlog=2) as s:
        records = [s.ingest(make_record(i), [fb]) for i in range(5)]
        for record in records:
            assert len(record.feedback_results) == 1
        assert s.stats()["left_pending_over_backlog"] == 0
        assert s.flush(10)
        assert s.resume_pending(timeout=20) == 5
        done = [r.wait_for_feedback_results(timeout=10)[fb].status for r in records]
    assert done == [FeedbackStatus.DONE] * 5


def test_a_hand_built_record_with_none_fields_is_stored(db_url: str) -> None:
    """`Record(contexts=None)` failed on the writer thread: the record was lost and every
    result of it failed "the record could not be stored"."""
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    with Session(db_url) as session:
        record = session.ingest(make_record(contexts=None, tags=None, metadata=None,
                                            spans=None, status="error",
                                            start_time=when, end_time=when), [fb])
        result = record.wait_for_feedback_results(timeout=10)[fb]
        assert result.status is FeedbackStatus.DONE
        stored = session.get_record(record.record_id)
    assert stored is not None
    assert (stored.contexts, stored.tags, stored.metadata) == ([], [], {})
    assert stored.status.value == "error"
    assert stored.start_time == when.timestamp()


def test_an_exception_a_usage_dict_and_span_dicts_in_a_hand_built_record_are_stored(
        db_url: str) -> None:
    """`Record(error=exc)`, a provider's usage dict and spans read from a log as dicts were
    taken by Record() and ingest(), then failed on the writer thread: the record was lost
    and its results failed "the record could not be stored"."""
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    record = make_record(
        status="error", error=ValueError("upstream 502"),
        usage={"input_tokens": 12, "output_tokens": 30, "total_tokens": 42,
               "input_token_details": {"cache_read": 4}},
        spans=[{"span_id": "s1", "parent_id": None, "name": "llm", "kind": "llm",
                "start_time": 1.7e9, "end_time": 1.7e9 + 1,
                "usage": {"prompt_tokens": 12, "completion_tokens": 30},
                "error": TimeoutError("slow")}])
    with Session(db_url) as session:
        session.ingest(record, [fb])
        assert record.wait_for_feedback_results(timeout=10)[fb].status is \
            FeedbackStatus.DONE
        stored = session.get_record(record.record_id)
        assert session.stats()["failed_writes"] == 0
    assert stored is not None
    assert stored.error == "ValueError: upstream 502"
    assert stored.usage == TokenUsage(12, 30, 42)
    [span] = stored.spans
    assert (span.span_id, span.name, span.error) == ("s1", "llm", "TimeoutError: slow")
    assert span.usage == TokenUsage(12, 30, None)


def test_spans_given_as_a_generator_and_errors_given_as_other_texts_are_kept() -> None:
    """Checking the spans read a generator of them to its end: the record kept none. A
    str of another type (numpy's) given as the error was refused as no exception."""
    from scrutiny import Span

    spans = (Span(f"s{i}", None, "step", "chain", 1.7e9) for i in range(2))
    record = make_record(spans=spans, status="error", error=np.str_("ValueError: x"))
    assert [s.span_id for s in record.spans] == ["s0", "s1"]
    assert (record.error, type(record.error)) == ("ValueError: x", str)
    assert make_record(error=float("nan")).error is None  # (an empty cell of a table)
    assert make_record(error=pd.NA).error is None


def test_a_hand_built_record_given_an_error_alone_is_an_error() -> None:
    """`Record(error=exc)` without status= was stored as a call that was ok: filters, the
    leaderboard and the dashboard counted the failed call as a success."""
    assert make_record(error=ValueError("upstream timeout")).status is RecordStatus.ERROR
    assert make_record().status is RecordStatus.OK
    assert make_record(error=float("nan")).status is RecordStatus.OK  # (no error)
    # (given, the status is kept: a tool that handled its own error)
    assert make_record(status="ok", error="handled").status is RecordStatus.OK


@pytest.mark.parametrize(("field", "value", "says"), [
    ("usage", 42, "is a TokenUsage"),
    ("usage", {"total_tokens": "many"}, "a count of tokens"),
    ("usage", {"total_tokens": 1.5}, "a count of tokens"),
    ("error", 502, "as text"),
    ("spans", [{"id": "s1"}], r"spans\[0\] is a Span"),
    ("spans", [{"span_id": "s1"}], r"spans\[0\]: .*missing"),
    ("spans", "llm", "a list of Span"),
    ("record_id", "report-\udc80.txt", "lone surrogate"),
    ("record_id", "x" * 513, "at most 512"),
    ("app_version", 1.10, "loses digits"),
])
def test_a_hand_built_record_field_the_store_cannot_take_is_refused_when_made(
        field: str, value: object, says: str) -> None:
    with pytest.raises((TypeError, ValueError), match=says):
        make_record(**{field: value})


def test_reading_a_record_by_an_id_no_record_can_have_finds_none(session: Session) -> None:
    """get_record() with a lone surrogate in the id raised UnicodeEncodeError."""
    made = session.ingest(make_record(record_id=7), [])
    assert session.get_record("report-\udc80.txt") is None
    found = session.get_record(7)  # type: ignore[arg-type]
    assert found is not None
    assert found.record_id == made.record_id == "7"
    with pytest.raises(TypeError, match="record_id is a string"):
        session.get_record(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "says"), [
    ("contexts", "one retrieved text", "contexts=[text]"),
    ("tags", "prod", 'tags=["prod"]'),
    ("tags", {"env": "prod"}, "belong in metadata="),
    ("contexts", {"doc-1": "a text"}, "contexts=list"),
    ("metadata", ["a"], "is a dict"),
    ("status", "done", "one of ['ok', 'error', 'cancelled']"),
    ("start_time", "2026-01-01", "seconds since the epoch"),
    ("start_time", float("nan"), "seconds since the epoch"),
    ("end_time", float("inf"), "seconds since the epoch"),
])
def test_a_record_field_of_the_wrong_shape_is_refused_saying_how(
        field: str, value: object, says: str) -> None:
    with pytest.raises((TypeError, ValueError), match=says.replace("[", r"\[")):
        make_record(**{field: value})


def test_a_record_made_without_its_times_is_dated_when_it_was_made(session: Session) -> None:
    """A dataset's answers scored after the fact, `Record(app_name=..., input=q,
    output=a)`: dated 1970, they came last in every list and alone at the far left of every
    chart of their app."""
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    before = time.time()
    undated = Record(app_name="ds", app_version="v1", input="q", output="a")
    assert before <= undated.start_time <= time.time()
    assert undated.end_time == undated.start_time
    assert undated.latency == 0.0
    started = Record(app_name="ds", app_version="v1", input="q2", output="a",
                     start_time=1_700_000_000)
    assert started.end_time == 1_700_000_000  # (its end: its start, not 1970)
    for record in (undated, started):
        session.ingest(record, [fb])
    assert session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert sorted(df["start_time"].dt.year) == [2023, dt.datetime.now().year]
    assert (df["latency"] == 0).all()


def test_record_names_ids_and_times_the_store_cannot_take_are_refused_at_once(
        session: Session) -> None:
    """An app version left None (an unset environment variable), a name that is not text
    or a time in milliseconds made a Record, which then failed when the writer stored it:
    the record was lost and its results failed "could not be stored"."""
    with pytest.raises(TypeError, match=r"app_version is a non-empty string.*got None"):
        Record(app_name="qa", app_version=None, input="q", output="a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="app_name is a non-empty string"):
        Record(app_name="", app_version="v1")
    with pytest.raises(ValueError, match="in milliseconds"):
        Record(app_name="qa", app_version="v1", start_time=time.time() * 1000)
    with pytest.raises(ValueError, match="between the years 1 and 9999"):
        Record(app_name="qa", app_version="v1", start_time=-1e12)
    numbered = Record(app_name="qa", app_version=2, record_id=42,  # type: ignore[arg-type]
                      input="q", output="a")
    assert (numbered.app_version, numbered.record_id) == ("2", "42")
    session.ingest(numbered, [Feedback(lambda output: 1.0, name="one").on_output()])
    assert session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert (df.loc[0, "app_id"], df.loc[0, "one status"]) == ("qa:2", "done")


def test_a_record_still_queued_when_close_runs_out_is_waited_for_as_pending(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """close(timeout) ran out with records still queued (the database busy): a wait
    without a timeout on one of them blocked for ever (its jobs, made later, were held
    with nothing left to finish them), and no line said that writes were still queued."""
    import sqlite3

    path = tmp_path / "busy.sqlite"
    session = Session(f"sqlite:///{path}")
    one = Feedback(lambda output: 1.0, name="one").on_output()
    session.ingest(make_record(), [one])
    assert session.wait_for_feedback(10)
    running, release = threading.Event(), threading.Event()

    async def holds_the_loop(output: str) -> float:
        running.set()
        release.wait(10)  # (blocking: the loop takes no new record meanwhile)
        return 1.0

    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # (another process writing: the writer waits)
    try:
        session.ingest(make_record(), [Feedback(holds_the_loop).on_output()])
        assert running.wait(10)
        queued = [session.ingest(make_record(i), [one]) for i in range(20)]
        with caplog.at_level(logging.WARNING, logger="scrutiny"):
            assert not session.close(0.3)
        told: dict[str, object] = {}
        waiter = threading.Thread(
            target=lambda: told.update(queued[-1].wait_for_feedback_results()), daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "the wait on a record still queued never ended"
        assert [r.status for r in told.values()] == [FeedbackStatus.PENDING]  # type: ignore[attr-defined]
        assert "still queued" in caplog.text
        assert "ran out of time" in caplog.text
    finally:
        release.set()
        blocker.execute("ROLLBACK")
        blocker.close()


def test_records_in_the_batch_being_written_when_close_runs_out_are_counted_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer took up to 500 records off the queue into one transaction: with big
    span trees that was seconds long, and while it ran `stats()` said write_backlog 0 and
    a close() that ran out said nothing (an exit then lost most of them without a word).
    The batch is counted, and cut after BATCH_PREPARE_MAX seconds of preparing."""
    session = Session(f"sqlite:///{tmp_path}/big.sqlite")

    def big(i: int) -> Record:
        now = time.time()
        spans = [{"span_id": f"s{j}", "parent_id": None, "start_time": now, "end_time": now,
                  "name": f"step{j}", "kind": "chain", "inputs": {"text": f"{i} " + "y" * 900_000},
                  "outputs": {"text": "z" * 900_000}} for j in range(3)]
        return Record(app_name="big", app_version="v1", input=f"q{i}", output="x" * 900_000,
                      spans=spans, start_time=now, end_time=now)

    records = [big(i) for i in range(40)]
    for record in records:
        session.ingest(record)
    assert session.stats()["write_backlog"] > 0
    with caplog.at_level(logging.WARNING, logger="scrutiny"):
        assert not session.close(0.3)
    said = [r.getMessage() for r in caplog.records if "still queued" in r.getMessage()]
    assert len(said) == 1
    assert int(said[0].split(" with ")[1].split()[0]) > 0


@pytest.mark.parametrize("started", [True, False])
def test_a_record_given_to_a_closed_session_has_its_results_failed_not_missing(
        tmp_path: Path, started: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A session closed before it ever stored anything gave a record's wait an empty dict
    (and a traceback in the log): the feedbacks it was given were nowhere, where a session
    closed after it started says each one failed, and why."""
    session = Session(f"sqlite:///{tmp_path}/closed.sqlite")
    one = Feedback(lambda output: 1.0, name="one").on_output()
    if started:
        session.ingest(make_record(), [one])
    session.close()
    with caplog.at_level(logging.ERROR, logger="scrutiny"):
        record = session.ingest(make_record(), [one])
        results = record.wait_for_feedback_results(timeout=5)
    assert [(fb.name, r.status) for fb, r in results.items()] == [
        ("one", FeedbackStatus.FAILED)]
    assert "could not be stored" in (results[one].error or "")
    assert "closed" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


def test_arguments_of_the_wrong_kind_are_refused_saying_what_is_taken(
        tmp_path: Path) -> None:
    """Each of these failed deep inside, with a message about something else (a str
    compared with an int, 'not iterable', an attribute of a str), or later on another
    thread; `limit=1.5` was taken as it was."""
    one = Feedback(lambda output: 1.0, name="one").on_output()
    seen: list[Any] = []
    heard = threading.Event()

    def listener(result: Any, record: Any) -> None:
        seen.append(result)
        heard.set()

    session = Session(f"sqlite:///{tmp_path}/kinds.sqlite", on_result=listener)
    try:
        record = session.ingest(make_record(), [one])
        with pytest.raises(TypeError, match="timeout is seconds"):
            record.wait_for_feedback_results(timeout="5")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="give a function"):
            record.wait_for_feedback_results(callback="print")  # type: ignore[arg-type]
        assert heard.wait(10)  # (one listener, given alone)
        assert [r.feedback_name for r in seen] == ["one"]
        for limit in ("2", 1.5, True):
            with pytest.raises(ConfigurationError, match="whole numbers"):
                session.get_records_and_feedback(limit=limit)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="timezone-aware datetime"):
            session.delete_records(before="2020-01-01")  # type: ignore[arg-type]
    finally:
        session.close()


def test_a_feedback_that_is_a_generator_function_fails_naming_what_it_returned(
        session: Session) -> None:
    """Python 3.11's asyncio takes a generator for a coroutine: the feedback failed with
    "object generator can't be used in 'await' expression" rather than naming its value."""

    def scores(output: str) -> Any:
        yield 1.0

    record = session.ingest(make_record(), [Feedback(scores).on_output()])
    (result,) = record.wait_for_feedback_results(timeout=10).values()
    assert result.status is FeedbackStatus.FAILED
    assert "returned <generator object" in (result.error or "")


def test_a_record_id_given_again_for_another_record_is_refused(session: Session) -> None:
    """A request id used as record_id, used again on a retry: the store kept the first
    record, dropped the second without a word and stored its score under the first."""
    length = Feedback(lambda output: len(output), name="len").on_output()
    first = session.ingest(Record(app_name="a", app_version="v1", input="q1", output="first",
                                  record_id="req-42", start_time=100.0), [length])
    with pytest.raises(ConfigurationError, match="'req-42' was already given"):
        session.ingest(Record(app_name="a", app_version="v2", input="q2",
                              output="second answer", record_id="req-42"), [length])
    # the same record again, with another feedback: still its own id
    session.ingest(first, [Feedback(lambda output: 1.0, name="one").on_output()])
    assert session.wait_for_feedback(10)
    df, _ = session.get_records_and_feedback()
    assert (len(df), df.loc[0, "output"], df.loc[0, "len"], df.loc[0, "one"]) == (
        1, "first", 5.0, 1.0)


def test_record_fields_given_as_other_iterables_become_lists() -> None:
    record = make_record(contexts=(c for c in ["a", "b"]), tags={"x"})
    assert (record.contexts, record.tags) == (["a", "b"], ["x"])


def test_times_from_numpy_or_a_decimal_are_stored(session: Session) -> None:
    """Times taken from a numpy array or a pandas column (numpy int64, float32) were stored
    before Record checked its fields; the check refused them, and the record was lost."""
    numpy = pytest.importorskip("numpy")
    from decimal import Decimal

    start = 1_700_000_000
    built = [Record(app_name="np", app_version="v1", input=f"q{i}", output="a",
                    start_time=begin, end_time=end)
             for i, (begin, end) in enumerate([
                 (numpy.int64(start), numpy.int64(start + 2)),
                 (numpy.float32(start), numpy.float64(start + 2)),
                 (Decimal(start), Decimal(start) + Decimal("2.5"))])]
    assert [type(r.start_time) for r in built] == [float] * 3
    for record in built:
        session.ingest(record, [])
    assert session.flush(10)
    for record in built:
        stored = session.get_record(record.record_id)
        assert stored is not None
        assert stored.start_time == pytest.approx(start, abs=1)
        assert stored.end_time - stored.start_time == pytest.approx(
            record.end_time - record.start_time, abs=0.01)


def test_a_truncation_inside_a_compressed_span_tree_is_seen() -> None:
    """Deferred workers skip a feedback whose value was cut at storage; they look for the
    marker in a record row's JSON, which a compressed span tree hides."""
    from scrutiny.core import _rows
    from scrutiny.core._records import Span

    cut = Span("s1", None, "big", "chain", 1.0, 2.0, {"text": "x" * 50_000}, None, None,
               None, None, [], {})
    row = {"spans_json": _rows._spans_json([cut], max_bytes=40_000, compress=True)}
    assert row["spans_json"].startswith("zlib:")
    assert _rows.holds_truncation(row)
    whole = Span("s1", None, "big", "chain", 1.0, 2.0, {"text": "y" * 9_000}, None, None,
                 None, None, [], {})
    row = {"spans_json": _rows._spans_json([whole], max_bytes=20_000, compress=True)}
    assert row["spans_json"].startswith("zlib:")
    assert not _rows.holds_truncation(row)


def test_a_plain_function_in_the_feedback_list_is_refused_saying_how_to_wrap_it(
        tmp_path: Path) -> None:
    def relevance(output: str) -> float:
        return 1.0

    with Session(f"sqlite:///{tmp_path}/f.sqlite") as s:
        with pytest.raises(ConfigurationError, match=r"Feedback\(relevance\)\.on_output\(\)"):
            s.ingest(make_record(), [relevance])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError, match=r"pass \[feedback\]"):
            s.ingest(make_record(), Feedback(relevance).on_output())  # type: ignore[arg-type]


def test_a_session_timeout_too_long_for_a_thread_wait_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at most"):
        Session(f"sqlite:///{tmp_path}/t.sqlite", feedback_timeout=1e12)


def test_a_feedback_with_very_many_retries_fails_with_its_own_error(tmp_path: Path) -> None:
    """The backoff doubled per attempt without a cap on the exponent: past 1024 attempts
    it overflowed a float, and the evaluation ended as an internal error."""
    calls = itertools.count(1)

    def flaky(output: str) -> float:
        raise ValueError(f"attempt {next(calls)}")

    fb = Feedback(flaky, retry=RetryPolicy(attempts=1100, initial_backoff=0.0,
                                           max_backoff=0.0)).on_output()
    with Session(f"sqlite:///{tmp_path}/r.sqlite") as s:
        [result] = s.ingest(make_record(), [fb]).wait_for_feedback_results(
            timeout=60).values()
    assert result.status is FeedbackStatus.FAILED
    assert "attempt 1100" in (result.error or "")
    assert "after 1100 attempts" in (result.error or "")


def test_an_async_callback_is_run_to_its_end(session: Session) -> None:
    """`callback=` given an `async def` was called, its coroutine never awaited: it never
    ran (a RuntimeWarning at best)."""
    fb = Feedback(lambda output: 0.5, name="half").on_output()
    got: list[float | None] = []
    fired = threading.Event()

    async def on_done(results: dict[Feedback, FeedbackResult]) -> None:
        await asyncio.sleep(0)
        got.extend(r.result for r in results.values())
        fired.set()

    session.ingest(make_record(), [fb]).wait_for_feedback_results(callback=on_done)
    assert fired.wait(10)
    assert got == [0.5]


async def test_an_async_callback_fired_at_once_on_an_event_loop_runs_too(
        session: Session) -> None:
    """A record without feedbacks fires its callback at once: an async one given on a
    running loop runs to its end too."""
    fired = threading.Event()

    async def on_done(results: dict[Feedback, FeedbackResult]) -> None:
        await asyncio.sleep(0)
        fired.set()

    session.ingest(make_record(), []).wait_for_feedback_results(callback=on_done)
    assert await asyncio.to_thread(fired.wait, 10)


async def test_a_blocking_wait_run_out_on_an_event_loop_says_to_await(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    gate, fb = _gate()
    record = session.ingest(make_record(), [fb])
    try:
        results = record.wait_for_feedback_results(timeout=0.05)
    finally:
        gate.set()
    assert results[fb].status in (FeedbackStatus.PENDING, FeedbackStatus.RUNNING)
    assert "blocked the event loop" in caplog.text
    assert "await record.await_feedback_results" in caplog.text
    done = await record.await_feedback_results(timeout=10)
    assert done[fb].status is FeedbackStatus.DONE


def test_sync_calls_stuck_past_their_timeout_do_not_starve_the_other_feedbacks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A thread cannot be stopped: a sync call that never returns keeps its pool thread
    after its timeout. Once every thread was stuck so, every later sync call — of any
    feedback — failed "waiting for a thread", for as long as the process ran."""
    release = threading.Event()

    def hangs(output: str) -> float:
        release.wait(60)  # (a network call without a timeout of its own)
        return 0.0

    def quick(output: str) -> float:
        return 1.0

    hung = Feedback(hangs, timeout=0.3).on_output()
    fine = Feedback(quick, timeout=5).on_output()
    try:
        with Session(f"sqlite:///{tmp_path}/h.sqlite", thread_pool_size=2,
                     max_concurrency=4) as s:
            stuck = [s.ingest(make_record(i), [hung]) for i in range(2)]
            for record in stuck:
                [result] = record.wait_for_feedback_results(timeout=20).values()
                assert result.status is FeedbackStatus.FAILED
                assert "timed out after 0.3 s" in (result.error or "")
            later = [s.ingest(make_record(10 + i), [fine]) for i in range(4)]
            for record in later:
                [result] = record.wait_for_feedback_results(timeout=20).values()
                assert result.status is FeedbackStatus.DONE, result.error
        assert "a new thread takes its place" in caplog.text
    finally:
        release.set()


def test_an_async_session_listener_is_run_to_its_end(session: Session) -> None:
    """`add_listener` / `on_result` given an `async def`: its coroutine was never awaited,
    so it never ran."""
    fb = Feedback(lambda output: 0.5, name="half").on_output()
    heard = threading.Event()
    got: list[float | None] = []

    async def listener(result: FeedbackResult, record: Record) -> None:
        await asyncio.sleep(0)
        got.append(result.result)
        heard.set()

    session.add_listener(listener)
    session.ingest(make_record(), [fb])
    assert heard.wait(10)
    assert got == [0.5]


def test_a_replaced_stuck_thread_ends_once_its_call_comes_back(tmp_path: Path) -> None:
    """The pool grows by one thread per call stuck past its timeout; when the stuck call
    returns after all, the pool shrinks back to its size (thread count stays flat)."""
    release = threading.Event()
    stuck_on: list[threading.Thread] = []

    def hangs(output: str) -> float:
        stuck_on.append(threading.current_thread())
        release.wait(30)
        return 0.0

    hung = Feedback(hangs, timeout=0.2).on_output()
    fine = Feedback(lambda output: 1.0, name="fine", timeout=5).on_output()
    try:
        with Session(f"sqlite:///{tmp_path}/p.sqlite", thread_pool_size=1) as s:
            [first] = s.ingest(make_record(0), [hung]).wait_for_feedback_results(
                timeout=20).values()
            assert first.status is FeedbackStatus.FAILED
            [ok] = s.ingest(make_record(1), [fine]).wait_for_feedback_results(
                timeout=20).values()
            assert ok.status is FeedbackStatus.DONE, ok.error  # (on the replacement)
            assert s._loop is not None
            pool = s._loop._pool
            assert len(pool._threads) == 2
            release.set()
            stuck_on[0].join(10)  # the stuck call came back: its thread is the extra one
            assert not stuck_on[0].is_alive()
            assert len(pool._threads) == 1
    finally:
        release.set()


def test_a_tables_missing_cells_are_no_value_not_the_text_nan(session: Session) -> None:
    """A dataset read with pandas gives its empty cells as NaN (or pd.NA, pd.NaT): a
    missing ground truth was the text "nan" — an exact match scored it 0.0, and a missing
    answer matched it, 1.0 — and a judge was sent "nan" as the answer."""
    from scrutiny.providers import GroundTruth

    table = pd.DataFrame({"question": ["q1", "q2", "q3", "q4"],
                          "answer": ["Paris", "Paris", np.nan, pd.NA],
                          "truth": ["Paris", np.nan, "Rome", np.nan]})

    def exact(output: str, truth: str) -> float:
        return float(str(output) == str(truth))

    fb = Feedback(exact, name="exact").on(output=Select.output,
                                          truth=Select.metadata("truth"))
    first_word = Feedback(lambda word: float(len(word)), name="first").on(
        word=Select.metadata("truth").map(lambda text: text.split()[0]))
    records = [session.ingest(make_record(i, output=row.answer, metadata={"truth": row.truth},
                                          contexts=np.nan), [fb, first_word])
               for i, row in enumerate(table.itertuples())]
    assert records[2].contexts == []
    ended = [{f.name: r for f, r in rec.wait_for_feedback_results(timeout=20).items()}
             for rec in records]
    assert (ended[0]["exact"].status, ended[0]["exact"].result) == (FeedbackStatus.DONE, 1.0)
    for rec in ended[1:]:
        assert rec["exact"].status is FeedbackStatus.SKIPPED, rec["exact"]
        assert "found nothing" in (rec["exact"].error or "")
    assert ended[1]["first"].status is FeedbackStatus.SKIPPED  # (`map` not given None)
    assert ended[2]["first"].status is FeedbackStatus.DONE
    with pytest.raises(ConfigurationError, match="without a question or expected answer"):
        GroundTruth([{"question": "q2", "expected": np.nan}])
    with pytest.raises(ValueError, match="start_time is missing"):
        make_record(start_time=pd.NaT)
    stored = session.get_record(records[3].record_id)
    assert stored is not None
    assert stored.output is None  # (pd.NA: no value, not a description of the object)


def test_reprs_are_short_and_results_are_found_by_name(session: Session) -> None:
    """A record's repr held every span's inputs and outputs (140 KB for one with 19 KB of
    contexts), a result's every call's arguments: a notebook's output flooded, and
    pytest's assertion diff showed the prompt and cut off the status and the score.
    Results were found only by the Feedback object: results["name"] raised KeyError."""
    def broken(output: str) -> float:
        raise ValueError("the judge exploded: " + "x" * 500)

    record = session.ingest(make_record(contexts=["ctx " * 5000] * 4),
                            [Feedback(lambda output: 0.25, name="len").on_output(),
                             Feedback(broken).on_output()])
    results = record.wait_for_feedback_results(timeout=20)
    assert results["len"].result == 0.25  # by name
    assert results["broken"].status is FeedbackStatus.FAILED
    with pytest.raises(KeyError, match=r"the record has \['broken', 'len'\]"):
        results["nope"]
    # (.get and `in` by name too: .get("len") said None, "len" in results False)
    assert results.get("len") is results["len"]
    assert record.feedback_results.get("len") == results["len"]
    assert "len" in results
    assert ("nope" in results, results.get("nope"), results.get("nope", 0)) == (False, None, 0)
    shown = repr(record)
    assert len(shown) < 500, shown
    assert "status='ok'" in shown
    assert "contexts=4" in shown
    assert "'len': done 0.25" in shown
    assert "'broken': failed" in shown
    failed = repr(results["broken"])
    assert failed.startswith("FeedbackResult('broken', status='failed', error='ValueError: ")
    assert len(failed) < 300, failed
    assert repr(session).startswith("Session('sqlite:///")


def test_a_stored_records_results_are_found_by_the_feedback_that_made_them(
        session: Session) -> None:
    """A record read back (get_record, query_records) holds stand-ins of its feedbacks:
    results[fb] with the very Feedback the app wired raised a bare KeyError."""
    fb = Feedback(_answer_length, name="len").on_output()
    rewired = Feedback(_answer_length, name="len").on_input()
    record = session.ingest(make_record(), [fb])
    assert record.wait_for_feedback_results(timeout=10)[fb].result == 8.0
    stored = session.get_record(record.record_id)
    assert stored is not None
    assert stored.feedback_results[fb].result == 8.0
    assert stored.wait_for_feedback_results(timeout=1)[fb].result == 8.0
    with pytest.raises(KeyError, match=r"another definition of it .* results\['len'\]"):
        stored.feedback_results[rewired]


def test_a_record_id_deleted_can_be_given_again(session: Session) -> None:
    """A notebook run, deleted, then run again: its ids were refused, "already given to
    this session for another record ... it keeps the first", though nothing was kept."""
    first = session.ingest(make_record(record_id="row-0", app_name="nb"), [])
    assert session.flush(10)
    assert session.delete_records(app_ids=["nb"]) == 1
    again = session.ingest(make_record(record_id="row-0", app_name="nb",
                                       start_time=first.start_time + 60), [])
    assert session.flush(10)
    stored = session.get_record("row-0")
    assert stored is not None
    assert stored.start_time == pytest.approx(again.start_time)


def test_a_wait_on_results_left_to_workers_says_so(
        db_url: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """In deferred mode with no worker running, a wait with a timeout said the results
    "will still be stored when they finish" (nothing here evaluates them), and a wait
    without one blocked for ever, without a word."""
    from scrutiny.core import _records
    from tests.support.deferred_feedbacks import length

    monkeypatch.setattr(_records, "WAIT_HINT_AFTER", 0.2)
    fb = Feedback(length).on_output()
    with Session(db_url, feedback_mode="deferred") as session:
        record = session.ingest(make_record(), [fb])
        with caplog.at_level(logging.WARNING, "scrutiny"):
            results = record.wait_for_feedback_results(timeout=0.2)
        assert results[fb].status is FeedbackStatus.PENDING
        assert "nothing in this process evaluates them" in caplog.text
        assert "will still be stored" not in caplog.text
        caplog.clear()

        class StartAWorker(logging.Handler):  # (as the user would, once told)
            def emit(self, entry: logging.LogRecord) -> None:
                if "none of them started" in entry.getMessage():
                    session.start_worker(poll_interval=0.05)

        handler = StartAWorker()
        logging.getLogger("scrutiny").addHandler(handler)
        try:
            results = record.wait_for_feedback_results()  # (no timeout)
        finally:
            logging.getLogger("scrutiny").removeHandler(handler)
        assert results[fb].status is FeedbackStatus.DONE
        assert "after 0.2s, none of them started" in caplog.text


def test_a_record_made_with_dataclasses_replace_has_no_results_of_the_original(
        session: Session) -> None:
    """Its results were an __init__ field: dataclasses.replace(record, ...) made a variant
    sharing the original's results (their record_id the original's), and giving it to a
    session was refused, "already has a result of ['len']"."""
    import dataclasses

    fb = Feedback(lambda output: 1.0, name="len").on_output()
    original = session.ingest(make_record(), [fb])
    assert original.wait_for_feedback_results(timeout=10)["len"].result == 1.0
    variant = dataclasses.replace(original, record_id="variant-1", output="another answer")
    assert variant.feedback_results == {}
    session.ingest(variant, [Feedback(lambda output: 0.5, name="len").on_output()])
    result = variant.wait_for_feedback_results(timeout=10)["len"]
    assert (result.record_id, result.result) == ("variant-1", 0.5)


def _answer_length(output: str) -> float:  # (importable by path: pickled below)
    return float(len(output))


def test_a_record_copies_and_pickles_as_a_snapshot_of_its_results(session: Session) -> None:
    """copy.deepcopy(record) and pickle.dumps(record) failed, "cannot pickle
    '_thread.RLock' object", and copy.copy(record) shared the original's results. A copy
    has its own values and the results as they were; a pending one stays pending in it."""
    import copy
    import pickle

    fb = Feedback(_answer_length, name="len").on_output()
    original = session.ingest(make_record(metadata={"k": [1]}), [fb])
    assert original.wait_for_feedback_results(timeout=10)["len"].result == 8.0
    deep = copy.deepcopy(original)
    deep.metadata["k"].append(2)
    assert original.metadata == {"k": [1]}
    assert list(deep.feedback_results) == [fb]  # (the feedback itself, not a copy of it)
    for made in (deep, copy.copy(original), pickle.loads(pickle.dumps(original))):
        assert (made.record_id, made.output) == (original.record_id, "answer 0")
        assert made.wait_for_feedback_results(timeout=1)["len"].result == 8.0
        assert made.feedback_futures()[next(iter(made.feedback_results))].done()
        assert not set(map(id, made._slots.values())) & set(map(id, original._slots.values()))
    gate, gated = _gate()
    running = session.ingest(make_record(1), [gated])
    frozen = copy.deepcopy(running)
    gate.set()
    assert running.wait_for_feedback_results(timeout=10)["gated"].status is \
        FeedbackStatus.DONE
    assert not frozen.feedback_results["gated"].status.is_final
    assert not frozen.wait_for_feedback_results(timeout=0.05)["gated"].status.is_final
    with pytest.raises(pickle.PicklingError, match=r"'gated' cannot be pickled.*top level"):
        pickle.dumps(frozen)


def test_a_second_session_on_one_database_says_to_reuse_the_first(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A notebook cell that makes a Session, run again, left one more open (some 35
    threads) each time, with a warning only at the ninth open session in the process."""
    url = f"sqlite:///{tmp_path}/nb.sqlite"
    sessions = [Session(url), Session(url), Session("memory://"), Session("memory://")]
    try:
        with caplog.at_level(logging.WARNING, "scrutiny"):
            for s in sessions:
                s.ingest(make_record(), [])  # (started: its threads run)
        said = [r.getMessage() for r in caplog.records if "sessions are open" in r.getMessage()]
        assert len(said) == 1
        assert "2 sessions are open in this process on sqlite:///" in said[0]
        assert "reuse the one you have" in said[0]
    finally:
        for s in sessions:
            s.close()


def test_results_whose_records_were_deleted_meanwhile_are_logged_once(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A retention run while a batch was evaluated logged one warning per result whose
    record it deleted: 50 records, 50 lines."""
    gate, fb = _gate()
    with Session(db_url) as session:
        records = [session.ingest(make_record(i, app_name="old"), [fb]) for i in range(6)]
        assert session.flush(10)
        assert session.delete_records(app_ids=["old"]) == 6
        with caplog.at_level(logging.DEBUG, "scrutiny"):
            gate.set()
            for record in records:
                record.wait_for_feedback_results(timeout=10)
            assert session.wait_for_feedback(10) is not None
    deleted = [r for r in caplog.records if "its record was deleted" in r.getMessage()]
    assert len(deleted) == 6
    assert [r.levelno for r in deleted].count(logging.WARNING) == 1
