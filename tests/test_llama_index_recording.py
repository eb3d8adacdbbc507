"""LlamaIndex calls become records: query, retriever, chat, errors, scoping, usage."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, PromptTemplate, VectorStoreIndex
from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.llms import CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from scrutiny import (
    ConfigurationError,
    Feedback,
    FeedbackMode,
    FeedbackStatus,
    RecordingError,
    RecordStatus,
    Select,
    Session,
    SpanKind,
)
from scrutiny.core import suppress_recording
from scrutiny.integrations.llama_index import LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces, thread_loop  # noqa: F401

TEXTS = ("The sky is blue.", "Grass is green.", "Snow is white.", "Coal is black.")
WAIT = 10.0


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                           embed_model=MockEmbedding(embed_dim=8))


def _engine(index: VectorStoreIndex, **kwargs: Any) -> Any:
    return index.as_query_engine(llm=MockLLM(max_tokens=6), similarity_top_k=2, **kwargs)


def _chat_engine(index: VectorStoreIndex) -> Any:
    # An in-process memory: the default one opens an aiosqlite database per engine.
    return index.as_chat_engine(chat_mode="context", llm=MockLLM(max_tokens=5),
                                similarity_top_k=2,
                                memory=ChatMemoryBuffer.from_defaults(token_limit=4000))


class UsageLLM(CustomLLM):
    """An offline LLM that reports token usage the way hosted models do."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="usage-llm")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="forty two", raw={"usage": {
            "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


class FailingLLM(MockLLM):
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise RuntimeError("llm down")


def test_query_gives_one_record_with_the_span_tree(index: VectorStoreIndex,
                                                   session: Session) -> None:
    engine = _engine(index)
    recorder = LlamaIndexRecorder(engine, app_name="qa", app_version="v2", session=session)
    with recorder as recording:
        response = engine.query("What color is the sky?")
    record = recording.get()
    assert record.input == "What color is the sky?"
    assert record.output == response.response
    assert record.status is RecordStatus.OK
    assert record.framework == "llama_index"
    assert (record.app_name, record.app_version) == ("qa", "v2")
    root = record.root_span()
    assert root is not None
    assert root.name == "RetrieverQueryEngine.query"
    assert record.root_run_id == root.span_id
    assert [s for s in record.spans if s.parent_id is None] == [root]
    ids = {s.span_id for s in record.spans}
    assert all(s.parent_id in ids for s in record.spans if s is not root)
    kinds = {s.kind for s in record.spans}
    assert {SpanKind.QUERY.value, SpanKind.RETRIEVER.value, SpanKind.EMBEDDING.value,
            SpanKind.SYNTHESIZE.value, SpanKind.LLM.value} <= kinds
    assert all(s.end_time is not None for s in record.spans)
    assert record.usage is None  # MockLLM reports no usage: None, not 0


def test_retrieved_nodes_become_contexts_with_text_score_and_id(index: VectorStoreIndex,
                                                                session: Session) -> None:
    engine = _engine(index)
    with LlamaIndexRecorder(engine, session=session) as recording:
        response = engine.query("What color is snow?")
    record = recording.get()
    assert record.contexts == [n.node.get_content() for n in response.source_nodes]
    assert len(record.contexts) == 2
    outer = [s for s in record.spans if s.name == "VectorIndexRetriever.retrieve"]
    assert len(outer) == 1
    nodes = outer[0].outputs
    assert [n["node_id"] for n in nodes] == [n.node.node_id for n in response.source_nodes]
    assert [n["score"] for n in nodes] == [n.score for n in response.source_nodes]
    assert [n["text"] for n in nodes] == record.contexts


class _KeepFirst(BaseNodePostprocessor):
    """A reranker's effect: only the best node reaches the answer."""

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        return nodes[:1]


def test_contexts_are_the_nodes_the_answer_was_written_from(index: VectorStoreIndex,
                                                            session: Session) -> None:
    """With a postprocessor (a reranker, a similarity cutoff) the retriever returns more
    nodes than the model reads: groundedness and context relevance judged text the answer
    never saw. The retriever's span still shows all it returned."""
    engine = _engine(index, node_postprocessors=[_KeepFirst()])
    with LlamaIndexRecorder(engine, session=session) as recording:
        response = engine.query("What color is snow?")
    record = recording.get()
    assert len(response.source_nodes) == 1
    assert record.contexts == [response.source_nodes[0].node.get_content()]
    retrieved = [s for s in record.spans if s.name == "VectorIndexRetriever.retrieve"]
    assert len(retrieved[0].outputs) == 2


