"""The judge under pressure: rate limits, concurrency caps, retries, timeouts, prompt budget.

The judge models are real LangChain runnables: `FakeListChatModel` bound to
``stream=True`` (its async streaming path awaits ``asyncio.sleep(sleep)`` per chunk, so a
one-character answer takes one real async wait), and `RunnableLambda` for models that fail.
Call times come from a LangChain callback handler on the model. Every evaluation runs
through a `Session` on SQLite; waiting is on `wait_for_feedback`, never on sleep.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, ClassVar

import pytest

from scrutiny import Feedback, FeedbackStatus, RateLimit, Record, RetryPolicy, Session
from scrutiny.providers import LLMJudge, TransientJudgeError

pytest.importorskip("langchain_core")
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListChatModel
from langchain_core.runnables import RunnableLambda

N = 200


class CallLog(BaseCallbackHandler):
    """Start times, prompts and the most calls in flight at once, from LangChain's events."""

    run_inline = True

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        with self._lock:
            self.starts.append(time.monotonic())
            self.prompts.append("\n".join(str(m.content) for m in messages[0]))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self.in_flight -= 1

    on_llm_error = on_llm_end


def slow_model(log: CallLog, delay: float, answer: str = "8") -> Any:
    """A chat model that answers `answer` after one `await asyncio.sleep(delay)`."""
    return FakeListChatModel(responses=[answer], sleep=delay,
                             callbacks=[log]).bind(stream=True)


def make_record(i: int, output: str = "Paris is the capital of France.") -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=f"Capital of France? ({i})",
                  output=output, start_time=now, end_time=now)


def run(session: Session, feedbacks: list[Feedback], n: int, **kw: Any) -> list[Record]:
    records = [session.ingest(make_record(i, **kw), feedbacks) for i in range(n)]
    assert session.wait_for_feedback(60)
    return records


def statuses(records: list[Record], fb: Feedback) -> set[FeedbackStatus]:
    return {r.feedback_results[fb].status for r in records}


# ---------------------------------------------------------------------------- limits
def test_concurrency_cap_holds_under_200_evaluations(database_url: str) -> None:
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.02), rate_limit=RateLimit(max_concurrent=4))
    judged = Feedback(judge.answer_relevance).on_input_output()
    others_in_flight = [0, 0]  # now, most

    async def unthrottled(output: str) -> float:
        others_in_flight[0] += 1  # one event loop: no lock needed
        others_in_flight[1] = max(others_in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            others_in_flight[0] -= 1
        return 1.0

    other = Feedback(unthrottled).on_output()
    with Session(database_url, max_concurrency=64) as session:
        records = run(session, [judged, other], N)
    assert statuses(records, judged) == {FeedbackStatus.DONE}
    assert statuses(records, other) == {FeedbackStatus.DONE}
    assert len(log.starts) == N
    assert log.max_in_flight == 4  # reached, never exceeded
    assert others_in_flight[1] > 4  # the judge's cap throttles the judge only


def test_rate_limit_holds_its_rate_under_200_evaluations(database_url: str) -> None:
    per_minute = 12_000  # 200 per second: one call every 5 ms
    spacing = 60 / per_minute
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.001), rate_limit=RateLimit(per_minute=per_minute))
    judged = Feedback(judge.coherence).on_output()
    with Session(database_url, max_concurrency=64) as session:
        records = run(session, [judged], N)
    assert statuses(records, judged) == {FeedbackStatus.DONE}
    starts = sorted(log.starts)
    assert len(starts) == N
    elapsed = starts[-1] - starts[0]
    assert elapsed >= (N - 1) * spacing * 0.95  # never faster than the stated rate
    window = 20  # no burst: any 20 consecutive starts span at least ~20 intervals
    assert min(b - a for a, b in zip(starts, starts[window:], strict=False)) >= \
        (window - 1) * spacing * 0.9


