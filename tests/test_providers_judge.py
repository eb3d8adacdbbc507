"""LLMJudge over real LangChain and LlamaIndex models with scripted answers.

Every evaluation goes through a real `Session` (SQLite in tmp_path) with `session.ingest`,
the path recorders take, unless a test is about calling the judge directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import pytest

from scrutiny import (
    ConfigurationError,
    Feedback,
    FeedbackResult,
    FeedbackStatus,
    RateLimit,
    Record,
    Select,
    Session,
)
from scrutiny.providers import LLMJudge, TransientJudgeError, rag_triad

pytest.importorskip("langchain_core")
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import (
    FakeListChatModel,
    FakeListLLM,
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import Generation, LLMResult
from pydantic import BaseModel

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
CONTEXTS = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
METHODS = ("answer_relevance", "context_relevance", "groundedness", "correctness",
           "coherence", "conciseness", "harmfulness")


def make_record(i: int = 0, *, output: str = ANSWER, contexts: Sequence[str] = CONTEXTS,
                question: str = QUESTION) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=question, output=output,
                  contexts=list(contexts), metadata={"expected": "Paris."},
                  start_time=now, end_time=now)


class UsageReportingLLM(FakeListLLM):
    """A LangChain completion LLM that reports token usage and finish reasons the way
    OpenAI's completion models do: in the LLMResult, not in the string it returns."""

    finish_reason: str = "stop"

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> LLMResult:
        texts = [self._call(p, stop=stop, **kwargs) for p in prompts]
        return LLMResult(
            generations=[[Generation(text=t, generation_info={
                "finish_reason": self.finish_reason})] for t in texts],
            llm_output={"token_usage": {"prompt_tokens": 100, "completion_tokens": 5,
                                        "total_tokens": 105}})

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: Any = None, **kwargs: Any) -> LLMResult:
        return self._generate(prompts, stop=stop, **kwargs)


def all_feedbacks(judge: LLMJudge) -> list[Feedback]:
    """Every judge method, wired the way its docs say."""
    return [
        Feedback(judge.answer_relevance).on_input_output(),
        Feedback(judge.context_relevance).on(question=Select.input, context=Select.contexts),
        Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                        answer=Select.output),
        Feedback(judge.correctness).on(answer=Select.output,
                                       expected=Select.metadata("expected")),
        Feedback(judge.coherence).on_output(),
        Feedback(judge.conciseness).on_output(),
        Feedback(judge.harmfulness).on_output(),
    ]


def evaluate(session: Session, feedbacks: Sequence[Feedback], record: Record | None = None,
             timeout: float = 30) -> dict[str, FeedbackResult]:
    record = record or make_record()
    session.ingest(record, feedbacks)
    results = record.wait_for_feedback_results(timeout=timeout)
    return {fb.name: res for fb, res in results.items()}


class Prompts(BaseCallbackHandler):
    """Keeps the prompt text of every chat-model call it sees."""

    run_inline = True

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.prompts.append("\n".join(str(m.content) for m in messages[0]))


# ---------------------------------------------------------------------------- parsing
def test_good_answers_score_every_criterion(session: Session) -> None:
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 8, "reasons": "fine"}']))
    results = evaluate(session, all_feedbacks(judge))
    assert sorted(results) == sorted(METHODS)
    for name, result in results.items():
        assert result.status is FeedbackStatus.DONE, (name, result.error)
        assert result.result == pytest.approx(0.8)
        assert "fine" in (result.explanation or "")
    assert len(results["context_relevance"].calls) == len(CONTEXTS)  # one call per context


@pytest.mark.parametrize(("answer", "why"), [
    ("This answer looks quite good to me.", "no score"),
    ('{"score": 7, "reasons": "The answer is on', "cut off"),
    ('{"score": 42, "reasons": "great"}', "outside the scale 0-10"),
    ('{"score": -1}', "outside the scale 0-10"),
])
def test_malformed_and_out_of_range_answers_fail_with_the_raw_text(
        session: Session, answer: str, why: str) -> None:
    judge = LLMJudge(FakeListChatModel(responses=[answer]))
    results = evaluate(session, all_feedbacks(judge))
    for name, result in results.items():
        assert result.status is FeedbackStatus.FAILED, name
        assert result.result is None  # never 0, never -1
        assert why in (result.error or ""), (name, result.error)
        assert result.attempts == 1  # an unreadable answer is not retried
        raw = [c.metadata.get("raw_value", "") for c in result.calls]
        assert any(answer[:20] in r for r in raw), (name, raw)
    df, _ = session.get_records_and_feedback()
    assert (df["harmfulness status"] == "failed").all()
    assert df["harmfulness"].isna().all()