def test_select_contexts_feedback_judges_each_retrieved_text(index: VectorStoreIndex,
                                                             session: Session) -> None:
    seen: list[str] = []

    def mentions_color(context: str) -> float:
        seen.append(context)
        return 1.0

    engine = _engine(index)
    feedback = Feedback(mentions_color).on(Select.contexts)
    with LlamaIndexRecorder(engine, feedbacks=[feedback], session=session) as recording:
        engine.query("What color is grass?")
    record = recording.get()
    result = record.wait_for_feedback_results(timeout=WAIT)[feedback]
    assert result.status is FeedbackStatus.DONE
    assert result.result == 1.0
    assert sorted(seen) == sorted(record.contexts)


def test_one_retrieval_is_one_retriever_span(index: VectorStoreIndex,
                                             session: Session) -> None:
    """`retrieve` and the `_retrieve` it calls were both retriever spans: a feedback on
    Select.spans(kind="retriever") ran twice per retrieval, and a count doubled."""
    def retrieved(outputs: list[Any]) -> float:
        return float(sum(len(o) for o in outputs))

    engine = _engine(index)
    feedback = Feedback(retrieved).on(Select.spans(kind="retriever").outputs)
    with LlamaIndexRecorder(engine, feedbacks=[feedback], session=session) as recording:
        engine.query("What color is grass?")
    record = recording.get()
    [retriever] = record.spans_of_kind("retriever")
    assert retriever.name.endswith(".retrieve")
    result = record.wait_for_feedback_results(timeout=WAIT)[feedback]
    assert result.result == len(record.contexts) == 2


def test_retriever_alone(index: VectorStoreIndex, session: Session) -> None:
    retriever = index.as_retriever(similarity_top_k=3)
    with LlamaIndexRecorder(retriever, session=session) as recording:
        nodes = retriever.retrieve("colors")
    record = recording.get()
    texts = [n.node.get_content() for n in nodes]
    assert record.input == "colors"
    assert record.output == texts
    assert record.contexts == texts
    assert record.root_span().kind == SpanKind.RETRIEVER.value  # type: ignore[union-attr]


@pytest.mark.usefixtures("thread_loop")
def test_chat_engine_context_mode(index: VectorStoreIndex, session: Session) -> None:
    chat = _chat_engine(index)
    with LlamaIndexRecorder(chat, session=session) as recording:
        first = chat.chat("Hello there")
        second = chat.chat("And the grass?")
    records = recording.records
    assert [r.input for r in records] == ["Hello there", "And the grass?"]
    assert [r.output for r in records] == [first.response, second.response]
    for record in records:
        assert record.root_span().name == "ContextChatEngine.chat"  # type: ignore[union-attr]
        assert len(record.contexts) == 2
        assert record.spans_of_kind(SpanKind.LLM)


@pytest.mark.usefixtures("thread_loop")
def test_housekeeping_calls_of_a_recorded_engine_are_no_records(index: VectorStoreIndex,
                                                                session: Session) -> None:
    """LlamaIndex makes a span of `reset`, `_get_prompts`, `_update_prompts`, ... (every
    implementation of an abstract method): each was a record with no question, judged."""
    said = Feedback(lambda output: float(bool(output)), name="said").on_output()
    chat = _chat_engine(index)
    with LlamaIndexRecorder(chat, feedbacks=[said], session=session) as chat_recording:
        chat.chat("What color is the sky?")
        chat.reset()  # a new conversation
        chat.chat("What color is grass?")
    engine = _engine(index)
    with LlamaIndexRecorder(engine, feedbacks=[said], session=session) as qa_recording:
        engine.get_prompts()
        engine.update_prompts({"response_synthesizer:text_qa_template": PromptTemplate(
            "Context: {context_str}\nQ: {query_str}\nA:")})
        engine.query("What color is snow?")
    assert [r.input for r in chat_recording.records] == ["What color is the sky?",
                                                         "What color is grass?"]
    assert [r.input for r in qa_recording.records] == ["What color is snow?"]
    for record in chat_recording.records + qa_recording.records:
        outcome = record.wait_for_feedback_results(timeout=WAIT)[said]
        assert (outcome.status, outcome.result) == (FeedbackStatus.DONE, 1.0)
    stored, _ = session.get_records_and_feedback(wait=True, timeout=WAIT)
    assert len(stored) == 3


