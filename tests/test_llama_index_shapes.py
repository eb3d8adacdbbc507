"""LlamaIndex app shapes beyond the basic query: every chat engine mode, sub-question and
router engines, postprocessors that drop every node, response modes, agents with tools,
streams that fail, custom models that stream asynchronously, concurrent chats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage, CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.query_engine import (
    RetrieverQueryEngine,
    RouterQueryEngine,
    SubQuestionQueryEngine,
)
from llama_index.core.question_gen import LLMQuestionGenerator
from llama_index.core.response_synthesizers.no_text import NoText
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.selectors import LLMSingleSelector
from llama_index.core.tools import FunctionTool, QueryEngineTool

from scrutiny import Feedback, FeedbackStatus, Record, RecordStatus, Select, Session, SpanKind
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401
from tests.test_llama_index_workflows import ToolThenAnswer

TEXTS = ("The sky is blue.", "Grass is green.", "Snow is white.", "Coal is black.")
WAIT = 10.0
USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
_AGENT_WARNINGS = ("ignore::pydantic.warnings.PydanticDeprecatedSince20",
                   "ignore::pydantic.warnings.PydanticDeprecatedSince211")


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                           embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(f"sqlite:///{tmp_path}/shapes.sqlite")
    yield s
    s.close(timeout=WAIT)


class Scripted(CustomLLM):
    """An offline model built the way local-model wrappers are (a `CustomLLM`: its chat and
    async calls go through `complete` / `stream_complete`), which reports token usage.

    It writes the sub-questions and router choices those engines ask for; a ReAct prompt
    gets a tool call, then (once it has the tool's observation) the answer; anything
    else gets ``"answer to <the last line of the prompt>"``.
    """

    usage: dict[str, int] | None = None

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="scripted")

    def _text(self, prompt: str) -> str:
        if "sub-questions" in prompt:
            return "```json\n" + json.dumps({"items": [
                {"sub_question": "What color is snow", "tool_name": "colors"},
                {"sub_question": "What color is coal", "tool_name": "colors"}]}) + "\n```"
        if "choice" in prompt and "reason" in prompt:
            return json.dumps([{"choice": 2, "reason": "it summarizes"}])
        if "Observation: 42" in prompt:
            return "Thought: I can answer without using any more tools.\nAnswer: It is 42."
        if "Action Input" in prompt:
            return ('Thought: I need a tool.\nAction: multiply\n'
                    'Action Input: {"a": 6, "b": 7}')
        last = [line for line in prompt.strip().splitlines() if line.strip()][-1]
        return f"answer to {last.strip()}"

    def _raw(self) -> dict[str, Any] | None:
        return {"usage": dict(self.usage)} if self.usage else None

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        return CompletionResponse(text=self._text(prompt), raw=self._raw())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        text = self._text(prompt)

        def gen() -> Any:
            words = text.split(" ")
            for i, word in enumerate(words):
                delta = word if i == 0 else " " + word
                last = i == len(words) - 1
                yield CompletionResponse(text=" ".join(words[:i + 1]), delta=delta,
                                         raw=self._raw() if last else None)

        return gen()


class Boom(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"boom {code}")
        self.code = code


class FailsMidStream(CustomLLM):
    """Streams one token, then fails."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="fails-mid-stream")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise Boom(1)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        def gen() -> Any:
            yield CompletionResponse(text="Snow", delta="Snow")
            raise Boom(2)

        return gen()


def _chat_engine(index: VectorStoreIndex, mode: str, llm: Any = None) -> Any:
    # (an in-process memory: the default one opens an aiosqlite database per engine)
    return index.as_chat_engine(chat_mode=mode, llm=llm or MockLLM(max_tokens=5),
                                similarity_top_k=2,
                                memory=ChatMemoryBuffer.from_defaults(token_limit=4000))


def _assert_one_tree(record: Record) -> None:
    root = record.root_span()
    assert root is not None
    assert [s for s in record.spans if s.parent_id is None] == [root]
    ids = {s.span_id for s in record.spans}
    assert len(ids) == len(record.spans)
    assert all(s.parent_id in ids for s in record.spans if s is not root)
    assert all(s.end_time is not None for s in record.spans)


def _source_texts(response: Any) -> list[str]:
    """The texts of a response's source nodes (for a chat response that has none of its
    own, those of the query responses it was made from)."""
    nodes = response.source_nodes or [n for s in getattr(response, "sources", [])
                                      for n in s.raw_output.source_nodes]
    return [n.node.get_content() for n in nodes]


def _contexts_feedback() -> Feedback:
    return Feedback(lambda context: 1.0, name="context_seen").on_contexts()


# ---------------------------------------------------------------------- chat engines
_RAG_MODES = ("condense_question", "context", "condense_plus_context")


@pytest.mark.parametrize("mode", [*_RAG_MODES, "simple"])
async def test_each_chat_mode_gives_one_record_per_turn_in_all_four_calls(
        index: VectorStoreIndex, session: Session, mode: str) -> None:
    chat = _chat_engine(index, mode)
    contexts = _contexts_feedback()
    recorder = LlamaIndexRecorder(chat, app_name=mode, feedbacks=[contexts], session=session)
    async with recorder as recording:
        first = await asyncio.to_thread(chat.chat, "What color is snow?")  # (sync, a thread)
        second = await chat.achat("And grass?")
        stream = await asyncio.to_thread(chat.stream_chat, "And the sky?")
        streamed = await asyncio.to_thread(lambda: "".join(stream.response_gen))
        astream = await chat.astream_chat("And coal?")
        astreamed = "".join([t async for t in astream.async_response_gen()])
    records = recording.records
    assert [r.input for r in records] == ["What color is snow?", "And grass?", "And the sky?",
                                          "And coal?"]
    assert [r.output for r in records] == [first.response, second.response, streamed,
                                           astreamed]
    assert all(r.output for r in records)
    assert [r.root_span().name.rpartition(".")[2] for r in records] == [  # type: ignore[union-attr]
        "chat", "achat", "stream_chat", "astream_chat"]
    assert {r.status for r in records} == {RecordStatus.OK}
    for record in records:
        _assert_one_tree(record)
        assert record.usage is None  # MockLLM reports no usage: None, not 0
    assert len(chat.chat_history) == 8  # the turns built on one another
    for record, response in zip(records, (first, second, stream, astream), strict=True):
        if mode == "simple":
            assert record.contexts == []
            assert not record.spans_of_kind(SpanKind.RETRIEVER)
        else:
            # what the answer was written from, sync and async, streamed or not
            assert record.contexts == _source_texts(response)
            assert len(record.contexts) == 2
    for record in records:
        result = record.wait_for_feedback_results(timeout=WAIT)[contexts]
        expected = FeedbackStatus.SKIPPED if mode == "simple" else FeedbackStatus.DONE
        assert result.status is expected


async def test_condense_question_astream_chat_keeps_the_contexts_it_answered_from(
        index: VectorStoreIndex, session: Session) -> None:
    """LlamaIndex fills a chat response's `source_nodes` from its query response only for
    a non-async one: the async stream's record had no contexts, and every context
    feedback ended `skipped` although the answer was written from two nodes."""
    chat = _chat_engine(index, "condense_question")
    contexts = _contexts_feedback()
    async with LlamaIndexRecorder(chat, feedbacks=[contexts], session=session) as recording:
        response = await chat.astream_chat("What color is snow?")
        tokens = [t async for t in response.async_response_gen()]
    record = recording.get()
    assert record.output == "".join(tokens)
    answered_from = response.sources[0].raw_output.source_nodes
    assert record.contexts == [n.node.get_content() for n in answered_from]
    assert len(record.contexts) == 2
    result = record.wait_for_feedback_results(timeout=WAIT)[contexts]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("call", ["query_stream", "stream_chat", "astream_chat"])
async def test_a_stream_that_fails_midway_is_an_error_with_no_output(
        index: VectorStoreIndex, session: Session, call: str) -> None:
    """Its output was the text streamed before the failure, and feedbacks on the output
    judged that half answer of a failed call (`done`) instead of ending `skipped`."""
    answer = Feedback(lambda output: 1.0, name="answer_ok").on_output()
    if call == "query_stream":
        app: Any = index.as_query_engine(streaming=True, llm=FailsMidStream(),
                                         similarity_top_k=2)
    else:
        app = _chat_engine(index, "context", FailsMidStream())

    async def read() -> None:
        if call == "query_stream":
            stream = await asyncio.to_thread(app.query, "What color is snow?")
            await asyncio.to_thread(lambda: list(stream.response_gen))
        elif call == "stream_chat":  # (LlamaIndex re-raises it in its writer thread too)
            chat = await asyncio.to_thread(app.stream_chat, "What color is snow?")
            await asyncio.to_thread(lambda: list(chat.response_gen))
        else:
            achat = await app.astream_chat("What color is snow?")
            _ = [t async for t in achat.async_response_gen()]

    async with LlamaIndexRecorder(app, feedbacks=[answer], session=session) as recording:
        with pytest.raises(Boom) as raised:
            await read()
    assert raised.value.code == 2  # the model's own exception reached the caller
    record = recording.get()
    assert (record.status, record.error) == (RecordStatus.ERROR, "Boom: boom 2")
    assert record.output is None
    assert record.metadata["partial_output"] == "Snow"
    result = record.wait_for_feedback_results(timeout=WAIT)[answer]
    assert result.status is FeedbackStatus.SKIPPED


async def test_chat_history_given_with_the_message_is_recorded_as_given(
        index: VectorStoreIndex, session: Session) -> None:
    """The chat engine stores the list it is given as its memory and appends the turn to
    it: the root span's `chat_history` showed the message and the answer as history."""
    chat = _chat_engine(index, "context")
    history = [ChatMessage(role="user", content="What color is snow?"),
               ChatMessage(role="assistant", content="White.")]
    async with LlamaIndexRecorder(chat, session=session) as recording:
        reply = await chat.achat("And grass?", chat_history=history)
    record = recording.get()
    assert (record.input, record.output) == ("And grass?", reply.response)
    assert len(history) == 4  # (LlamaIndex's doing)
    root = record.root_span()
    assert root is not None
    given = root.inputs.model_dump()["chat_history"]
    assert given == [{"role": "user", "content": "What color is snow?"},
                     {"role": "assistant", "content": "White."}]


async def test_gathered_chats_on_one_engine_do_not_mix(index: VectorStoreIndex,
                                                       session: Session) -> None:
    chat = _chat_engine(index, "condense_plus_context", Scripted())
    questions = ["What color is snow?", "What color is coal?", "What color is grass?"]

    async def streamed(question: str) -> str:
        response = await chat.astream_chat(question)
        return "".join([t async for t in response.async_response_gen()])

    async with LlamaIndexRecorder(chat, session=session) as recording:
        replies = await asyncio.gather(*(chat.achat(q) for q in questions))
        streams = await asyncio.gather(*(streamed(q) for q in questions))
    records = recording.records
    assert len(records) == 6
    by_call: dict[str, list[tuple[Any, Any]]] = {"achat": [], "astream_chat": []}
    for record in records:
        _assert_one_tree(record)
        by_call[record.root_span().name.rpartition(".")[2]].append(  # type: ignore[union-attr]
            (record.input, record.output))
    assert sorted(by_call["achat"]) == sorted(zip(questions, [r.response for r in replies],
                                                  strict=True))
    assert sorted(by_call["astream_chat"]) == sorted(zip(questions, streams, strict=True))
    ids = [s.span_id for r in records for s in r.spans]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------- token usage
@pytest.mark.parametrize("mode", ["simple", "context", "condense_plus_context"])
async def test_a_custom_models_async_stream_counts_its_usage_once(
        index: VectorStoreIndex, session: Session, mode: str) -> None:
    """A `CustomLLM` (local-model wrappers are) streams asynchronously by reading its sync
    stream, and both calls report the model's usage: it was counted twice."""
    chat = _chat_engine(index, mode, Scripted(usage=USAGE))
    async with LlamaIndexRecorder(chat, session=session) as recording:
        response = await chat.astream_chat("What color is snow?")
        _ = [t async for t in response.async_response_gen()]
        await chat.achat("And coal?")
    streamed, awaited = recording.records
    assert streamed.usage is not None
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens,
            streamed.usage.total_tokens) == (10, 2, 12)  # one model call
    calls = 2 if mode == "condense_plus_context" else 1  # (+ condensing the question)
    assert awaited.usage is not None
    assert awaited.usage.total_tokens == 12 * calls
    reporting = [s for s in streamed.spans if s.usage is not None]
    assert len(reporting) >= 2  # each span still shows what the model reported to it