def test_an_empty_answer_scores_zero_without_asking_and_an_empty_reference_skips(
        session: Session) -> None:
    """An app that answered "" failed its user: it scores 0 on relevance and correctness
    (so the mean shows it) with no model call; with nothing to judge against — no question,
    no expected answer — the result is skipped, and says why."""
    model = FakeListChatModel(responses=['{"score": 9, "reasons": "asked"}'] * 10)
    judge = LLMJudge(model)
    results = evaluate(session, all_feedbacks(judge), make_record(output=""))
    for name in ("answer_relevance", "correctness"):
        assert results[name].status is FeedbackStatus.DONE, (name, results[name].error)
        assert results[name].result == 0.0
        assert results[name].explanation == "the answer is empty"
    for name in ("coherence", "conciseness", "harmfulness", "groundedness"):
        assert results[name].status is FeedbackStatus.SKIPPED, name
        assert results[name].error
    assert results["context_relevance"].result == pytest.approx(0.9)  # contexts were there
    assert model.i == len(CONTEXTS)  # only context_relevance asked the model

    score, why = asyncio.run(judge.context_relevance(QUESTION, "   "))
    assert (score, why) == (0.0, "the context is empty")
    blank_expected = Feedback(judge.correctness).on(answer=Select.output,
                                                    expected=Select.metadata("expected"))
    record = make_record(1)
    record.metadata["expected"] = ""
    skipped = evaluate(session, [blank_expected], record)["correctness"]
    assert skipped.status is FeedbackStatus.SKIPPED
    assert "expected is empty" in (skipped.error or "")


def test_groundedness_judges_each_statement_and_explains(session: Session) -> None:
    verdicts = ('{"statements": [{"statement": 1, "score": 10, "reason": "stated"}, '
                '{"statement": 2, "score": 0, "reason": "not in the sources"}]}')
    judge = LLMJudge(FakeListChatModel(responses=[verdicts]))
    fb = Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                         answer=Select.output)
    record = make_record(output="Paris is the capital of France. It has 40 million cats.")
    result = evaluate(session, [fb], record)["groundedness"]
    assert result.status is FeedbackStatus.DONE
    assert result.result == pytest.approx(0.5)
    assert 'It has 40 million cats."' in (result.explanation or "")
    assert "0/10 - not in the sources" in (result.explanation or "")


def test_groundedness_fails_when_a_statement_has_no_verdict(session: Session) -> None:
    judge = LLMJudge(FakeListChatModel(
        responses=['{"statements": [{"statement": 1, "score": 10}]}']))
    fb = Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                         answer=Select.output)
    record = make_record(output="Paris is the capital. Berlin is bigger.")
    result = evaluate(session, [fb], record)["groundedness"]
    assert result.status is FeedbackStatus.FAILED
    assert "1 verdict(s) for 2 statement(s)" in (result.error or "")


def test_groundedness_budgets_only_the_statements_it_judges(session: Session) -> None:
    """A long answer (400 statements, 30 judged) counted whole against the budget: the
    sources were cut short for statements that were never sent, and the judged statements
    were checked against half a source."""
    verdicts = json.dumps({"statements": [{"statement": i, "score": 10}
                                          for i in range(1, 31)]})
    log = Prompts()
    judge = LLMJudge(FakeListChatModel(responses=[verdicts], callbacks=[log]),
                     max_prompt_tokens=4000)
    source = "Paris is the capital of France. " * 300 + "THE END OF THE SOURCE."
    answer = " ".join(f"Fact {i} is about Paris." for i in range(400))
    fb = Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                         answer=Select.output)
    result = evaluate(session, [fb], make_record(output=answer, contexts=[source]))
    grounded = result["groundedness"]
    assert grounded.status is FeedbackStatus.DONE, grounded.error
    assert grounded.result == 1.0
    (prompt,) = log.prompts
    assert "THE END OF THE SOURCE." in prompt  # the source was sent whole
    assert "truncated by Scrutiny" not in prompt
    explanation = grounded.explanation or ""
    assert "too large" not in explanation
    assert "the answer has 400 statements; only the first 30 were judged" in explanation


def test_groundedness_never_judges_a_statement_cut_in_half_by_the_budget(
        session: Session) -> None:
    """The budget cut the answer mid-sentence and the fragment was judged as a statement:
    "Paris is not" of "Paris is not the capital of Spain."."""
    import re

    from langchain_core.runnables import RunnableLambda

    prompts: list[str] = []

    def verdicts(messages: Any) -> str:
        prompt = str(messages[-1].content)
        prompts.append(prompt)
        count = int(re.search(r"with exactly (\d+) entries", prompt).group(1))  # type: ignore[union-attr]
        return json.dumps({"statements": [{"statement": i, "score": 10}
                                          for i in range(1, count + 1)]})

    sentences = [f"Fact {i}: Paris is not the capital of Spain." for i in range(40)]
    judge = LLMJudge(RunnableLambda(verdicts), max_prompt_tokens=700)
    fb = Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                         answer=Select.output)
    record = make_record(output=" ".join(sentences), contexts=["Madrid is. " * 400])
    result = evaluate(session, [fb], record)["groundedness"]
    assert result.status is FeedbackStatus.DONE, result.error
    assert "truncated before judging" in (result.explanation or "")
    (prompt,) = prompts
    judged = re.findall(r"^\d+\. (.*)$", prompt.split("<statements>")[1], re.MULTILINE)
    assert 0 < len(judged) < len(sentences)
    assert all(statement in sentences for statement in judged), judged[-1]


