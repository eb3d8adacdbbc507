"""Provider usage as LlamaIndex models hand it on (their raw response), read as billed: the
prompt-cache tokens of Anthropic, the thinking of Gemini, Bedrock Converse's spelling; the
same reading for a judge over such a model (its result's cost)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from scrutiny.providers import LLMJudge
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401

WAIT = 30.0

# (the raw response as the provider's LlamaIndex integration hands it on, the counts billed)
RAW: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "anthropic": ({"usage": {"input_tokens": 8, "output_tokens": 4,
                             "cache_read_input_tokens": 1800,
                             "cache_creation_input_tokens": 200}}, (2008, 4, 2012)),
    "gemini": ({"usage_metadata": {"prompt_token_count": 40, "candidates_token_count": 4,
                                   "thoughts_token_count": 20, "total_token_count": 64}},
               (40, 24, 64)),
    "bedrock-converse": ({"usage": {"inputTokens": 40, "outputTokens": 4,
                                    "totalTokens": 44}}, (40, 4, 44)),
}


class Provider(CustomLLM):
    """A model answering with the raw response of one provider."""

    kind: str

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.kind)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return CompletionResponse(text="Score: 7", raw=RAW[self.kind][0])

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


@pytest.mark.parametrize("kind", list(RAW))
def test_a_recorded_call_counts_the_tokens_the_provider_bills(session: Session,
                                                              kind: str) -> None:
    llm = Provider(kind=kind)
    with LlamaIndexRecorder(llm, app_name=kind, session=session) as recording:
        llm.complete("q")
    usage = recording.get().usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == RAW[kind][1]


@pytest.mark.parametrize("kind", list(RAW))
def test_a_judge_over_such_a_model_costs_the_tokens_billed(session: Session,
                                                            kind: str) -> None:
    judge = Feedback(LLMJudge(Provider(kind=kind)).answer_relevance).on_input_output()
    record = session.ingest(Record(app_name="judged", app_version="v", input="q",
                                   output="a"), [judge])
    result = record.wait_for_feedback_results(timeout=WAIT)[judge]
    assert result.status == FeedbackStatus.DONE
    prompt, completion, total = RAW[kind][1]
    assert result.cost == {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": total}


def test_usage_in_a_spelling_not_read_falls_back_to_the_extra_fields(
        session: Session) -> None:
    """A `usage` key holding nothing readable is no "reported none": the counts some
    integrations put in the response's extra fields are read."""

    class Extra(Provider):
        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            return CompletionResponse(text="ok", raw={"usage": {"units": 3}},
                                      additional_kwargs={"prompt_tokens": 3,
                                                         "completion_tokens": 2,
                                                         "total_tokens": 5})

    llm = Extra(kind="other")
    with LlamaIndexRecorder(llm, session=session) as recording:
        llm.complete("q")
    usage = recording.get().usage
    assert usage is not None
    assert usage.total_tokens == 5
