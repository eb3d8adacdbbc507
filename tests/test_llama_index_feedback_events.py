"""Feedback on LlamaIndex records: results surface as `FeedbackResultEvent`s through the
root dispatcher, failures are stored as `failed`, and evaluators' own calls are not recorded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.llms import MockLLM
from pydantic import PrivateAttr

from scrutiny import Feedback, FeedbackStatus, Select, Session
from scrutiny.integrations.llama_index import FeedbackResultEvent, LlamaIndexRecorder
from tests.support.llama_index_fixtures import _no_leaked_traces  # noqa: F401

TEXTS = ("The sky is blue.", "Grass is green.", "Snow is white.")
WAIT = 10.0


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                           embed_model=MockEmbedding(embed_dim=8))


class Collector(BaseEventHandler):
    """A user's event handler on the root dispatcher; `done` is set after `expected`
    feedback events. It also counts LLM completions (of anyone, app or evaluator)."""

    expected: int = 0
    _events: list[FeedbackResultEvent] = PrivateAttr(default_factory=list)
    _completions: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _done: threading.Event = PrivateAttr(default_factory=threading.Event)

    @classmethod
    def class_name(cls) -> str:
        return "Collector"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        with self._lock:
            if isinstance(event, LLMCompletionEndEvent):
                self._completions += 1
            if isinstance(event, FeedbackResultEvent):
                self._events.append(event)
                if len(self._events) >= self.expected:
                    self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    @property
    def events(self) -> list[FeedbackResultEvent]:
        with self._lock:
            return list(self._events)

    @property
    def completions(self) -> int:
        with self._lock:
            return self._completions


@pytest.fixture
def collector() -> Iterator[Collector]:
    dispatcher = get_dispatcher()
    handler = Collector()
    dispatcher.add_event_handler(handler)
    try:
        yield handler
    finally:  # remove it by identity (pydantic's == would match any Collector)
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not handler]


def _engine(index: VectorStoreIndex) -> Any:
    return index.as_query_engine(llm=MockLLM(max_tokens=4), similarity_top_k=2)


def test_one_event_per_feedback_per_record(index: VectorStoreIndex, database_url: str,
                                           collector: Collector) -> None:
    def answer_length(answer: str) -> tuple[float, str]:
        return float(len(answer)), "characters"

    async def context_count(contexts: list[str]) -> float:
        return float(len(contexts))

    feedbacks = [Feedback(answer_length).on_output(),
                 Feedback(context_count).on(Select.contexts.collect())]
    collector.expected = 3 * len(feedbacks)
    session = Session(database_url)
    engine = _engine(index)
    with LlamaIndexRecorder(engine, feedbacks=feedbacks, session=session) as recording:
        for question in ("one?", "two?", "three?"):
            engine.query(question)
    assert collector.wait(WAIT)
    assert session.wait_for_feedback(WAIT)
    session.close(timeout=WAIT)  # the callback thread has delivered everything
    events = collector.events
    assert len(events) == 6
    records = {r.record_id: r for r in recording.records}
    pairs = sorted((e.record_id, e.feedback_name) for e in events)
    assert pairs == sorted((rid, fb.name) for rid in records for fb in feedbacks)
    for event in events:
        record = records[event.record_id]
        assert event.status == "done"
        assert event.root_span_id == event.span_id == record.root_run_id
        assert (event.app_name, event.app_version) == (record.app_name, record.app_version)
        if event.feedback_name == "answer_length":
            assert event.score == float(len(record.output))
            assert event.explanation == "characters"
        else:
            assert event.score == 2.0


def test_event_is_sent_after_the_result_is_stored(index: VectorStoreIndex,
                                                  session: Session) -> None:
    seen: list[str] = []
    done = threading.Event()

    class ReadsBack(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "ReadsBack"

        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, FeedbackResultEvent):
                stored = session.get_record(event.record_id)
                assert stored is not None
                seen.extend(r.status.value for r in stored.feedback_results.values())
                done.set()

    handler = ReadsBack()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    try:
        engine = _engine(index)
        feedback = Feedback(lambda answer: 1.0, name="one").on_output()
        with LlamaIndexRecorder(engine, feedbacks=[feedback], session=session):
            engine.query("stored first?")
        assert done.wait(WAIT)
    finally:
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not handler]
    assert seen == ["done"]


def test_failing_feedback_is_failed_with_its_reason(index: VectorStoreIndex,
                                                    session: Session,
                                                    collector: Collector) -> None:
    def broken(answer: str) -> float:
        raise ValueError("judge exploded")

    ok = Feedback(lambda answer: 1.0, name="fine").on_output()
    bad = Feedback(broken).on_output()
    collector.expected = 2
    engine = _engine(index)
    with LlamaIndexRecorder(engine, feedbacks=[ok, bad], session=session) as recording:
        response = engine.query("Does the app care?")
    assert response.response  # the app call returned normally
    results = recording.get().wait_for_feedback_results(timeout=WAIT)
    assert results[bad].status is FeedbackStatus.FAILED
    assert results[bad].result is None
    assert results[bad].error is not None
    assert "judge exploded" in results[bad].error
    assert results[ok].status is FeedbackStatus.DONE
    assert collector.wait(WAIT)
    failed = [e for e in collector.events if e.feedback_name == "broken"]
    assert len(failed) == 1
    assert failed[0].status == "failed"
    assert failed[0].score is None
    assert failed[0].error is not None
    assert "judge exploded" in failed[0].error
    frame, _ = session.get_records_and_feedback()
    assert frame.loc[0, "broken status"] == "failed"


def test_evaluators_own_llama_index_calls_are_not_recorded(index: VectorStoreIndex,
                                                           session: Session,
                                                           collector: Collector) -> None:
    engine = _engine(index)
    judge = MockLLM(max_tokens=2)

    def llm_judge(question: str, answer: str) -> float:
        judge.complete(f"Is '{answer}' a good answer to '{question}'?")
        engine.query(question)  # even a call of the recorded engine itself
        return 1.0

    feedback = Feedback(llm_judge).on_input_output()
    collector.expected = 1
    with LlamaIndexRecorder(engine, feedbacks=[feedback], session=session) as recording:
        engine.query("Is the judge recorded?")
        record = recording.get()
        result = record.wait_for_feedback_results(timeout=WAIT)[feedback]
    assert result.status is FeedbackStatus.DONE
    assert collector.wait(WAIT)
    assert collector.completions >= 3  # the app's call and the judge's two went through
    assert len(recording.records) == 1
    frame, _ = session.get_records_and_feedback(wait=True, timeout=WAIT)
    assert len(frame) == 1