def test_groundedness_over_too_many_contexts_for_its_budget_says_so(session: Session) -> None:
    """60 short contexts in 1,000 tokens were skipped "as its instructions alone leave no
    room to truncate into", though the instructions took a sixth of the budget: the limit
    is the least each of the 61 texts keeps when cut."""
    contexts = [f"Document {i}: Ireland has a mild and wet climate all year round."
                for i in range(60)]
    verdict = '{"statements": [{"statement": 1, "score": 10, "reason": "stated"}]}'
    tight = LLMJudge(FakeListChatModel(responses=[verdict]), max_prompt_tokens=1000)
    record = make_record(output="Ireland is wet.", contexts=contexts)
    skipped = evaluate(session, [Feedback(tight.groundedness).on(
        contexts=Select.contexts.collect(), answer=Select.output)], record)["groundedness"]
    assert skipped.status is FeedbackStatus.SKIPPED
    reason = skipped.error or ""
    assert "instructions alone" not in reason
    assert "its 61 texts do not fit beside its instructions" in reason
    least = re.search(r"raise max_prompt_tokens to at least ([\d,]+),", reason)
    assert least, reason
    needed = int(least.group(1).replace(",", ""))  # (and that is enough)
    enough = LLMJudge(FakeListChatModel(responses=[verdict]), max_prompt_tokens=needed)
    done = evaluate(session, [Feedback(enough.groundedness).on(
        contexts=Select.contexts.collect(), answer=Select.output)],
        make_record(1, output="Ireland is wet.", contexts=contexts))["groundedness"]
    assert done.status is FeedbackStatus.DONE, done.error
    assert done.result == 1.0


def test_the_default_budget_holds_for_chinese_text(session: Session) -> None:
    """About 4 characters per token is English; a Chinese character is a token or more
    in every GPT tokenizer, and a Chinese answer ran to four times the budget."""
    log = Prompts()
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 6, "reasons": "long"}'],
                                       callbacks=[log]), max_prompt_tokens=1000)
    answer = "巴黎是法国的首都\uff0c也是法国最大的城市\u3002" * 1000  # 19,000 characters
    result = evaluate(session, [Feedback(judge.conciseness).on_output()],
                      make_record(output=answer))["conciseness"]
    assert result.status is FeedbackStatus.DONE, result.error
    assert (result.explanation or "").startswith("[NOTICE: the judge prompt is too large")
    (prompt,) = log.prompts
    chinese = sum(1 for c in prompt if "\u4e00" <= c <= "\u9fff" or c in "\uff0c\u3002")
    assert 100 < chinese <= 1000  # truncated, and at least a token each: within budget


def test_completion_llms_get_one_prompt(session: Session) -> None:
    judge = LLMJudge(FakeListLLM(responses=["Score: 3/10\nReasons: vague"]))
    result = evaluate(session, [Feedback(judge.coherence).on_output()])["coherence"]
    assert result.status is FeedbackStatus.DONE
    assert result.result == pytest.approx(0.3)
    assert result.explanation == "vague"


def test_judge_token_usage_is_stored_as_evaluation_cost(session: Session) -> None:
    usage = {"input_tokens": 120, "output_tokens": 9, "total_tokens": 129}
    model = GenericFakeChatModel(messages=iter(
        [AIMessage(content='{"score": 6, "reasons": "ok"}', usage_metadata=usage)] * 3))
    judge = LLMJudge(model)
    record = make_record()
    result = evaluate(session, [Feedback(judge.context_relevance).on(
        question=Select.input, context=Select.contexts)], record)["context_relevance"]
    assert result.status is FeedbackStatus.DONE
    # two contexts, two judge calls: their usage adds up on the result
    assert result.cost == {"prompt_tokens": 240, "completion_tokens": 18, "total_tokens": 258}
    assert record.usage is None  # the app's own usage is untouched
    stored = session.get_record(record.record_id)
    assert stored is not None
    (stored_result,) = stored.feedback_results.values()
    assert stored_result.cost == result.cost


def test_a_completion_llms_token_usage_is_stored_as_evaluation_cost(session: Session) -> None:
    """A LangChain LLM returns a bare string: its usage is only in the call's LLMResult
    (`llm_output["token_usage"]`, as OpenAI's completion models report it), and was lost."""
    judge = LLMJudge(UsageReportingLLM(responses=["Score: 7\nReasons: clear"]))
    result = evaluate(session, [Feedback(judge.coherence).on_output()])["coherence"]
    assert result.status is FeedbackStatus.DONE, result.error
    assert result.result == pytest.approx(0.7)
    assert result.cost == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}


@pytest.mark.parametrize("metadata", [
    {"finish_reason": "length"},          # OpenAI
    {"stop_reason": "max_tokens"},        # Anthropic
    {"done_reason": "length"},            # Ollama
    {"finish_reason": "MAX_TOKENS"},      # Gemini
])
def test_a_cut_off_answer_fails_even_when_a_score_can_be_read(
        session: Session, metadata: dict[str, str]) -> None:
    """The model stopped at its output limit after "Score: 7": what it did not write (a
    second thought, the JSON it was asked for) might have changed the verdict."""
    answer = "Score: 7\nReasons: the answer names the capital but then"
    model = GenericFakeChatModel(messages=iter(
        [AIMessage(content=answer, response_metadata=metadata)] * 3))
    result = evaluate(session, [Feedback(LLMJudge(model).coherence).on_output()])["coherence"]
    assert result.status is FeedbackStatus.FAILED
    assert result.result is None
    assert "cut off" in (result.error or "")
    assert repr(answer) in result.calls[0].metadata.get("raw_value", "")  # kept whole