def test_a_judge_awaited_directly_holds_its_own_limits() -> None:
    """200 direct awaits under asyncio.gather (scoring a dataset in a notebook): the judge's
    rate limit and cap were the session's to apply, so all 200 calls went out at once."""
    per_minute, cap = 12_000, 3
    spacing = 60 / per_minute
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.01),
                     rate_limit=RateLimit(per_minute=per_minute, max_concurrent=cap))

    async def score_all() -> list[tuple[float, str]]:
        return await asyncio.gather(*(judge.coherence(f"text {i}") for i in range(N)))

    scores = asyncio.run(score_all())
    assert [s for s, _ in scores] == [0.8] * N
    assert log.max_in_flight == cap
    starts = sorted(log.starts)
    assert starts[-1] - starts[0] >= (N - 1) * spacing * 0.95
    # and again on another event loop (each loop has its own budget; none is left stale)
    assert asyncio.run(judge.coherence("again")) == scores[0]


def test_a_loop_without_weak_references_still_gets_the_judges_limits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop written in C may take no weak references (budgets are kept per loop,
    weakly): its direct calls must still be limited, not fail."""
    from scrutiny.core import _dispatch

    class NoWeakReferences(dict):  # (what the per-loop map does with such a loop)
        def get(self, key: Any, default: Any = None) -> Any:
            raise TypeError(f"cannot create weak reference to {type(key).__name__!r} object")

    monkeypatch.setattr(_dispatch, "_loop_limits", NoWeakReferences())
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.01), rate_limit=RateLimit(max_concurrent=2))

    async def score_all() -> list[tuple[float, str]]:
        return await asyncio.gather(*(judge.coherence(f"text {i}") for i in range(20)))

    assert [s for s, _ in asyncio.run(score_all())] == [0.8] * 20
    assert log.max_in_flight == 2


def test_judges_of_one_rate_limit_group_share_its_budget() -> None:
    """RateLimit(group="openai-key") shares one budget (one API key) among judges: awaited
    side by side, each judge had a budget of its own (a cap of 1 let 2 calls out)."""
    log = CallLog()
    limit = RateLimit(max_concurrent=1, group="openai-key")
    first = LLMJudge(slow_model(log, 0.02), rate_limit=limit)
    second = LLMJudge(slow_model(log, 0.02), rate_limit=limit)

    async def score_all() -> list[tuple[float, str]]:
        return await asyncio.gather(*(judge.coherence(f"text {i}") for i in range(6)
                                      for judge in (first, second)))

    assert [s for s, _ in asyncio.run(score_all())] == [0.8] * 12
    assert log.max_in_flight == 1


def test_a_judges_feedback_and_a_function_awaiting_it_share_its_budget(
        database_url: str) -> None:
    """Feedback(judge.x) is limited by the session; a function of the user's awaiting the
    same judge by the judge itself — two budgets of one group: 2 calls at a cap of 1."""
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.02), rate_limit=RateLimit(max_concurrent=1))

    async def coherence_of_the_first_line(text: str) -> tuple[float, str]:
        return await judge.coherence(text.splitlines()[0])

    feedbacks = [Feedback(judge.answer_relevance).on_input_output(),
                 Feedback(coherence_of_the_first_line).on_output()]
    with Session(database_url, max_concurrency=64) as session:
        records = run(session, feedbacks, 10)
    for fb in feedbacks:
        assert statuses(records, fb) == {FeedbackStatus.DONE}
    assert log.max_in_flight == 1


def test_a_judge_wrapped_in_a_function_of_ones_own_is_still_limited(
        database_url: str) -> None:
    """The limits travel with `Feedback(judge.method)`; a function of the user's that
    awaits the judge is a feedback without them."""
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.02), rate_limit=RateLimit(max_concurrent=4))

    async def relevance_of_the_first_line(question: str, answer: str) -> tuple[float, str]:
        return await judge.answer_relevance(question, answer.splitlines()[0])

    wrapped = Feedback(relevance_of_the_first_line).on_input_output()
    with Session(database_url, max_concurrency=64) as session:
        records = run(session, [wrapped], 60)
    assert statuses(records, wrapped) == {FeedbackStatus.DONE}
    assert log.max_in_flight == 4


def test_a_session_limiting_the_judge_is_not_limited_twice(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `Feedback(judge.method)` the session holds the group's permit for the call;
    the judge must not take a second one (a cap of 4 would hold, but a rate would be paid
    twice: half the stated rate)."""
    from scrutiny.core._dispatch import _GroupLimit

    permits: list[int] = []
    taking = _GroupLimit.__call__

    def counted(self: _GroupLimit) -> Any:
        permits.append(1)
        return taking(self)

    monkeypatch.setattr(_GroupLimit, "__call__", counted)
    log = CallLog()
    judge = LLMJudge(slow_model(log, 0.001), rate_limit=RateLimit(per_minute=6_000))
    judged = Feedback(judge.coherence).on_output()
    with Session(database_url, max_concurrency=64) as session:
        records = run(session, [judged], 40)
    assert statuses(records, judged) == {FeedbackStatus.DONE}
    assert len(log.starts) == len(permits) == 40  # (one permit per call)