# ---------------------------------------------------------------------- query engines
def test_a_custom_query_engine_returning_text_keeps_what_its_retriever_returned(
        index: VectorStoreIndex, session: Session) -> None:
    """LlamaIndex's own pattern (`RAGStringQueryEngine`): `custom_query` retrieves, asks
    the model and returns a string, which the engine wraps in a response without source
    nodes. The record had no contexts, and every context feedback was skipped."""
    from llama_index.core.query_engine import CustomQueryEngine

    class StringRAG(CustomQueryEngine):
        retriever: BaseRetriever

        def custom_query(self, query_str: str) -> str:
            nodes = self.retriever.retrieve(query_str)
            return "From: " + " | ".join(n.node.get_content() for n in nodes)

    engine = StringRAG(retriever=index.as_retriever(similarity_top_k=2))
    each = _contexts_feedback()
    with LlamaIndexRecorder(engine, feedbacks=[each], session=session) as recording:
        response = engine.query("What color is snow?")
    record = recording.get()
    assert response.source_nodes == []
    assert len(record.contexts) == 2
    assert all(text in str(response) for text in record.contexts)
    result = record.wait_for_feedback_results(timeout=10)[each]
    assert result.status is FeedbackStatus.DONE


def test_a_postprocessor_that_drops_every_node_gives_skipped_context_feedback(
        index: VectorStoreIndex, session: Session) -> None:
    engine = index.as_query_engine(
        llm=MockLLM(max_tokens=5), similarity_top_k=2,
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=2.0)])
    each = _contexts_feedback()
    together = Feedback(lambda contexts: float(len(contexts)),
                        name="context_count").on(Select.contexts.collect())
    answer = Feedback(lambda output: 1.0, name="answered").on_output()
    recorder = LlamaIndexRecorder(engine, feedbacks=[each, together, answer], session=session)
    with recorder as recording:
        response = engine.query("What color is snow?")
    record = recording.get()
    assert response.source_nodes == []
    assert record.contexts == []  # the answer was written from nothing
    retrieved = next(s for s in record.spans if s.name == "VectorIndexRetriever.retrieve")
    assert len(retrieved.outputs) == 2  # (the retriever's span still shows them)
    results = record.wait_for_feedback_results(timeout=WAIT)
    for feedback in (each, together):
        assert results[feedback].status is FeedbackStatus.SKIPPED  # not a score of 0
        assert results[feedback].result is None
        assert "found nothing" in (results[feedback].error or "")
    assert results[answer].status is FeedbackStatus.DONE