async def test_achat(index: VectorStoreIndex, session: Session) -> None:
    chat = _chat_engine(index)
    async with LlamaIndexRecorder(chat, session=session) as recording:
        reply = await chat.achat("Hi")
    record = recording.get()
    assert record.root_span().name == "ContextChatEngine.achat"  # type: ignore[union-attr]
    assert (record.input, record.output) == ("Hi", reply.response)
    assert record.contexts


def test_calls_outside_the_block_are_not_recorded(index: VectorStoreIndex,
                                                  session: Session) -> None:
    engine = _engine(index)
    recorder = LlamaIndexRecorder(engine, session=session)
    engine.query("before")
    with recorder as recording:
        engine.query("inside")
    engine.query("after")
    assert [r.input for r in recording.records] == ["inside"]
    session.flush(WAIT)
    frame, _ = session.get_records_and_feedback()
    assert len(frame) == 1


def test_two_recorders_record_only_their_own_engine(index: VectorStoreIndex,
                                                    session: Session) -> None:
    first, second, unwatched = _engine(index), _engine(index), _engine(index)
    r1 = LlamaIndexRecorder(first, app_name="first", session=session)
    r2 = LlamaIndexRecorder(second, app_name="second", session=session)
    with r1 as rec1, r2 as rec2:
        first.query("one")
        second.query("two")
        unwatched.query("three")
        first.query("four")
    assert [r.input for r in rec1.records] == ["one", "four"]
    assert [r.input for r in rec2.records] == ["two"]
    assert {r.app_name for r in rec1.records} == {"first"}


def test_nested_watched_objects_each_get_their_record(index: VectorStoreIndex,
                                                     session: Session) -> None:
    engine = _engine(index)
    retriever = engine.retriever
    with LlamaIndexRecorder(engine, app_name="engine", session=session) as outer, \
            LlamaIndexRecorder(retriever, app_name="retriever", session=session) as inner:
        engine.query("Which colors?")
    engine_record, retriever_record = outer.get(), inner.get()
    retriever_root = retriever_record.root_span()
    assert retriever_root is not None
    assert retriever_root.name == "VectorIndexRetriever.retrieve"
    assert retriever_root.parent_id is None
    in_engine = next(s for s in engine_record.spans if s.span_id == retriever_root.span_id)
    assert in_engine.parent_id is not None  # the same call, inside the engine's tree
    assert retriever_record.contexts == engine_record.contexts
    assert {s.span_id for s in retriever_record.spans} < {s.span_id for s in engine_record.spans}


def test_engine_called_inside_another_span_is_recorded(index: VectorStoreIndex,
                                                       session: Session) -> None:
    engine = _engine(index)

    @get_dispatcher().span  # type: ignore[misc]
    def outer_app(question: str) -> Any:
        return engine.query(question)

    with LlamaIndexRecorder(engine, session=session) as recording:
        outer_app("nested?")
    record = recording.get()
    root = record.root_span()
    assert root is not None
    assert root.name == "RetrieverQueryEngine.query"
    assert root.metadata["llama_index_parent_id"].startswith("test_engine_called_inside")


def test_error_gives_an_error_record_and_reraises(index: VectorStoreIndex,
                                                  session: Session) -> None:
    engine = index.as_query_engine(llm=FailingLLM())
    with LlamaIndexRecorder(engine, session=session) as recording, \
            pytest.raises(RuntimeError, match="llm down"):
        engine.query("boom?")
    record = recording.get()
    assert record.status is RecordStatus.ERROR
    assert record.error == "RuntimeError: llm down"
    assert record.output is None
    failed = [s for s in record.spans if s.error]
    assert record.root_span() in failed
    assert any(s.kind == SpanKind.LLM.value for s in failed)


