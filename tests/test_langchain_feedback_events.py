"""Feedback results reach the LangChain handlers of the recorded run, after they are stored."""

from __future__ import annotations

import asyncio
import threading
from typing import Any
from uuid import UUID

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from scrutiny import Feedback, FeedbackResult, FeedbackStatus, Record, Session
from scrutiny.integrations.langchain import FEEDBACK_EVENT, ChainRecorder

WAIT = 10.0


def _app() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | FakeListChatModel(responses=["a fine answer"]) | StrOutputParser()


def _feedbacks() -> list[Feedback]:
    async def relevance(question: str, answer: str) -> float:
        return 0.5

    def length(answer: str) -> float:
        return len(answer) / 100

    return [Feedback(relevance).on_input_output(), Feedback(length).on_output()]


class Collector(BaseCallbackHandler):
    """A user's handler: collects feedback events, sets `done` after `expected` of them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.events: list[tuple[dict[str, Any], UUID]] = []
        self.other_custom_events: list[str] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID,
                        tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                        **kwargs: Any) -> None:
        with self._lock:
            if name != FEEDBACK_EVENT:
                self.other_custom_events.append(name)
                return
            self.events.append((data, run_id))
            if len(self.events) >= self.expected:
                self.done.set()


def _wait_delivered(session: Session, done: threading.Event) -> None:
    assert session.wait_for_feedback(WAIT)
    assert done.wait(WAIT), "the feedback events were not delivered"


def _check_events(events: list[tuple[dict[str, Any], UUID]], record: Record) -> None:
    assert len(events) == 2
    assert sorted(d["feedback_name"] for d, _ in events) == ["length", "relevance"]
    assert all(d["status"] == FeedbackStatus.DONE.value for d, _ in events)
    assert all(d["record_id"] == record.record_id for d, _ in events)
    assert all(run_id == UUID(record.root_run_id or "") for _, run_id in events)
    scores = {d["feedback_name"]: d["result"] for d, _ in events}
    assert scores == {"relevance": 0.5, "length": len("a fine answer") / 100}


def test_a_handler_in_config_receives_one_event_per_feedback(session: Session) -> None:
    app = _app()
    collector = Collector(expected=2)
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        app.invoke({"question": "q"}, config={"callbacks": [collector]})
    record = recording.get()
    _wait_delivered(session, collector.done)
    _check_events(collector.events, record)
    assert collector.other_custom_events == []
    # the results were stored before the events were sent
    df, _ = session.get_records_and_feedback()
    assert list(df["relevance status"]) == ["done"]
    assert list(df["length status"]) == ["done"]


def test_events_reach_handlers_when_the_recorder_handler_is_passed_per_call(
        session: Session) -> None:
    app = _app()
    recorder = ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(), session=session)
    collector = Collector(expected=2)
    app.invoke({"question": "q"}, config={"callbacks": [recorder.handler, collector]})
    record = recorder.handler.records[-1]
    _wait_delivered(session, collector.done)
    _check_events(collector.events, record)


def test_a_handler_outside_the_recorded_run_gets_nothing(session: Session) -> None:
    app = _app()
    mine, other = Collector(expected=2), Collector(expected=1)
    recorder = ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(), session=session)
    with recorder:
        app.invoke({"question": "recorded"}, config={"callbacks": [mine]})
    app.invoke({"question": "not recorded"}, config={"callbacks": [other]})
    _wait_delivered(session, mine.done)  # the same delivery would have reached `other`
    assert len(mine.events) == 2
    assert other.events == []


def test_on_feedback_result_is_called_with_the_result_and_the_record(
        session: Session) -> None:
    class ResultHandler(BaseCallbackHandler):
        def __init__(self) -> None:
            self.results: list[tuple[FeedbackResult, Record]] = []
            self.done = threading.Event()

        def on_feedback_result(self, result: FeedbackResult, record: Record) -> None:
            self.results.append((result, record))
            if len(self.results) == 2:
                self.done.set()

    app = _app()
    handler = ResultHandler()
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        app.invoke({"question": "q"}, config={"callbacks": [handler]})
    record = recording.get()
    _wait_delivered(session, handler.done)
    assert len(handler.results) == 2
    assert all(rec is record for _, rec in handler.results)
    assert sorted(r.feedback_name for r, _ in handler.results) == ["length", "relevance"]
    assert all(r.status is FeedbackStatus.DONE for r, _ in handler.results)
    # what the handler got is what the record's futures resolved with
    final = record.wait_for_feedback_results(timeout=WAIT)
    assert {r.feedback_name: r.result for r in final.values()} == {
        r.feedback_name: r.result for r, _ in handler.results}


async def test_an_async_handler_receives_the_events(session: Session) -> None:
    class AsyncCollector(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.events: list[tuple[dict[str, Any], UUID]] = []
            self.done = threading.Event()

        async def on_custom_event(self, name: str, data: Any, *, run_id: UUID,
                                  tags: list[str] | None = None,
                                  metadata: dict[str, Any] | None = None,
                                  **kwargs: Any) -> None:
            if name == FEEDBACK_EVENT:
                self.events.append((data, run_id))
                if len(self.events) == 2:
                    self.done.set()

    app = _app()
    collector = AsyncCollector()
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        await app.ainvoke({"question": "q"}, config={"callbacks": [collector]})
    record = await recording.get().await_feedback_results(timeout=WAIT)
    assert all(r.status is FeedbackStatus.DONE for r in record.values())
    assert session.wait_for_feedback(WAIT)
    assert collector.done.wait(WAIT)
    _check_events(collector.events, recording.get())


def test_failed_results_are_surfaced_too(session: Session) -> None:
    def broken(answer: str) -> float:
        raise ValueError("judge exploded")

    app = _app()
    collector = Collector(expected=1)
    with ChainRecorder(app, app_name="ev", feedbacks=[Feedback(broken).on_output()],
                       session=session) as recording:
        app.invoke({"question": "q"}, config={"callbacks": [collector]})
    _wait_delivered(session, collector.done)
    (data, run_id), = collector.events
    assert data["status"] == "failed"
    assert "judge exploded" in data["error"]
    assert data["result"] is None
    assert run_id == UUID(recording.get().root_run_id or "")


def test_session_listeners_and_record_callbacks_see_the_same_results(
        session: Session) -> None:
    app = _app()
    seen: list[dict[Any, FeedbackResult]] = []
    fired = threading.Event()
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        app.invoke({"question": "q"})
    record = recording.get()
    def on_all_done(results: dict[Any, FeedbackResult]) -> None:
        seen.append(results)
        fired.set()

    returned = record.wait_for_feedback_results(callback=on_all_done)
    assert all(isinstance(r, FeedbackResult) for r in returned.values())
    assert fired.wait(WAIT)
    assert len(seen) == 1
    assert all(r.status is FeedbackStatus.DONE for r in seen[0].values())


def test_async_handler_methods_are_awaited(session: Session) -> None:
    """`async def on_custom_event` and `async def on_feedback_result` both run to their end
    (on Scrutiny's callback thread, in a private loop: no event is lost when the app's loop
    has already stopped)."""
    got: list[str] = []
    done = threading.Event()

    class AsyncBoth(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, *, run_id: UUID,
                                  tags: list[str] | None = None,
                                  metadata: dict[str, Any] | None = None,
                                  **kwargs: Any) -> None:
            await asyncio.sleep(0)
            got.append("event:" + data["feedback_name"])
            if len(got) == 4:
                done.set()

        async def on_feedback_result(self, result: FeedbackResult, record: Record) -> None:
            await asyncio.sleep(0)
            got.append("direct:" + result.feedback_name)
            if len(got) == 4:
                done.set()

    app = _app()
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(), session=session):
        app.invoke({"question": "q"}, config={"callbacks": [AsyncBoth()]})
    _wait_delivered(session, done)
    assert sorted(got) == ["direct:length", "direct:relevance", "event:length",
                           "event:relevance"]


def test_only_handlers_that_listen_are_sent_feedback_events() -> None:
    from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

    from scrutiny.integrations.langchain import ScrutinyCallbackHandler
    from scrutiny.integrations.langchain._handler import _listens

    class Custom(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            return None

    class AsyncCustom(AsyncCallbackHandler):
        async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            return None

    class Results(ScrutinyCallbackHandler):
        def on_feedback_result(self, result: Any, record: Any) -> None:
            return None

    class Plain:
        def on_feedback_result(self, result: Any, record: Any) -> None:
            return None

    assert not _listens(BaseCallbackHandler())
    assert not _listens(AsyncCallbackHandler())
    assert not _listens(ScrutinyCallbackHandler())
    assert _listens(Custom())
    assert _listens(AsyncCustom())
    assert _listens(Results())
    assert _listens(Plain())  # type: ignore[arg-type]


def test_a_handler_that_raises_does_not_keep_the_event_from_the_others(
        session: Session) -> None:
    """LangChain re-raises the error of a handler with `raise_error=True`: the handlers
    after it in the run's list were never sent the event."""
    class Raises(Collector):
        raise_error = True

        def on_custom_event(self, name: str, data: Any, *, run_id: UUID,
                            **kwargs: Any) -> None:
            super().on_custom_event(name, data, run_id=run_id, **kwargs)
            raise RuntimeError("handler bug")

    app = _app()
    first, second = Raises(expected=2), Collector(expected=2)
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        app.invoke({"question": "q"}, config={"callbacks": [first, second]})
    _wait_delivered(session, second.done)
    assert first.done.wait(WAIT)
    _check_events(second.events, recording.get())
    _check_events(first.events, recording.get())