@pytest.mark.parametrize("mode", ["refine", "compact", "tree_summarize", "simple_summarize",
                                  "accumulate", "compact_accumulate", "no_text"])
def test_response_modes(index: VectorStoreIndex, session: Session, mode: str) -> None:
    if mode == "no_text":  # (the factory gives it no model: it would build the default one)
        engine: Any = RetrieverQueryEngine.from_args(
            index.as_retriever(similarity_top_k=2), llm=MockLLM(),
            response_synthesizer=NoText(llm=MockLLM()))
    else:
        engine = index.as_query_engine(llm=MockLLM(max_tokens=5), similarity_top_k=2,
                                       response_mode=mode)
    with LlamaIndexRecorder(engine, session=session) as recording:
        response = engine.query("What color is snow?")
    record = recording.get()
    _assert_one_tree(record)
    assert (record.input, record.status) == ("What color is snow?", RecordStatus.OK)
    assert record.output == (response.response or "")
    assert record.contexts == _source_texts(response)
    models = record.spans_of_kind(SpanKind.LLM)
    assert bool(models) == (mode != "no_text")


def _tools(index: VectorStoreIndex, llm: Any) -> list[QueryEngineTool]:
    return [QueryEngineTool.from_defaults(index.as_query_engine(llm=llm, similarity_top_k=1),
                                          name="colors", description="Colors of things."),
            QueryEngineTool.from_defaults(
                index.as_query_engine(llm=llm, similarity_top_k=2,
                                      response_mode="tree_summarize"),
                name="summary", description="Summaries.")]