def test_a_cut_off_completion_llm_answer_fails(session: Session) -> None:
    judge = LLMJudge(UsageReportingLLM(responses=["Score: 7\nReasons: the"],
                                       finish_reason="length"))
    result = evaluate(session, [Feedback(judge.coherence).on_output()])["coherence"]
    assert result.status is FeedbackStatus.FAILED
    assert "cut off" in (result.error or "")
    assert result.cost is not None  # the tokens were spent all the same


def test_models_without_usage_give_no_cost(session: Session) -> None:
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 6}']))
    result = evaluate(session, [Feedback(judge.coherence).on_output()])["coherence"]
    assert result.status is FeedbackStatus.DONE
    assert result.cost is None  # not a cost of 0


class ToolCallingFake(FakeMessagesListChatModel):
    """Answers with the scripted messages; takes tools as a real chat model does (what
    `with_structured_output` needs)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=tools, **kwargs)


class Verdict(BaseModel):
    score: int
    reasons: str


@pytest.mark.parametrize("answer", [
    AIMessage(content="", additional_kwargs={"refusal": "I cannot evaluate this."}),
    AIMessage(content=[{"type": "refusal", "refusal": "I cannot evaluate this."}]),
    AIMessage(content=[], response_metadata={"stop_reason": "refusal"}),
])
def test_a_judge_models_refusal_is_the_reason(session: Session, answer: AIMessage) -> None:
    """OpenAI's and Anthropic's refusals carry no text: they failed as "the judge gave an
    empty answer", the refusal dropped."""
    judge = LLMJudge(FakeMessagesListChatModel(responses=[answer]))
    result = evaluate(session, [Feedback(judge.harmfulness).on_output()])["harmfulness"]
    assert result.status is FeedbackStatus.FAILED
    assert "the judge model refused to judge: " in (result.error or "")
    assert "I cannot evaluate this." in (result.error or "") or "'refusal'" in (
        result.error or "")


def test_a_verdict_given_as_a_tool_call_or_structured_output_is_read(
        session: Session) -> None:
    """A model bound to a verdict tool answers with the tool call alone ("the judge gave
    an empty answer"), and model.with_structured_output(Verdict) returns the model ("judge
    model RunnableSequence returned a Verdict, not text", its tokens lost)."""
    call = AIMessage(content="", tool_calls=[{"name": "Verdict", "id": "c1",
                                              "args": {"score": 8, "reasons": "on topic"}}],
                     usage_metadata={"input_tokens": 50, "output_tokens": 10,
                                     "total_tokens": 60})
    tool_judge = LLMJudge(ToolCallingFake(responses=[call]).bind_tools([Verdict]))
    structured = ToolCallingFake(responses=[call]).with_structured_output(Verdict)
    typed_judge = LLMJudge(structured)
    assert typed_judge.model_name == "ToolCallingFake"
    for judge in (tool_judge, typed_judge):
        result = evaluate(session, [Feedback(judge.coherence).on_output()])["coherence"]
        assert (result.status, result.result) == (FeedbackStatus.DONE, 0.8), result
        assert result.explanation == "on topic"
    assert result.cost == {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}


# ---------------------------------------------------------------------------- LlamaIndex
def test_llama_index_llm_with_scripted_answers(session: Session) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage, MessageRole
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    seen: list[list[Any]] = []

    def answer(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        seen.append(list(messages))
        return ChatMessage(role=MessageRole.ASSISTANT,
                           content='{"score": 9, "reasons": "directly answers"}')

    judge = LLMJudge(MockFunctionCallingLLM(response_generator=answer))
    results = evaluate(session, all_feedbacks(judge))
    for name, result in results.items():
        assert result.status is FeedbackStatus.DONE, (name, result.error)
        assert result.result == pytest.approx(0.9)
    assert seen
    assert all(m[0].role == MessageRole.SYSTEM for m in seen)
    assert all(m[1].role == MessageRole.USER for m in seen)


def test_a_llama_index_answer_cut_off_by_the_sdk_fails(session: Session) -> None:
    """LlamaIndex's OpenAI LLM keeps the SDK's response object as `raw` (not a dict): its
    `choices[0].finish_reason` of "length" went unseen and the cut answer was scored."""
    pytest.importorskip("llama_index.core")
    from types import SimpleNamespace

    from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    class SDKBacked(MockFunctionCallingLLM):
        async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
            completion = SimpleNamespace(  # the shape of openai's ChatCompletion
                choices=[SimpleNamespace(finish_reason="length")],
                usage=SimpleNamespace(prompt_tokens=50, completion_tokens=8, total_tokens=58))
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT,
                                                    content="Score: 8\nReasons: it"),
                                raw=completion)

    result = evaluate(session, [Feedback(LLMJudge(SDKBacked()).coherence).on_output()])
    coherence = result["coherence"]
    assert coherence.status is FeedbackStatus.FAILED
    assert "cut off" in (coherence.error or "")
    assert coherence.cost == {"prompt_tokens": 50, "completion_tokens": 8, "total_tokens": 58}


