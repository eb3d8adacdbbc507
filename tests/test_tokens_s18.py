"""Token usage counted once: a response's n choices, a completion LLM's batch, a model that
wraps another, and an LLM judge's cost when its feedback runs on an external executor."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import CallbackManager
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult

from scrutiny import (
    Feedback,
    FeedbackStatus,
    InvalidFeedbackValue,
    Record,
    RetryPolicy,
    Select,
    Session,
)
from scrutiny.integrations.langchain import ChainRecorder
from scrutiny.providers import LLMJudge


class ChoicesModel(BaseChatModel):
    """An OpenAI-compatible chat model asked for `n` answers: one response, its usage (for
    all the choices) on every choice's message, as langchain-openai's _create_chat_result
    puts it, and in llm_output."""

    n: int = 2
    reply: str = "Score: 8"

    @property
    def _llm_type(self) -> str:
        return "choices"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        usage = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}
        generations = [ChatGeneration(
            message=AIMessage(content=self.reply, usage_metadata=usage,  # type: ignore[arg-type]
                              response_metadata={"model_name": "gpt-x"}),
            generation_info={"finish_reason": "stop"}) for _ in range(self.n)]
        return ChatResult(generations=generations, llm_output={
            "token_usage": {"prompt_tokens": 100, "completion_tokens": 20,
                            "total_tokens": 120}, "model_name": "gpt-x"})


def test_a_chat_model_asked_for_n_answers_counts_its_response_once(session: Session) -> None:
    model = ChoicesModel()
    with ChainRecorder(model, app_name="n2", session=session) as recording:
        model.invoke("q")
    record = recording.get()
    assert record.usage is not None
    assert record.usage.as_dict() == {"prompt_tokens": 100, "completion_tokens": 20,
                                      "total_tokens": 120}  # (was 200 / 40 / 240)
    (span,) = record.spans_of_kind("chat_model")
    assert span.usage == record.usage


def test_a_judge_asked_for_n_answers_costs_one_response(session: Session) -> None:
    # (a binding is read through the judge's callback collector, as any runnable)
    judge = LLMJudge(ChoicesModel().bind(temperature=0))
    fb = Feedback(judge.coherence).on_output()
    record = session.ingest(Record(app_name="a", app_version="v", input="q", output="a"), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.DONE, result.error
    assert result.cost == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


class BatchLLM(BaseLLM):
    """A completion LLM answering a whole batch in one call, its usage under `key`."""

    key: str = "usage"

    @property
    def _llm_type(self) -> str:
        return "batch"

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> LLMResult:
        n = len(prompts)
        return LLMResult(generations=[[Generation(text="x")] for _ in prompts],
                         llm_output={self.key: {"input_tokens": 10 * n,
                                                "output_tokens": 2 * n}})


@pytest.mark.parametrize("key", ["usage", "token_usage"])
def test_a_completion_llms_batch_counts_its_one_call_once(session: Session, key: str) -> None:
    """LangChain empties `token_usage` on every prompt's run but the first; `usage`
    (Anthropic's name) it leaves as it is: each of 3 records had the batch's 36 tokens."""
    llm = BatchLLM(key=key)
    with ChainRecorder(llm, app_name=key, session=session) as recording:
        llm.batch(["a", "b", "c"])
    totals = [r.usage.total_tokens if r.usage else None for r in recording.records]
    assert totals == [36, None, None]  # the batch's call, on its first prompt's record


class CachedLLM(BaseLLM):
    """A completion LLM reporting usage as Anthropic's API does (cache reads apart)."""

    @property
    def _llm_type(self) -> str:
        return "cached"

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> LLMResult:
        return LLMResult(generations=[[Generation(text="x")]], llm_output={"usage": {
            "input_tokens": 8, "cache_read_input_tokens": 1800,
            "cache_creation_input_tokens": 200, "output_tokens": 4}})


def test_a_legacy_usage_counts_the_prompt_cache(session: Session) -> None:
    """`llm_output["usage"]` was read with OpenAI's and Anthropic's plain keys only: the
    2,000 prompt tokens read from or written to Anthropic's cache were left out."""
    llm = CachedLLM()
    with ChainRecorder(llm, app_name="cached", session=session) as recording:
        llm.invoke("a")
    usage = recording.get().usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (2008, 4, 2012)


class Inner(BaseChatModel):
    usage: dict[str, int] | None = None

    @property
    def _llm_type(self) -> str:
        return "inner"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            content="hi", usage_metadata=self.usage))])  # type: ignore[arg-type]