def test_router_query_engine(index: VectorStoreIndex, session: Session) -> None:
    llm = Scripted()
    router = RouterQueryEngine(selector=LLMSingleSelector.from_defaults(llm=llm),
                               query_engine_tools=_tools(index, llm), llm=llm)
    with LlamaIndexRecorder(router, session=session) as recording:
        response = router.query("What color is snow?")
    record = recording.get()
    _assert_one_tree(record)
    assert (record.input, record.output) == ("What color is snow?", response.response)
    assert record.contexts == _source_texts(response)
    assert len(record.contexts) == 2  # the chosen engine's (the second: top 2)
    names = [s.name for s in record.spans]
    assert "LLMSingleSelector._select" in names
    assert names.count("RetrieverQueryEngine.query") == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_sub_question_query_engine(index: VectorStoreIndex, session: Session,
                                         use_async: bool) -> None:
    llm = Scripted()
    engine = SubQuestionQueryEngine.from_defaults(
        query_engine_tools=_tools(index, llm), llm=llm, use_async=use_async,
        question_gen=LLMQuestionGenerator.from_defaults(llm=llm))
    async with LlamaIndexRecorder(engine, session=session) as recording:
        if use_async:
            response = await engine.aquery("Compare snow and coal")
        else:
            response = await asyncio.to_thread(engine.query, "Compare snow and coal")
    record = recording.get()
    _assert_one_tree(record)
    assert (record.input, record.output) == ("Compare snow and coal", response.response)
    assert record.contexts == _source_texts(response)
    assert any(c.startswith("Sub question: What color is coal") for c in record.contexts)
    inner = [s for s in record.spans if s.name.startswith("RetrieverQueryEngine.")
             and not s.name.endswith("_query") and not s.name.endswith("_aquery")]
    assert len(inner) == 2  # one per sub-question, inside the record
    assert sum(1 for s in record.spans if s.kind == SpanKind.RETRIEVER.value
               and s.name.endswith(("retrieve", "aretrieve"))
               and not s.name.endswith(("_retrieve", "_aretrieve"))) == 2