def test_a_llama_index_gemini_answers_usage_is_its_cost(session: Session) -> None:
    """LlamaIndex's Gemini LLMs keep the token counts under `raw["usage_metadata"]`
    (prompt_token_count, candidates_token_count): they were not read, so cost was None."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    class GeminiShaped(MockFunctionCallingLLM):
        async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
            return ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT,
                                    content='{"score": 7, "reasons": "clear"}'),
                raw={"usage_metadata": {"prompt_token_count": 41,
                                        "candidates_token_count": 9,
                                        "total_token_count": 50}})

    result = evaluate(session, [Feedback(LLMJudge(GeminiShaped()).coherence).on_output()])
    coherence = result["coherence"]
    assert coherence.status is FeedbackStatus.DONE, coherence.error
    assert coherence.cost == {"prompt_tokens": 41, "completion_tokens": 9, "total_tokens": 50}


@pytest.mark.parametrize("max_tokens", [None, 5])
def test_llama_index_mock_llm_answers_are_never_scored(session: Session,
                                                       max_tokens: int | None) -> None:
    """MockLLM echoes the prompt (or says "text text ..."): no score may be read from it."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import MockLLM

    judge = LLMJudge(MockLLM(max_tokens=max_tokens))
    results = evaluate(session, all_feedbacks(judge))
    for name, result in results.items():
        assert result.status is FeedbackStatus.FAILED, (name, result.result)
        assert result.result is None
        assert "InvalidFeedbackValue" in (result.error or "")