# ---------------------------------------------------------------------------- retries
class RateLimited(Exception):
    """Looks like an SDK's 429 error: a status code and a retry-after hint."""

    status_code = 429

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("Too Many Requests")
        self.retry_after = retry_after


def failing_model(times: int, error: type[Exception] | Exception, answer: str = "7",
                  calls: list[float] | None = None) -> Any:
    """A LangChain runnable that raises `error` `times` times, then answers."""
    made: list[float] = calls if calls is not None else []

    async def call(messages: Any) -> str:
        made.append(time.monotonic())
        if len(made) <= times:
            raise error if isinstance(error, Exception) else error()
        return answer

    return RunnableLambda(call)


def test_retries_stop_at_their_budget_with_failed(session: Session) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(99, RateLimited, calls=calls), retries=2, backoff=0.01)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert result.result is None
    assert result.attempts == 3
    assert len(calls) == 3
    assert "TransientJudgeError" in (result.error or "")
    assert "after 3 attempts" in (result.error or "")


def test_transient_errors_are_retried_until_an_answer(session: Session) -> None:
    judge = LLMJudge(failing_model(2, ConnectionResetError, answer="6"), retries=3,
                     backoff=0.01)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert (result.status, result.result, result.attempts) == (FeedbackStatus.DONE, 0.6, 3)


def test_retry_after_hints_are_honoured(session: Session) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(1, RateLimited(retry_after=0.3), calls=calls), retries=1,
                     backoff=0.001)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    assert record.feedback_results[fb].status is FeedbackStatus.DONE
    assert calls[1] - calls[0] >= 0.29


