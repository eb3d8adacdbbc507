"""Streamed answers: one record, finalized when the stream ends, with the full text."""

from __future__ import annotations

import gc
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, PromptTemplate, VectorStoreIndex
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    CompletionResponseGen,
)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.memory import ChatMemoryBuffer

from scrutiny import Record, RecordStatus, Session, Span
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces, thread_loop  # noqa: F401

TEXTS = ("The sky is blue.", "Grass is green.", "Snow is white.")


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                           embed_model=MockEmbedding(embed_dim=8))


def _streaming_engine(index: VectorStoreIndex) -> Any:
    return index.as_query_engine(streaming=True, llm=MockLLM(max_tokens=8),
                                 similarity_top_k=2)


def _chat_engine(index: VectorStoreIndex) -> Any:
    return index.as_chat_engine(chat_mode="context", llm=MockLLM(max_tokens=6),
                                similarity_top_k=2,
                                memory=ChatMemoryBuffer.from_defaults(token_limit=4000))


def _ancestors(record: Record, span: Span) -> list[str]:
    by_id = {s.span_id: s for s in record.spans}
    names = []
    parent = by_id.get(span.parent_id or "")
    while parent is not None:
        names.append(parent.name)
        parent = by_id.get(parent.parent_id or "")
    return names


def _assert_llm_spans_inside(record: Record, root_name: str) -> None:
    llm_spans = [s for s in record.spans if s.name.startswith("MockLLM.")]
    assert llm_spans
    for span in llm_spans:
        assert _ancestors(record, span)[-1] == root_name


def test_streaming_query_is_recorded_when_the_stream_is_consumed(
        index: VectorStoreIndex, session: Session) -> None:
    engine = _streaming_engine(index)
    with LlamaIndexRecorder(engine, session=session) as recording:
        response = engine.query("What color is the sky?")
        assert recording.records == []
        assert recording.open_calls == 1
        tokens = list(response.response_gen)
    record = recording.get()
    assert len(tokens) == 8
    assert record.output == "".join(tokens)
    assert record.status is RecordStatus.OK
    assert record.input == "What color is the sky?"
    assert record.contexts == [n.node.get_content() for n in response.source_nodes]
    assert record.root_span().outputs == record.output  # type: ignore[union-attr]
    _assert_llm_spans_inside(record, "RetrieverQueryEngine.query")
    stream = next(s for s in record.spans if s.name == "MockLLM.stream_complete")
    assert isinstance(stream.outputs, str)
    assert stream.outputs
    assert stream.end_time is not None


def test_stream_stopped_early_gives_a_cancelled_record_with_partial_text(
        index: VectorStoreIndex, session: Session) -> None:
    engine = _streaming_engine(index)
    with LlamaIndexRecorder(engine, session=session) as recording:
        gen = engine.query("What color is snow?").response_gen
        first = next(gen)
        gen.close()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == first
    assert record.error is not None
    assert "stopped" in record.error


@pytest.mark.parametrize("app", ["query engine", "model alone"])
def test_stream_dropped_unconsumed_still_gives_its_record(index: VectorStoreIndex,
                                                          session: Session, app: str) -> None:
    recorded: Any = _streaming_engine(index) if app == "query engine" else MockLLM(
        max_tokens=4)
    with LlamaIndexRecorder(recorded, session=session) as recording:
        stream = recorded.query("Never read") if app == "query engine" else \
            recorded.stream_complete("Never read")
        del stream
        gc.collect()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == ""


async def test_async_streaming_query(index: VectorStoreIndex, session: Session) -> None:
    engine = _streaming_engine(index)
    async with LlamaIndexRecorder(engine, session=session) as recording:
        response = await engine.aquery("What color is grass?")
        tokens = [t async for t in response.async_response_gen()]
    record = recording.get()
    assert record.output == "".join(tokens) == response.response_txt
    assert record.status is RecordStatus.OK
    assert record.root_span().name == "RetrieverQueryEngine.aquery"  # type: ignore[union-attr]
    _assert_llm_spans_inside(record, "RetrieverQueryEngine.aquery")


async def test_async_stream_left_early_is_cancelled_with_partial_text(
        index: VectorStoreIndex, session: Session) -> None:
    engine = _streaming_engine(index)

    async def first_token(question: str) -> str:
        response = await engine.aquery(question)
        async for token in response.async_response_gen():
            return token  # the response (and its stream) is released here
        raise AssertionError("no token")

    async with LlamaIndexRecorder(engine, session=session) as recording:
        first = await first_token("Just the start")
    record = recording.get()  # leaving the block let the loop finalize the stream
    assert record.status is RecordStatus.CANCELLED
    assert record.output == first


@pytest.mark.usefixtures("thread_loop")
def test_stream_chat(index: VectorStoreIndex, session: Session) -> None:
    chat = _chat_engine(index)
    with LlamaIndexRecorder(chat, session=session) as recording:
        response = chat.stream_chat("Tell me about snow")
        tokens = list(response.response_gen)
    record = recording.get()
    assert record.input == "Tell me about snow"
    assert record.output == "".join(tokens)
    assert record.status is RecordStatus.OK
    assert len(record.contexts) == 2
    _assert_llm_spans_inside(record, "ContextChatEngine.stream_chat")


