"""Token usage counted once: a response's n choices, a completion LLM's batch, a model that
wraps another, and an LLM judge's cost when its feedback runs on an external executor."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import CallbackManager
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult

from scrutiny import Feedback, FeedbackStatus, Record, Session
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