@pytest.mark.parametrize(("contexts", "answer"), [
    (["Hotel Bellevue.\nRating: 4/5"], "The hotel is good."),  # a source's rating
    (["The critics liked it."], "Score: 9/10 from the critics"),  # the statement's own
])
def test_groundedness_never_reads_a_score_out_of_an_echoed_prompt(
        session: Session, contexts: list[str], answer: str) -> None:
    """MockLLM echoes the prompt: groundedness of one statement took a source's "Rating:
    4/5" line (0.8) or the statement's "Score: 9/10" (0.9) as the judge's verdict, where
    every other criterion refused the echo."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import MockLLM

    judge = LLMJudge(MockLLM())
    fb = Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                         answer=Select.output)
    result = evaluate(session, [fb], make_record(output=answer, contexts=contexts))
    grounded = result["groundedness"]
    assert grounded.status is FeedbackStatus.FAILED, (grounded.result, grounded.explanation)
    assert "InvalidFeedbackValue" in (grounded.error or "")


# ---------------------------------------------------------------------------- structured values
@dataclasses.dataclass
class Reasoned:
    reasoning: str
    answer: str


class Structured(BaseModel):
    question: str
    answer: str
    confidence: float


STRUCTURED_ANSWERS: dict[str, Any] = {
    "retrieval_chain": {"input": QUESTION, "context": [Document(page_content=CONTEXTS[0])],
                        "answer": ANSWER},  # what create_retrieval_chain returns
    "pydantic": Structured(question=QUESTION, answer=ANSWER, confidence=0.9),
    "dataclass": Reasoned(reasoning="The first source says so.", answer=ANSWER),
    "chat_state": {"messages": [HumanMessage(QUESTION), AIMessage(ANSWER)], "step": 2},
    "graph_state": {"question": QUESTION, "documents": [Document(page_content=CONTEXTS[0])],
                    "generation": ANSWER},  # LangGraph's RAG tutorials
}


def section(prompt: str, tag: str) -> str | None:
    """The text between ``<tag>`` and ``</tag>`` in a judge prompt, or None."""
    start = prompt.find(f"<{tag}>\n")
    if start == -1:
        return None
    end = prompt.index(f"\n</{tag}>", start)
    return prompt[start + len(tag) + 3:end]


@pytest.mark.parametrize("shape", sorted(STRUCTURED_ANSWERS))
def test_a_structured_answer_reaches_the_prompt_as_its_answer_text(
        session: Session, shape: str) -> None:
    """A dict answer {"input", "context", "answer"} (or a pydantic object, a dataclass with
    more than one text) was given to the judge as its question, or as JSON of all its
    fields: answer relevance compared the question with itself, and coherence,
    conciseness, harmfulness and groundedness judged the question. An expected answer
    given as a dataset row {"question", "answer"} was its question too. The judge now
    reads them as the offline evaluators do (`as_text(..., answer=True)`)."""
    log = Prompts()
    reply = ('{"score": 8, "reasons": "fine", '
             '"statements": [{"statement": 1, "score": 8, "reason": "stated"}]}')
    judge = LLMJudge(FakeListChatModel(responses=[reply], callbacks=[log]))
    record = make_record(output=STRUCTURED_ANSWERS[shape])
    record.metadata["expected"] = {"question": QUESTION, "answer": "Paris."}
    results = evaluate(session, all_feedbacks(judge), record)
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(
        METHODS, FeedbackStatus.DONE), {n: r.error for n, r in results.items()}
    assert len(log.prompts) == len(METHODS) + len(CONTEXTS) - 1
    seen: dict[str, list[str]] = {}
    for prompt in log.prompts:
        for tag in ("question", "answer", "text", "expected", "statements", "context"):
            if (found := section(prompt, tag)) is not None:
                seen.setdefault(tag, []).append(found)
    assert seen["answer"] == [ANSWER] * 2  # answer relevance, correctness
    assert seen["text"] == [ANSWER] * 3  # coherence, conciseness, harmfulness
    assert seen["statements"] == [f"1. {ANSWER}"]  # groundedness
    assert seen["expected"] == ["Paris."]
    assert seen["question"] == [QUESTION] * (1 + len(CONTEXTS))
    assert sorted(seen["context"]) == sorted(CONTEXTS)


# ---------------------------------------------------------------------------- wiring
def test_feedback_picks_up_the_judges_options() -> None:
    limit = RateLimit(per_minute=60, max_concurrent=2)
    judge = LLMJudge(FakeListChatModel(responses=["5"]), rate_limit=limit, retries=2,
                     timeout=15.0)
    harm = Feedback(judge.harmfulness).on_output()
    assert harm.name == "harmfulness"
    assert harm.higher_is_better is False
    assert harm.retry.attempts == 3
    assert TransientJudgeError in harm.retry.retry_on
    assert harm.timeout == 15.0
    assert harm.rate_limit is not None
    assert (harm.rate_limit.per_minute, harm.rate_limit.max_concurrent) == (60, 2)
    assert harm.rate_limit.group == judge.group
    relevance = Feedback(judge.answer_relevance, name="relevance").on_input_output()
    assert (relevance.name, relevance.higher_is_better) == ("relevance", True)
    assert relevance.rate_limit == harm.rate_limit  # one budget per judge
    other = LLMJudge(FakeListChatModel(responses=["5"]), rate_limit=limit)
    assert other.group != judge.group
    shared = RateLimit(per_minute=60, group="my-api-key")
    assert LLMJudge(FakeListChatModel(responses=["5"]), rate_limit=shared).rate_limit is shared


def test_rag_triad_wires_input_contexts_and_output(session: Session) -> None:
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 10, "reasons": "yes"}']))
    triad = rag_triad(judge)
    assert [fb.name for fb in triad] == ["context_relevance", "groundedness",
                                         "answer_relevance"]
    assert triad.context_relevance.selectors == {"question": "Select.input",
                                                 "context": "Select.contexts (each)"}
    assert triad.groundedness.selectors == {"contexts": "Select.contexts.collect()",
                                            "answer": "Select.output"}
    assert triad.answer_relevance.selectors == {"question": "Select.input",
                                                "answer": "Select.output"}
    results = evaluate(session, triad)
    assert all(r.status is FeedbackStatus.DONE and r.result == 1.0 for r in results.values())
    without = evaluate(session, triad, make_record(1, contexts=[]))
    assert without["context_relevance"].status is FeedbackStatus.SKIPPED
    assert without["groundedness"].status is FeedbackStatus.SKIPPED
    assert without["answer_relevance"].status is FeedbackStatus.DONE


def test_methods_can_be_awaited_directly() -> None:
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 3, "reasons": "padded"}']))
    score, why = asyncio.run(judge.conciseness("Well, so, basically, Paris."))
    assert (score, why) == (pytest.approx(0.3), "padded")


def test_unusable_models_and_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="ainvoke"):
        LLMJudge(object())
    model = FakeListChatModel(responses=["5"])
    with pytest.raises(ConfigurationError, match="on_over_budget"):
        LLMJudge(model, on_over_budget="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        LLMJudge(model, max_prompt_tokens=0)
    with pytest.raises(ConfigurationError):
        LLMJudge(model, retries=-1)


@pytest.mark.parametrize(("option", "says"), [
    ({"rate_limit": {"per_minute": 60}}, r"rate_limit must be a RateLimit, e\.g\. "),
    ({"rate_limit": 60}, r"rate_limit must be a RateLimit"),
    ({"retry": 3}, r"retry must be a RetryPolicy.*retries=n"),
    ({"retries": "3"}, r"retries must be a whole number >= 0, got '3'"),
    ({"retries": 2.5}, r"retries must be a whole number"),
    ({"timeout": "30"}, r"timeout must be a finite number of seconds > 0"),
    ({"timeout": float("nan")}, r"timeout must be a finite number"),
    ({"backoff": "1"}, r"backoff must be a finite number of seconds >= 0"),
    ({"deadline": "300"}, r"deadline must be a finite number of seconds > 0"),
    ({"max_retry_after": -1}, r"max_retry_after must be a finite number of seconds >= 0"),
    ({"max_prompt_tokens": "8000"}, r"max_prompt_tokens must be a whole number >= 1 \(or None"),
    ({"max_statements": "30"}, r"max_statements must be a whole number >= 1"),
])
def test_an_option_of_the_wrong_type_is_refused_saying_what_to_pass(
        option: dict[str, Any], says: str) -> None:
    """rate_limit={"per_minute": 60} failed with AttributeError, retries="3" and
    timeout="30" with a bare TypeError from a comparison."""
    with pytest.raises(ConfigurationError, match=says):
        LLMJudge(FakeListChatModel(responses=["5"]), **option)


def test_count_tokens_must_be_a_function_returning_a_count(session: Session) -> None:
    """count_tokens=5 was accepted and failed every result with "'int' object is not
    callable"; a tokenizer's encode (a list of ids) with "unsupported operand type(s) for
    +: 'int' and 'list'", neither saying what to pass."""
    model = FakeListChatModel(responses=['{"score": 7, "reasons": "ok"}'])
    with pytest.raises(ConfigurationError, match=r"count_tokens must be a function .* got 5"):
        LLMJudge(model, count_tokens=5)  # type: ignore[arg-type]
    encode = LLMJudge(model, count_tokens=str.split)  # type: ignore[arg-type]
    counted = LLMJudge(model, count_tokens=lambda text: len(text.split()))
    results = evaluate(session, [Feedback(encode.coherence, name="encode").on_output(),
                                 Feedback(counted.coherence, name="counted").on_output()])
    failed = results["encode"]
    assert failed.status is FeedbackStatus.FAILED
    assert "count_tokens must return the number of tokens of a text as an int >= 0, got a " \
        "list: for a tokenizer's encode, pass count_tokens=lambda text: " \
        "len(enc.encode(text))" in (failed.error or "")
    assert results["counted"].status is FeedbackStatus.DONE, results["counted"].error
    assert results["counted"].result == pytest.approx(0.7)