def test_the_event_data_names_the_score_and_the_app(session: Session) -> None:
    """The data is documented (see FEEDBACK_EVENT): `score` as LlamaIndex's event and
    `FeedbackResult.score` call it, and the record's app."""
    def broken(answer: str) -> float:
        raise ValueError("judge exploded")

    app = _app()
    collector = Collector(expected=3)
    with ChainRecorder(app, app_name="ev", app_version="v7",
                       feedbacks=[*_feedbacks(), Feedback(broken).on_output()],
                       session=session):
        app.invoke({"question": "q"}, config={"callbacks": [collector]})
    _wait_delivered(session, collector.done)
    by_name = {d["feedback_name"]: d for d, _ in collector.events}
    assert by_name["relevance"]["score"] == by_name["relevance"]["result"] == 0.5
    assert by_name["broken"]["status"] == "failed"
    assert by_name["broken"]["score"] is None
    assert "judge exploded" in by_name["broken"]["error"]
    for data in by_name.values():
        assert (data["app_name"], data["app_version"]) == ("ev", "v7")
        assert {"record_id", "feedback_name", "status", "score", "explanation",
                "error"} <= set(data)


@pytest.mark.parametrize("model", ["chat", "llm"])
@pytest.mark.parametrize("how", ["ainvoke", "astream"])
async def test_a_model_called_async_as_the_app_reaches_its_handlers(
        session: Session, model: str, how: str) -> None:
    # LangChain hands an async model's start to each handler by itself (or to the inline
    # ones together): the record still knows every handler of the call.
    from langchain_core.language_models import FakeListLLM

    app: Any = FakeListChatModel(responses=["a fine answer"]) if model == "chat" else \
        FakeListLLM(responses=["a fine answer"])
    collector = Collector(expected=2)
    with ChainRecorder(app, app_name="ev", feedbacks=_feedbacks(),
                       session=session) as recording:
        if how == "ainvoke":
            await app.ainvoke("q", config={"callbacks": [collector]})
        else:
            async for _ in app.astream("q", config={"callbacks": [collector]}):
                pass
    record = await recording.get().await_feedback_results(timeout=WAIT)
    assert all(r.status is FeedbackStatus.DONE for r in record.values())
    assert collector.done.wait(WAIT)
    _check_events(collector.events, recording.get())


class SlowForwarder(Collector):
    """Forwards each event to a slow monitoring endpoint."""

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        import time

        time.sleep(0.06)  # (the slow forwarder is what is under test)
        super().on_custom_event(name, data, **kwargs)


def test_a_slow_handler_is_named_in_the_warning_once(
        session: Session, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning named Scrutiny's own `<..._FeedbackBridge object at 0x...>`, once per
    record: never the user's handler that was slow."""
    import logging

    from scrutiny.core import _runtime

    monkeypatch.setattr(_runtime, "SLOW_CALLBACK", 0.05)
    app = _app()
    forwarder = SlowForwarder(expected=6)
    recorder = ChainRecorder(app, app_name="qa", session=session, feedbacks=_feedbacks())
    with caplog.at_level(logging.WARNING, logger="scrutiny"), recorder:
        for _ in range(3):
            app.invoke({"question": "q"}, config={"callbacks": [forwarder]})
    _wait_delivered(session, forwarder.done)
    slow = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    assert len(slow) == 1, slow
    assert "callback LangChain handler SlowForwarder took" in slow[0]