class HeadersOnTheError(Exception):
    """aiohttp's ClientResponseError and Fern-generated SDKs (Cohere...) carry the response
    headers on the error itself, not on a `response`."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("429, message='Too Many Requests'")
        self.status = 429
        self.headers = headers


class RetryAfterText(Exception):
    status_code = 429
    retry_after = "0.3"  # a header value passed on as it came


class QuotaExceeded(Exception):
    """Google's and OpenAI's 429s name the wait only in their message."""

    code = 429


@pytest.mark.parametrize("error", [
    HeadersOnTheError({"Retry-After": "0.3"}),
    HeadersOnTheError({"retry-after-ms": "300"}),
    RetryAfterText(),
    QuotaExceeded("429 RESOURCE_EXHAUSTED. You exceeded your current quota. "
                  "Please retry in 0.3s."),
    QuotaExceeded("Rate limit reached for gpt-4o on tokens per min. Please try again in "
                  "300ms. Visit https://platform.openai.com/account/rate-limits"),
], ids=["headers-on-error", "retry-after-ms-on-error", "string-attribute", "gemini-message",
        "openai-message"])
def test_retry_after_hints_in_other_shapes_are_honoured(session: Session,
                                                        error: Exception) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(1, error, calls=calls), retries=1, backoff=0.001)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    assert record.feedback_results[fb].status is FeedbackStatus.DONE
    assert calls[1] - calls[0] >= 0.29  # not the 1 ms backoff


@pytest.mark.parametrize("error", ["RemoteProtocolError", "ReadError", "ConnectError"])
def test_dropped_httpx_connections_are_retried(session: Session, error: str) -> None:
    """Clients that let httpx's errors through (Ollama's, for one): a server that closed
    the connection under load failed the result at once."""
    httpx = pytest.importorskip("httpx")
    dropped = getattr(httpx, error)("Server disconnected without sending a response.")
    judge = LLMJudge(failing_model(1, dropped, answer="6"), retries=1, backoff=0.001)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert (result.status, result.result, result.attempts) == (FeedbackStatus.DONE, 0.6, 2)


def test_a_retry_after_pauses_the_judges_whole_rate_limit_group(session: Session) -> None:
    """A 429 is about the key the judge's calls share: the other calls kept firing into
    the hinted window (each drawing another 429 and burning its retries)."""
    calls: list[float] = []
    judge = LLMJudge(failing_model(1, RateLimited(retry_after=0.4), calls=calls),
                     retries=1, backoff=0.001, rate_limit=RateLimit(per_minute=6000))
    fb = Feedback(judge.coherence).on_output()
    records = run(session, [fb], 8)
    assert statuses(records, fb) == {FeedbackStatus.DONE}
    refused_at = calls[0]
    later = [t - refused_at for t in calls[1:]]
    assert len(later) == 8  # one retry and seven first calls, none refused
    # Nobody called into the window but a call that had passed the group's gate before the
    # 429 (a loaded machine delays a call between its permit and the model, so the refused
    # one may have been the later of two): without the pause all seven fire into it, 10 ms
    # apart.
    assert sum(t < 0.39 for t in later) <= 2, later


def test_an_http_date_retry_after_is_honoured() -> None:
    import email.utils

    from scrutiny.core._evaluate import retry_after_seconds

    in_two = email.utils.formatdate(time.time() + 2, usegmt=True)
    assert 1.0 <= (retry_after_seconds(in_two) or 0) <= 2.0
    assert retry_after_seconds("Thu, 01 Jan 2015 00:00:00 GMT") == 0.0
    assert retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds("soon") is None


def test_other_errors_are_not_retried(session: Session) -> None:
    calls: list[float] = []
    judge = LLMJudge(failing_model(99, ValueError("invalid api key"), calls=calls),
                     retries=3, backoff=0.01)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert (result.attempts, len(calls)) == (1, 1)
    assert "invalid api key" in (result.error or "")


def test_a_judge_that_never_answers_times_out_per_attempt(session: Session) -> None:
    calls: list[float] = []

    async def hang(messages: Any) -> str:
        calls.append(time.monotonic())
        await asyncio.Event().wait()
        return "never"

    judge = LLMJudge(RunnableLambda(hang), timeout=0.2, retries=1, backoff=0.01)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "timed out after 0.2 s" in (result.error or "")
    assert (result.attempts, len(calls)) == (2, 2)


def test_a_llamaindex_custom_llm_that_blocks_times_out_without_freezing_the_rest(
        session: Session) -> None:
    """A LlamaIndex CustomLLM's inherited async methods call its sync ones on the event
    loop: a stuck call froze every evaluation of the session and its own timeout could not
    fire. The judge runs such a model's sync call on a thread."""
    from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
    from llama_index.core.llms.custom import CustomLLM

    released = threading.Event()

    class Stuck(CustomLLM):  # a typical community LLM: sync methods only
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata()

        def complete(self, prompt: str, formatted: bool = False,
                     **kwargs: Any) -> CompletionResponse:
            released.wait(20)
            return CompletionResponse(text="8")

        def stream_complete(self, prompt: str, formatted: bool = False,
                            **kwargs: Any) -> Any:
            raise NotImplementedError

    judge = LLMJudge(Stuck(), timeout=0.3, retries=0)
    slow = Feedback(judge.coherence).on_output()
    quick = Feedback(lambda output: 1.0, name="quick").on_output()
    try:
        stuck_record = session.ingest(make_record(0), [slow])
        other = session.ingest(make_record(1), [quick])
        assert other.wait_for_feedback_results(timeout=10)[quick].status is \
            FeedbackStatus.DONE
        result = stuck_record.wait_for_feedback_results(timeout=10)[slow]
        assert not released.is_set()  # ended by its timeout, not by the call returning
    finally:
        released.set()
    assert result.status is FeedbackStatus.FAILED
    assert "timed out after 0.3 s" in (result.error or "")


def test_a_judge_that_never_answers_stops_at_its_overall_deadline(session: Session) -> None:
    """Per-attempt timeouts alone let one result take attempts x timeout (8 minutes with
    the defaults): the deadline bounds all attempts together."""
    calls: list[float] = []

    async def hang(messages: Any) -> str:
        calls.append(time.monotonic())
        await asyncio.Event().wait()
        return "never"

    judge = LLMJudge(RunnableLambda(hang), timeout=0.3, retries=10, backoff=0.01,
                     deadline=0.5)
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.FAILED
    assert len(calls) == 2  # 0.3 s, then what was left of the 0.5 s
    assert "timed out" in (result.error or "")
    assert result.ended_at is not None
    assert result.started_at is not None
    assert (result.ended_at - result.started_at).total_seconds() < 0.5 + 0.3