class Wrapper(BaseChatModel):
    """A router / guard model that hands the call on to another one, as its child run."""

    inner: Inner
    own_usage: dict[str, int] | None = None

    @property
    def _llm_type(self) -> str:
        return "wrapper"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        assert run_manager is not None
        child = CallbackManager(handlers=run_manager.handlers,
                                inheritable_handlers=run_manager.inheritable_handlers,
                                parent_run_id=run_manager.run_id)
        message = self.inner.invoke(messages, config={"callbacks": child})
        if self.own_usage is not None:
            message = AIMessage(content=message.content,
                                usage_metadata=self.own_usage)  # type: ignore[arg-type]
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_a_model_wrapping_another_counts_the_one_call_once(session: Session) -> None:
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    model = Wrapper(inner=Inner(usage=usage))
    with ChainRecorder(model, app_name="wrap", session=session) as recording:
        model.invoke("q")
    record = recording.get()
    assert [s.usage.total_tokens if s.usage else None
            for s in record.spans_of_kind("chat_model")] == [15, 15]  # each span as reported
    assert record.usage is not None
    assert record.usage.total_tokens == 15  # (was 30)
    # an inner model that reported nothing: the wrapper's own report is the call's
    quiet = Wrapper(inner=Inner(), own_usage=usage)
    with ChainRecorder(quiet, app_name="wrap", session=session) as recording:
        quiet.invoke("q")
    assert recording.get().usage is not None
    assert recording.get().usage.total_tokens == 15  # type: ignore[union-attr]


JUDGE_CALL = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}


class JudgeModel(BaseChatModel):
    """A judge reporting 100 tokens in and 10 out per call (at module level: a process
    worker imports it)."""

    reply: str = "Score: 8\nReasons: fine"

    @property
    def _llm_type(self) -> str:
        return "judge"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            content=self.reply, usage_metadata={  # type: ignore[arg-type]
                "input_tokens": 100, "output_tokens": 10, "total_tokens": 110}))])


def _judge_on(executor: concurrent.futures.Executor, tmp_path: Any) -> dict[str, Any]:
    """An LLM judge's results, its feedbacks run on `executor`: one call per context (3),
    and an unreadable reply tried twice."""
    relevance = Feedback(LLMJudge(JudgeModel()).context_relevance).on(
        question=Select.input, context=Select.contexts)
    unreadable = Feedback(LLMJudge(JudgeModel(reply="I think it is good")).coherence,
                          retry=RetryPolicy(attempts=2, initial_backoff=0.01,
                                            retry_on=(InvalidFeedbackValue,),
                                            never_retry_on=())).on_output()
    with Session(f"sqlite:///{tmp_path}/exec.sqlite", executor=executor) as s:
        record = s.ingest(Record(app_name="a", app_version="v1", input="q?", output="ans",
                                 contexts=["c1", "c2", "c3"]), [relevance, unreadable])
        results = record.wait_for_feedback_results(timeout=120)
        stored = s.get_record(record.record_id)
    assert stored is not None
    assert {r.feedback_name: r.cost for r in stored.feedback_results.values()} == {
        r.feedback_name: r.cost for r in results.values()}
    return {"relevance": results[relevance], "unreadable": results[unreadable]}


def _assert_costs(results: dict[str, Any]) -> None:
    relevance, unreadable = results["relevance"], results["unreadable"]
    assert relevance.status is FeedbackStatus.DONE, relevance.error
    assert relevance.cost == {k: 3 * v for k, v in JUDGE_CALL.items()}  # (was None)
    # a reply that could not be read was paid for all the same, each attempt
    assert (unreadable.status, unreadable.attempts) == (FeedbackStatus.FAILED, 2)
    assert unreadable.cost == {k: 2 * v for k, v in JUDGE_CALL.items()}


def test_a_judges_cost_comes_back_from_a_thread_pool_executor(tmp_path: Any) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        _assert_costs(_judge_on(executor, tmp_path))


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.timeout(180)
def test_a_judges_cost_comes_back_from_a_dask_worker_process(dask_client: Any,
                                                             tmp_path: Any) -> None:
    """The README's recipe, Session(executor=client.get_executor()): the cost is reported
    in the worker's process, and comes back with the value (or the error)."""
    _assert_costs(_judge_on(dask_client.get_executor(), tmp_path))
