"""Reading the wait a rate-limited judge model asks for out of its error message."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, RetryPolicy, Session
from scrutiny.providers import LLMJudge, TransientJudgeError
from scrutiny.providers._models import backend_for, retry_after_hint
from tests.test_providers_judge_limits import RateLimited, failing_model, run

pytest.importorskip("langchain_core")
from langchain_core.runnables import RunnableLambda


class RateLimitError(Exception):
    """Looks like an SDK's 429 whose only hint is in its message (OpenAI, Gemini, proxies)."""

    status_code = 429


@pytest.mark.parametrize(("message", "seconds"), [
    # compound durations (Go's time.Duration, proxies in front of a model)
    ("Rate limit reached. Please try again in 1m30s.", 90.0),
    ("Rate limit reached. Please try again in 1m 30s.", 90.0),
    ("Quota exceeded, retry after 2h", 7200.0),
    ("Please try again in 1h2m3.5s", 3723.5),
    ("please retry in 1 minute and 30 seconds", 90.0),
    ("Retry in 2 mins, 5 secs", 125.0),
    ("TRY AGAIN IN 1M30S", 90.0),
    ("retry after 1 hour", 3600.0),
    # the shapes read before: one number and its unit
    ("Please try again in 500ms. Visit https://platform.openai.com/account/rate-limits", 0.5),
    ("Rate limit reached for gpt-4o. Please try again in 6.5s.", 6.5),
    ("429 RESOURCE_EXHAUSTED. Please retry in 23.4s.", 23.4),
    ("Too many requests: retry after 20 seconds", 20.0),
    ("Please try again in 3m", 180.0),
    ("Please try again in 2 minutes.", 120.0),
    ("[{'@type': 'type.googleapis.com/google.rpc.RetryInfo', 'retryDelay': '23s'}]", 23.0),
])
def test_the_wait_named_in_the_message_is_read(message: str, seconds: float) -> None:
    assert retry_after_hint(RateLimitError(message)) == pytest.approx(seconds)


@pytest.mark.parametrize("message", [
    "Too Many Requests",
    "Please try again in 5 messages",  # a number, but no unit of time
    "retry later",
    "try again in a moment",
])
def test_a_message_without_a_wait_gives_no_hint(message: str) -> None:
    assert retry_after_hint(RateLimitError(message)) is None


def test_a_compound_wait_reaches_the_judges_transient_error() -> None:
    """A real LangChain model failing with the wait only in its message: the error the
    judge raises carries it, for the retry policy to wait."""

    async def limited(messages: Any) -> str:
        raise RateLimitError("Rate limit reached for gpt-4o. Please try again in 1m30s.")

    backend = backend_for(RunnableLambda(limited))
    with pytest.raises(TransientJudgeError) as caught:
        asyncio.run(backend("system", "user"))
    assert caught.value.retry_after == pytest.approx(90.0)


@pytest.mark.parametrize("text", [
    "Please try again in " + "1m" * 3000,
    "Please try again in " + "1 " * 3000,
    "Please try again in " + "1m, and " * 600,
    "retry in " * 600,
    "try again in " + "9" * 5000,
    "try again in 1." + "5" * 5000,
])
def test_long_hostile_messages_are_read_in_linear_time(text: str) -> None:
    """Every part of the duration pattern is bounded: no backtracking blow-up on a message
    built to cause one (the search looks at the first 4000 characters)."""
    started = time.perf_counter()
    retry_after_hint(RateLimitError(text))
    assert time.perf_counter() - started < 0.5  # (about 0.2 ms; a blow-up takes minutes)


# ---------------------------------------------------------------------------- waiting
# (Scaled down: a hint of 0.3 s against caps of 0.05-0.1 s stands for 45 s against 30 s.)
def test_a_hint_longer_than_the_backoff_cap_is_waited(session: Session) -> None:
    """max_backoff caps the doubling backoff: a server asking for longer was not waited,
    the result failed although the retry would have been answered."""
    calls: list[float] = []
    policy = RetryPolicy(attempts=2, initial_backoff=0.001, max_backoff=0.05,
                         retry_on=(TransientJudgeError,))
    judge = LLMJudge(failing_model(1, RateLimited(retry_after=0.3), calls=calls),
                     retry=policy)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert (result.status, result.attempts) == (FeedbackStatus.DONE, 2)
    assert calls[1] - calls[0] >= 0.29  # the hint, not the 0.05 s cap


def test_the_judges_default_waits_hints_of_minutes_and_keeps_its_backoff() -> None:
    judge = LLMJudge(failing_model(0, RateLimited))
    assert judge.retry.max_retry_after == 300.0
    assert judge.retry.max_backoff == 30.0  # the doubling backoff is as it was
    assert LLMJudge(failing_model(0, RateLimited),
                    max_retry_after=None).retry.max_retry_after is None


def test_a_hint_over_max_retry_after_fails_at_once_saying_how_to_allow_it(
        session: Session) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(1, RateLimited(retry_after=0.3), calls=calls),
                     retries=3, backoff=0.001, max_retry_after=0.1)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert len(calls) == 1
    error = result.error or ""
    assert "asked to wait 0.3 s before retrying" in error
    assert "max_retry_after=0.1 s: raise max_retry_after" in error


def test_a_hint_past_the_deadline_fails_at_once_saying_how_to_allow_it(
        session: Session) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(1, RateLimited(retry_after=0.5), calls=calls),
                     retries=3, backoff=0.001, deadline=0.3)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert len(calls) == 1  # failed at once, not after waiting into the deadline
    error = result.error or ""
    assert "asked to wait 0.5 s before retrying" in error
    assert "deadline of 0.3 s" in error
    assert "raise the deadline" in error