def test_a_full_retry_policy_replaces_the_default(session: Session) -> None:
    policy = RetryPolicy(attempts=2, initial_backoff=0.01, retry_on=(ValueError,))
    judge = LLMJudge(failing_model(1, ValueError("flaky")), retry=policy)
    fb = Feedback(judge.coherence).on_output()
    assert fb.retry is policy
    (record,) = run(session, [fb], 1)
    assert record.feedback_results[fb].status is FeedbackStatus.DONE


def test_transient_classification_follows_status_codes_and_names() -> None:
    from scrutiny.providers._models import is_transient, retry_after_hint

    class APITimeoutError(Exception):
        pass

    class BadRequestError(Exception):
        status_code = 400

    class Response:
        status_code = 503
        headers: ClassVar[dict[str, str]] = {"retry-after": "2"}

    class HTTPError(Exception):
        response = Response()

    assert is_transient(RateLimited())
    assert is_transient(APITimeoutError())
    assert is_transient(TimeoutError())
    assert is_transient(HTTPError())
    assert not is_transient(BadRequestError())
    assert not is_transient(ValueError())
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = RateLimited(retry_after=4)
    assert is_transient(wrapped)
    assert retry_after_hint(wrapped) == 4.0
    assert retry_after_hint(HTTPError()) == 2.0
    assert TransientJudgeError("x", retry_after=1.5).retry_after == 1.5

    class OutOfCredit(RateLimited):  # (openai.RateLimitError for an account out of credit)
        code = "insufficient_quota"
        body: ClassVar[dict[str, Any]] = {"error": {"code": "insufficient_quota"}}

    assert not is_transient(OutOfCredit())  # (it was retried 4 times: no wait ends it)
    quota_text = RuntimeError("Error code: 429 - You exceeded your current quota, please "
                              "check your plan and billing details.")
    assert not is_transient(quota_text)


def test_bedrock_throttling_is_transient_though_its_class_is_a_generic_client_error() -> None:
    """botocore raises one ClientError class for every service error; throttling is in its
    response dict (error code and HTTP status): it was not retried."""
    from scrutiny.providers._models import is_transient

    class ClientError(Exception):  # (botocore.exceptions.ClientError's shape)
        def __init__(self, code: str, status: int) -> None:
            super().__init__(f"An error occurred ({code})")
            self.response = {"Error": {"Code": code, "Message": "..."},
                              "ResponseMetadata": {"HTTPStatusCode": status}}

    assert is_transient(ClientError("ThrottlingException", 400))
    assert is_transient(ClientError("ServiceUnavailableException", 503))
    assert is_transient(ClientError("ModelNotReadyException", 429))
    assert not is_transient(ClientError("ValidationException", 400))
    assert not is_transient(ClientError("AccessDeniedException", 403))
    wrapped = ValueError("Error raised by bedrock service")
    wrapped.__cause__ = ClientError("ThrottlingException", 400)
    assert is_transient(wrapped)


# ---------------------------------------------------------------------------- budget
def test_over_budget_prompts_are_truncated_with_a_notice(session: Session) -> None:
    log = CallLog()
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 4, "reasons": "rambling"}'],
                                       callbacks=[log]), max_prompt_tokens=400)
    fb = Feedback(judge.conciseness).on_output()
    long_answer = "Paris is the capital of France. " * 2000  # ~16k tokens
    (record,) = run(session, [fb], 1, output=long_answer)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.result == pytest.approx(0.4)
    explanation = result.explanation or ""
    assert explanation.startswith("[NOTICE: the judge prompt is too large")
    assert "max_prompt_tokens=400" in explanation
    assert "rambling" in explanation
    (prompt,) = log.prompts
    assert len(prompt) <= 400 * 4  # within the budget (about 4 characters per token)
    assert "truncated by Scrutiny" in prompt