def test_a_model_class_instead_of_a_model_is_refused_saying_what_to_pass() -> None:
    """LLMJudge(FakeListChatModel) was accepted (the class has `ainvoke`, unbound), and
    every result failed later: "ainvoke() missing 1 required positional argument"."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import MockLLM

    for model in (FakeListChatModel, MockLLM):
        with pytest.raises(ConfigurationError,
                           match=rf"instance, not the class {model.__name__}: .*"
                                 rf"LLMJudge\({model.__name__}\(\.\.\.\)\)"):
            LLMJudge(model)


# ---------------------------------------------------------------------------- recording
def test_judge_calls_are_not_recorded_as_app_records(
        session: Session, make_retrieval_chain: Any) -> None:
    """The judge's model even carries the app's recording handler: still one record."""
    from langchain_core.callbacks import BaseCallbackHandler

    from scrutiny.integrations.langchain import ChainRecorder

    class Calls(BaseCallbackHandler):
        run_inline = True

        def __init__(self) -> None:
            self.count = 0

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            self.count += 1

    chain = make_retrieval_chain(["Paris is the capital of France."])
    judge_model = FakeListChatModel(responses=['{"score": 9, "reasons": "ok"}'])
    judge = LLMJudge(judge_model)
    recorder = ChainRecorder(chain, app_name="rag", session=session,
                             feedbacks=rag_triad(judge))
    calls = Calls()
    judge_model.callbacks = [recorder.handler, calls]
    with recorder as recording:
        chain.invoke(QUESTION)
    record = recording.get()
    results = record.wait_for_feedback_results(timeout=30)
    assert {r.status for r in results.values()} == {FeedbackStatus.DONE}
    assert calls.count == len(record.contexts) + 2  # the judge model really ran
    assert session.wait_for_feedback(30)
    df, _ = session.get_records_and_feedback()
    assert list(df["app_name"]) == ["rag"]  # one record: the app's
    # control: called by anything but the judge, the same handler does record the model
    asyncio.run(judge_model.ainvoke("Paris."))
    df, _ = session.get_records_and_feedback()
    assert len(df) == 2


def test_a_judge_awaited_inside_a_recorder_block_is_not_recorded(session: Session) -> None:
    """An app that judges its own answer inline: the recorder records every LangChain call
    made in its block, and the judge's call became a second app record, its JSON verdict
    stored as the app's output."""
    from scrutiny.integrations.langchain import ChainRecorder

    app = FakeListChatModel(responses=["Paris."])
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 9, "reasons": "on topic"}']))
    recorder = ChainRecorder(app, app_name="self-checking", session=session)

    async def answer_and_judge() -> tuple[float, str]:
        async with recorder:
            answer = await app.ainvoke(QUESTION)
            return await judge.answer_relevance(QUESTION, answer.content)

    assert asyncio.run(answer_and_judge()) == (pytest.approx(0.9), "on topic")
    assert session.wait_for_feedback(30)
    df, _ = session.get_records_and_feedback()
    assert list(df["output"]) == ["Paris."]  # the app's call, and only it