def test_a_failure_inside_scrutiny_is_logged_and_never_reaches_the_app(
        index: VectorStoreIndex, session: Session, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import scrutiny.integrations.llama_index._tracer as tracer_module

    def broken(span_id: str, instance: Any) -> Any:
        raise RuntimeError("bug in scrutiny")

    monkeypatch.setattr(tracer_module, "name_and_kind", broken)
    engine = _engine(index)
    with caplog.at_level(logging.DEBUG, logger="scrutiny"), \
            LlamaIndexRecorder(engine, session=session) as recording:
        response = engine.query("Still fine?")
    assert response.response
    assert recording.records == []
    assert any("bug in scrutiny" in str(r.exc_info) for r in caplog.records if r.exc_info)


def test_token_usage_is_recorded_once_per_model_call(index: VectorStoreIndex,
                                                     session: Session) -> None:
    engine = index.as_query_engine(llm=UsageLLM())
    with LlamaIndexRecorder(engine, session=session) as recording:
        engine.query("How much?")
    record = recording.get()
    completes = [s for s in record.spans if s.name == "UsageLLM.complete"]
    assert len(completes) == 1
    assert completes[0].usage is not None
    assert completes[0].usage.total_tokens == 15
    assert completes[0].model == "usage-llm"
    assert record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens,
            record.usage.total_tokens) == (12, 3, 15)


def test_suppressed_recording_is_not_recorded(index: VectorStoreIndex,
                                              session: Session) -> None:
    engine = _engine(index)
    with LlamaIndexRecorder(engine, session=session) as recording:
        with suppress_recording():
            engine.query("judge's own call")
        engine.query("app call")
    assert [r.input for r in recording.records] == ["app call"]


def test_with_app_mode_waits_for_feedback_when_leaving(index: VectorStoreIndex,
                                                       session: Session) -> None:
    engine = _engine(index)
    feedback = Feedback(lambda answer: 0.5, name="half").on_output()
    recorder = LlamaIndexRecorder(engine, feedbacks=[feedback], session=session,
                                  feedback_mode=FeedbackMode.WITH_APP)
    with recorder as recording:
        engine.query("wait for me")
    result = recording.get().feedback_results[feedback]
    assert result.status is FeedbackStatus.DONE
    assert result.result == 0.5


def test_recording_get_explains_an_empty_block(index: VectorStoreIndex,
                                               session: Session) -> None:
    with LlamaIndexRecorder(_engine(index), session=session) as recording:
        pass
    with pytest.raises(RecordingError, match="no record"):
        recording.get()


def test_recorder_rejects_bad_configuration(index: VectorStoreIndex) -> None:
    with pytest.raises(ConfigurationError):
        LlamaIndexRecorder(None)
    with pytest.raises(ConfigurationError, match="not wired"):
        LlamaIndexRecorder(_engine(index), feedbacks=[Feedback(lambda x: 1.0, name="x")])


def test_handlers_are_added_on_first_use_once() -> None:
    code = (
        "from llama_index.core.instrumentation import get_dispatcher\n"
        "from llama_index.core.llms import MockLLM\n"
        "import scrutiny.integrations.llama_index as li\n"
        "from scrutiny import Session\n"
        "d = get_dispatcher()\n"
        "names = lambda: sorted(type(h).__name__ for h in d.span_handlers + d.event_handlers)\n"
        "print(names())\n"
        "llm = MockLLM()\n"
        "s = Session('memory://')\n"
        "for _ in range(3):\n"
        "    with li.LlamaIndexRecorder(llm, session=s):\n"
        "        pass\n"
        "print(names())\n"
        "s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    before, after = out.stdout.strip().splitlines()
    assert "ScrutinySpanHandler" not in before
    assert after.count("ScrutinySpanHandler") == 1
    assert after.count("ScrutinyEventHandler") == 1


def test_public_surface() -> None:
    from scrutiny.integrations import llama_index

    assert llama_index.__all__ == ["FeedbackResultEvent", "LlamaIndexRecorder", "Recording"]
    code = ("import sys, scrutiny.integrations.llama_index\n"
            "print([m for m in sys.modules if m.startswith('langchain')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_a_model_called_with_its_prompt_positionally_records_the_prompt(
        session: Session) -> None:
    """`llm.complete("...")` gives its span the call's positional arguments: the record's
    input was the tuple ("...",), which no feedback on the input could read as text."""
    llm = MockLLM(max_tokens=4)
    with LlamaIndexRecorder(llm, app_name="llm", session=session) as recording:
        llm.complete("hello there")
    assert recording.get().input == "hello there"