def test_over_budget_prompts_can_be_skipped_instead(session: Session) -> None:
    log = CallLog()
    judge = LLMJudge(FakeListChatModel(responses=["5"], callbacks=[log]),
                     max_prompt_tokens=400, on_over_budget="skip")
    fb = Feedback(judge.conciseness).on_output()
    (record,) = run(session, [fb], 1, output="word " * 5000)
    result = record.feedback_results[fb]
    assert result.status is FeedbackStatus.SKIPPED
    assert result.result is None
    assert "too large" in (result.error or "")
    assert log.prompts == []  # the model was never called
    df, _ = session.get_records_and_feedback()
    assert list(df["conciseness status"]) == ["skipped"]


def test_a_custom_token_counter_sets_the_budget(session: Session) -> None:
    log = CallLog()
    judge = LLMJudge(FakeListChatModel(responses=["5"], callbacks=[log]),
                     max_prompt_tokens=300, count_tokens=lambda text: len(text.split()))
    fb = Feedback(judge.coherence).on_output()
    (record,) = run(session, [fb], 1, output="Paris " * 1000)
    assert record.feedback_results[fb].status is FeedbackStatus.DONE
    (prompt,) = log.prompts
    assert len(prompt.split()) <= 300


def test_blocking_model_calls_that_hang_do_not_starve_later_judge_calls() -> None:
    """LangChain runs a sync-only chat model's `_generate` on the evaluation loop's
    executor. Calls hung on a dead connection kept its threads after their evaluations
    timed out: with max_concurrency=2, two hung calls and every later judge result failed
    "timed out", without the (recovered) model ever being called again."""
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    release = threading.Event()

    class HangsTwice(BaseChatModel):
        calls: int = 0

        @property
        def _llm_type(self) -> str:
            return "hangs-twice"

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:
            self.calls += 1
            if self.calls <= 2:
                assert release.wait(30)  # (a request stuck on a dead connection)
            answer = AIMessage(content='{"score": 8, "reasons": "ok"}')
            return ChatResult(generations=[ChatGeneration(message=answer)])

    model = HangsTwice()
    judge = LLMJudge(model, timeout=0.5, retries=0)
    fb = Feedback(judge.answer_relevance).on_input_output()
    with Session("memory://", max_concurrency=2) as session:
        try:
            hung = [session.ingest(Record(app_name="h", app_version="v1", input=f"q{i}?",
                                          output="a."), [fb]) for i in range(2)]
            for record in hung:
                assert record.wait_for_feedback_results(timeout=20)[fb].status is \
                    FeedbackStatus.FAILED
            later = [session.ingest(Record(app_name="h", app_version="v1",
                                           input=f"later {i}?", output="a."), [fb])
                     for i in range(3)]
            for record in later:
                result = record.wait_for_feedback_results(timeout=20)[fb]
                assert (result.status, result.result) == (FeedbackStatus.DONE, 0.8), result
            assert model.calls == 5
        finally:
            release.set()


def test_a_judge_awaited_directly_applies_its_own_retries_and_timeout() -> None:
    """The README scores a dataset by awaiting judges directly (asyncio.gather). There a
    429 with Retry-After reached the caller at once, though the judge had retries=3, and a
    hung model was awaited for ever, though it had timeout=0.3 and deadline=1.0."""
    from scrutiny import FeedbackTimeout
    from scrutiny.providers import TransientJudgeError

    calls: list[float] = []
    judge = LLMJudge(failing_model(2, RateLimited(retry_after=0.2), calls=calls), retries=3,
                     backoff=0.001)
    assert asyncio.run(judge.coherence("A clear text."))[0] == pytest.approx(0.7)
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.19  # (the hint honoured)

    calls.clear()
    judge = LLMJudge(failing_model(99, RateLimited, calls=calls), retries=1, backoff=0.001)
    with pytest.raises(TransientJudgeError):
        asyncio.run(judge.coherence("A clear text."))
    assert len(calls) == 2  # (the budget: one retry)

    async def hangs(messages: Any) -> str:
        await asyncio.sleep(3600)
        return "7"

    judge = LLMJudge(RunnableLambda(hangs), timeout=0.3, retries=5, backoff=0.001,
                     deadline=1.0)

    async def awaited() -> float:
        began = time.monotonic()
        with pytest.raises(FeedbackTimeout):
            await asyncio.wait_for(judge.coherence("A clear text."), 20)
        return time.monotonic() - began

    assert asyncio.run(awaited()) < 5  # (attempts of 0.3 s within the 1 s deadline)