class Unreachable(BaseRetriever):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self._error = error

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        raise self._error

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        raise self._error


@pytest.mark.parametrize("call", ["query", "aquery", "retrieve"])
async def test_a_failing_retriever_gives_an_error_record_and_its_own_exception(
        session: Session, call: str) -> None:
    error = Boom(7)
    retriever = Unreachable(error)
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
    app: Any = retriever if call == "retrieve" else engine

    async def ask() -> Any:
        if call == "aquery":
            return await engine.aquery("Where is it?")
        return await asyncio.to_thread(getattr(app, call), "Where is it?")

    async with LlamaIndexRecorder(app, session=session) as recording:
        with pytest.raises(Boom) as raised:
            await ask()
    assert raised.value is error  # unchanged
    record = recording.get()
    assert (record.input, record.output, record.status, record.error) == (
        "Where is it?", None, RecordStatus.ERROR, "Boom: boom 7")
    assert record.contexts == []
    failed = [s for s in record.spans if s.kind == SpanKind.RETRIEVER.value]
    assert failed
    assert all(s.error == "Boom: boom 7" for s in failed)


# ---------------------------------------------------------------------- agents and tools
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def explode(a: int, b: int) -> int:
    """Multiply two integers (broken)."""
    raise ValueError("tool exploded")