async def test_astream_chat(index: VectorStoreIndex, session: Session) -> None:
    chat = _chat_engine(index)
    async with LlamaIndexRecorder(chat, session=session) as recording:
        response = await chat.astream_chat("Tell me about grass")
        tokens = [t async for t in response.async_response_gen()]
    record = recording.get()
    assert record.output == "".join(tokens)
    assert record.status is RecordStatus.OK
    _assert_llm_spans_inside(record, "ContextChatEngine.astream_chat")


# ---------------------------------------------------------------- a model recorded alone
class _FailsMidway(MockLLM):
    """LlamaIndex's MockLLM whose stream fails after two chunks."""

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            yield CompletionResponse(text="one", delta="one")
            yield CompletionResponse(text="one two", delta=" two")
            raise ConnectionError("the connection dropped")

        return gen()


def _read(stream: Any) -> str:
    return "".join(getattr(c, "delta", c) for c in stream)


async def _aread(stream: Any) -> str:
    return "".join([getattr(c, "delta", c) async for c in stream])


@pytest.mark.parametrize("call", ["stream_complete", "stream_chat", "stream"])
def test_model_stream_recorded_alone_keeps_what_the_caller_read(
        session: Session, call: str) -> None:
    llm = MockLLM(max_tokens=5)
    with LlamaIndexRecorder(llm, session=session) as recording:
        if call == "stream_complete":
            stream = llm.stream_complete("What is the sky like?")
        elif call == "stream_chat":
            stream = llm.stream_chat([ChatMessage(role="user", content="What is the sky like?")])
        else:  # a template and its values: the record's input is the prompt sent
            stream = llm.stream(PromptTemplate("What is the {thing} like?"), thing="sky")
        assert recording.records == []  # (the call returned; its stream is not read yet)
        text = _read(stream)
    record = recording.get()
    assert text
    assert record.output == text
    assert record.status is RecordStatus.OK
    assert record.input == "What is the sky like?"
    assert record.root_span().name == f"MockLLM.{call}"  # type: ignore[union-attr]


@pytest.mark.parametrize("call", ["astream_complete", "astream_chat", "astream"])
async def test_async_model_stream_recorded_alone_is_one_record(session: Session,
                                                             call: str) -> None:
    llm = MockLLM(max_tokens=5)
    async with LlamaIndexRecorder(llm, session=session) as recording:
        if call == "astream_complete":
            stream = await llm.astream_complete("Why is grass green?")
        elif call == "astream_chat":
            stream = await llm.astream_chat([ChatMessage(role="user",
                                                         content="Why is grass green?")])
        else:
            stream = await llm.astream(PromptTemplate("Why is {thing} green?"), thing="grass")
        text = await _aread(stream)
    # MockLLM's async stream reads its sync `stream_complete` as it goes: a step of this
    # call, not a record of its own.
    record = recording.get()
    assert record.output == text != ""
    assert record.input == "Why is grass green?"
    assert record.status is RecordStatus.OK
    inner = next(s for s in record.spans if s.name == "MockLLM.stream_complete")
    assert _ancestors(record, inner)[-1] == f"MockLLM.{call}"


def test_model_stream_stopped_early_is_cancelled_with_what_was_read(
        session: Session) -> None:
    llm = MockLLM(max_tokens=6)
    with LlamaIndexRecorder(llm, session=session) as recording:
        stream = llm.stream_complete("Count to six")
        first = [next(stream).delta, next(stream).delta]
        stream.close()
    record = recording.get()
    assert record.status is RecordStatus.CANCELLED
    assert record.output == "".join(d or "" for d in first)
    assert "stopped" in (record.error or "")


def test_model_stream_failing_midway_is_an_error_keeping_the_partial_text(
        session: Session) -> None:
    llm = _FailsMidway()
    with LlamaIndexRecorder(llm, session=session) as recording:
        stream = llm.stream_complete("Tell me")
        with pytest.raises(ConnectionError):
            _read(stream)
    record = recording.get()
    assert record.status is RecordStatus.ERROR
    assert "the connection dropped" in (record.error or "")
    assert record.output is None
    assert record.metadata["partial_output"] == "one two"


def test_a_call_beside_an_open_model_stream_is_a_record_of_its_own(
        session: Session) -> None:
    # Only a call the stream makes while it is being read joins its record.
    llm = MockLLM(max_tokens=3)
    with LlamaIndexRecorder(llm, session=session) as recording:
        stream = llm.stream_complete("first")
        answer = llm.complete("second").text
        text = _read(stream)
    by_input = {r.input: r for r in recording.records}
    assert set(by_input) == {"first", "second"}
    assert by_input["second"].output == answer
    assert by_input["first"].output == text
    assert [s.name for s in by_input["first"].spans] == ["MockLLM.stream_complete"]