def test_a_llama_index_judge_awaited_inside_a_recorder_block_is_not_recorded(
        session: Session) -> None:
    """The same with LlamaIndex: the app's LLM, recorded, also serves as the judge."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage, MessageRole
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    def reply(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        text = '{"score": 8, "reasons": "ok"}' if len(messages) > 1 else "Paris."
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)

    llm = MockFunctionCallingLLM(response_generator=reply)
    judge = LLMJudge(llm)
    recorder = LlamaIndexRecorder(llm, app_name="li-self-checking", session=session)

    async def answer_and_judge() -> tuple[float, str]:
        async with recorder:
            answer = await llm.achat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
            return await judge.answer_relevance(QUESTION, answer.message.content)

    assert asyncio.run(answer_and_judge()) == (pytest.approx(0.8), "ok")
    assert session.wait_for_feedback(30)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 1


def test_rag_triad_on_a_llama_index_record_with_a_llama_index_judge(session: Session) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.base.llms.types import ChatMessage, MessageRole
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.llms.mock import MockFunctionCallingLLM

    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    index = VectorStoreIndex.from_documents([Document(text=t) for t in CONTEXTS],
                                            embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=4), similarity_top_k=2)
    judge_calls: list[int] = []

    def verdict(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        judge_calls.append(1)
        return ChatMessage(role=MessageRole.ASSISTANT, content='{"score": 7, "reasons": "ok"}')

    judge = LLMJudge(MockFunctionCallingLLM(response_generator=verdict))
    recorder = LlamaIndexRecorder(engine, app_name="li-rag", session=session,
                                  feedbacks=rag_triad(judge))
    with recorder as recording:
        engine.query(QUESTION)
    record = recording.get()
    results = record.wait_for_feedback_results(timeout=30)
    assert {fb.name: r.status for fb, r in results.items()} == dict.fromkeys(
        ("context_relevance", "groundedness", "answer_relevance"), FeedbackStatus.DONE)
    assert len(judge_calls) == len(record.contexts) + 2 == 4
    assert session.wait_for_feedback(30)
    df, _ = session.get_records_and_feedback()
    assert list(df["app_name"]) == ["li-rag"]  # the judge's calls made no record


@pytest.mark.parametrize("answer", ["8\n9", "8 - 9", '{"score": 8}\n{"score": 3}', "1.0"])
def test_a_judge_giving_two_scores_a_range_or_a_0_1_top_score_fails(
        session: Session, answer: str) -> None:
    """Read as their first number, these scored 0.8 (or 0.1 for a perfect 0-1 verdict)."""
    judge = LLMJudge(FakeListChatModel(responses=[answer]))
    fbs = [Feedback(judge.answer_relevance).on_input_output(),
           Feedback(judge.groundedness).on(contexts=Select.contexts.collect(),
                                           answer=Select.output)]
    results = evaluate(session, fbs)
    for name, result in results.items():
        assert result.status is FeedbackStatus.FAILED, (name, result.result)
        assert result.result is None
        assert repr(answer) in result.calls[0].metadata.get("raw_value", ""), name


# ---------------------------------------------------------------------------- rubrics
def test_a_rubric_of_your_own_is_judged_like_the_built_in_criteria(session: Session) -> None:
    log = Prompts()
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 9, "reasons": "courteous"}'],
                                       callbacks=[log]))
    polite = judge.rubric("politeness", "Rate how polite the ANSWER is to the user. 10 "
                          "means courteous throughout; 0 means rude. {Braces} are fine.",
                          fields=("answer",))
    blunt = judge.rubric("bluntness", "Rate how blunt the ANSWER is to the QUESTION.",
                         higher_is_better=False)
    fb = Feedback(polite).on_output()
    both = Feedback(blunt).on_input_output()
    assert fb.name == "politeness"
    assert both.higher_is_better is False
    results = evaluate(session, [fb, both])
    assert results["politeness"].status is FeedbackStatus.DONE, results["politeness"].error
    assert results["politeness"].result == pytest.approx(0.9)
    assert results["politeness"].explanation == "courteous"
    assert results["bluntness"].status is FeedbackStatus.DONE, results["bluntness"].error
    polite_prompt = next(p for p in log.prompts if "polite" in p)
    assert "{Braces} are fine." in polite_prompt
    assert f"<answer>\n{ANSWER}\n</answer>" in polite_prompt
    assert "<question>" not in polite_prompt
    blunt_prompt = next(p for p in log.prompts if "blunt" in p)
    assert "<question>" in blunt_prompt
    assert "<answer>" in blunt_prompt


def test_a_rubric_whose_instructions_hold_a_score_line_never_reads_it_as_the_score(
        session: Session) -> None:
    """The judge echoing the rubric's own example line is no score of its own."""
    instructions = "Rate the ANSWER's tone. Example of a reply line:\nScore: 7"
    judge = LLMJudge(FakeListChatModel(responses=[instructions]))
    tone = judge.rubric("tone", instructions, fields=("answer",))
    result = evaluate(session, [Feedback(tone).on_output()])["tone"]
    assert result.status is FeedbackStatus.FAILED
    assert result.result is None


def test_a_rubric_with_an_empty_field_is_skipped(session: Session) -> None:
    judge = LLMJudge(FakeListChatModel(responses=['{"score": 9, "reasons": "ok"}']))
    tone = judge.rubric("tone", "Rate the ANSWER's tone.", fields=("answer",))
    result = evaluate(session, [Feedback(tone).on_output()], make_record(output=""))["tone"]
    assert result.status is FeedbackStatus.SKIPPED
    assert "empty" in (result.error or "")


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"name": " ", "instructions": "Rate it."}, "needs a name"),
    ({"name": "x", "instructions": ""}, "needs instructions"),
    ({"name": "x", "instructions": "Rate it.", "fields": ("answer", "answer")}, "distinct"),
    ({"name": "x", "instructions": "Rate it.", "fields": ("my answer",)}, "distinct"),
    ({"name": "x", "instructions": "Rate it.", "fields": ()}, "distinct"),
    ({"name": "x", "instructions": "Rate it.", "higher_is_better": "no"}, "True or False"),
])
def test_a_rubric_that_cannot_be_used_is_refused_saying_why(kwargs: dict[str, Any],
                                                            why: str) -> None:
    judge = LLMJudge(FakeListChatModel(responses=["8"]))
    with pytest.raises(ConfigurationError, match=why):
        judge.rubric(**kwargs)