@pytest.mark.filterwarnings(*_AGENT_WARNINGS)
@pytest.mark.parametrize("broken", [False, True])
async def test_function_agent_tool_calls_are_tool_spans(session: Session,
                                                        broken: bool) -> None:
    """Tool calls were `other` spans: `Select.spans(kind="tool")` found nothing, and the
    model's `_prepare_chat_with_tools` (no model call) counted as a chat model call."""
    from llama_index.core.agent.workflow import FunctionAgent

    agent = FunctionAgent(tools=[FunctionTool.from_defaults(explode if broken else multiply,
                                                            name="multiply")],
                          llm=ToolThenAnswer())
    tool_outputs = Feedback(lambda outputs: 1.0, name="tool_ran").on(
        Select.spans(kind="tool").outputs.collect())
    async with LlamaIndexRecorder(agent, feedbacks=[tool_outputs],
                                  session=session) as recording:
        response = await agent.run(user_msg="What is 6 times 7?")
    record = recording.get()
    assert (record.input, record.output, record.status) == (
        "What is 6 times 7?", str(response), RecordStatus.OK)
    tools = record.spans_of_kind(SpanKind.TOOL)
    assert [s.name for s in tools] == ["FunctionTool.acall"]
    if broken:  # the agent handled it: the call went on
        assert (tools[0].outputs, tools[0].error) == (None, "ValueError: tool exploded")
    else:
        assert (tools[0].outputs.raw_output, tools[0].error) == (42, None)
    models = [s.name for s in record.spans
              if s.kind in (SpanKind.LLM.value, SpanKind.CHAT_MODEL.value)]
    assert models == ["ToolThenAnswer.astream_chat"] * 2
    result = record.wait_for_feedback_results(timeout=WAIT)[tool_outputs]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)


@pytest.mark.filterwarnings(*_AGENT_WARNINGS, "ignore:is_running called from within a step")
async def test_react_agent_with_a_custom_model(session: Session) -> None:
    from llama_index.core.agent.workflow import ReActAgent

    agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)],
                       llm=Scripted(usage=USAGE))
    async with LlamaIndexRecorder(agent, session=session) as recording:
        response = await agent.run(user_msg="What is 6 times 7?")
    record = recording.get()
    _assert_one_tree(record)
    assert (record.input, record.output, record.status) == (
        "What is 6 times 7?", "It is 42.", RecordStatus.OK)
    assert str(response) == "It is 42."
    tool = record.spans_of_kind(SpanKind.TOOL)
    assert [(s.name, s.outputs.raw_output) for s in tool] == [("FunctionTool.acall", 42)]
    assert record.usage is not None
    assert record.usage.total_tokens == 24  # two model calls, each counted once


def test_each_model_call_of_a_query_is_selected_once(index: VectorStoreIndex,
                                                     session: Session) -> None:
    """The synthesizer's `llm.predict` calls `complete`: both are model spans, and a check
    of every model call (`Select.spans(kind="llm")`) ran twice for the one call."""
    engine = index.as_query_engine(llm=MockLLM(max_tokens=6), similarity_top_k=1)
    prompts: list[Any] = []

    def judged(prompt: Any, answer: Any) -> float:
        prompts.append(prompt)
        return 1.0

    calls = Select.spans(kind="llm")
    per_call = Feedback(judged, name="per_call").on(
        prompt=calls.inputs.each(), answer=calls.outputs.each())
    with LlamaIndexRecorder(engine, feedbacks=[per_call], session=session) as recording:
        engine.query("What color is the sky?")
    record = recording.get()
    models = [s.name for s in record.spans_of_kind(SpanKind.LLM, SpanKind.CHAT_MODEL)]
    assert models == ["MockLLM.predict", "MockLLM.complete"]  # (as LlamaIndex ran them)
    result = record.wait_for_feedback_results(timeout=WAIT)[per_call]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)
    assert len(prompts) == 1
    assert "What color is the sky?" in str(prompts[0])  # the prompt the model was sent
