"""Feedback on LangChain records: bad feedbacks fail visibly, modes behave, odd payloads store."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from datetime import datetime, timezone
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from scrutiny import Feedback, FeedbackMode, FeedbackStatus, RecordStatus, Session
from scrutiny.integrations.langchain import ChainRecorder

WAIT = 15.0
ANSWER = "a good answer"


def _app() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | FakeListChatModel(responses=[ANSWER]) | StrOutputParser()


def _good(answer: str) -> float:
    return 1.0 if answer == ANSWER else 0.0


# ---------------------------------------------------------------------------- bad feedbacks
def test_failing_timing_out_and_garbage_feedbacks_fail_with_reasons(session: Session) -> None:
    def raises(answer: str) -> float:
        raise ConnectionError("judge unreachable")

    async def hangs(answer: str) -> float:
        await asyncio.sleep(5)
        return 1.0

    def garbage(answer: str) -> Any:
        return "great!"

    f_raise = Feedback(raises).on_output()
    f_hang = Feedback(hangs, timeout=0.2).on_output()
    f_garbage = Feedback(garbage).on_output()
    f_good = Feedback(_good).on_output()
    app = _app()
    with ChainRecorder(app, app_name="bad", session=session,
                       feedbacks=[f_raise, f_hang, f_garbage, f_good]) as recording:
        assert app.invoke({"question": "q"}) == ANSWER  # the app is untouched

    record = recording.get()
    assert record.status is RecordStatus.OK
    results = record.wait_for_feedback_results(timeout=WAIT)
    assert results[f_good].status is FeedbackStatus.DONE
    assert results[f_good].result == 1.0
    for fb, needle in ((f_raise, "judge unreachable"), (f_hang, "timed out"),
                       (f_garbage, "great!")):
        result = results[fb]
        assert result.status is FeedbackStatus.FAILED, fb
        assert result.result is None, fb  # never 0, -1 or NaN
        assert needle in (result.error or ""), result.error
    assert "ConnectionError" in (results[f_raise].error or "")

    df, cols = session.get_records_and_feedback()
    assert sorted(cols) == ["_good", "garbage", "hangs", "raises"]
    row = df.iloc[0]
    assert row["_good status"] == "done"
    assert row["_good"] == 1.0
    for name in ("garbage", "hangs", "raises"):
        assert row[f"{name} status"] == "failed"
        assert math.isnan(row[name])


def test_an_empty_selection_is_skipped_with_a_reason(session: Session) -> None:
    def relevance(context: str) -> float:
        return 1.0

    f = Feedback(relevance).on_contexts()
    app = _app()  # no retriever: nothing to select
    with ChainRecorder(app, app_name="empty", feedbacks=[f], session=session) as recording:
        app.invoke({"question": "q"})
    result = recording.get().wait_for_feedback_results(timeout=WAIT)[f]
    assert result.status is FeedbackStatus.SKIPPED
    assert result.result is None
    assert result.error
    assert "contexts" in result.error


def test_context_feedback_fans_out_over_retrieved_documents(
        session: Session, make_retrieval_chain: Any) -> None:
    calls: list[str] = []
    lock = threading.Lock()

    def grounded(context: str) -> float:
        with lock:
            calls.append(context)
        return 1.0 if "capital" in context else 0.0

    f = Feedback(grounded).on_contexts()
    rag = make_retrieval_chain(["Paris."], k=3)
    with ChainRecorder(rag, app_name="rag", feedbacks=[f], session=session) as recording:
        rag.invoke("capital of France?")
    record = recording.get()
    result = record.wait_for_feedback_results(timeout=WAIT)[f]
    assert result.status is FeedbackStatus.DONE
    assert sorted(calls) == sorted(record.contexts)
    assert len(calls) == 3


# ---------------------------------------------------------------------------- modes
def test_with_app_mode_results_are_final_when_the_block_is_left(session: Session) -> None:
    async def slow(answer: str) -> float:
        await asyncio.sleep(0.3)
        return 0.5

    fbs = [Feedback(slow).on_output(), Feedback(_good).on_output()]
    app = _app()
    with ChainRecorder(app, app_name="with_app", feedbacks=fbs, session=session,
                       feedback_mode=FeedbackMode.WITH_APP) as recording:
        app.invoke({"question": "q1"})
        app.invoke({"question": "q2"})

    for record in recording.records:
        statuses = {fb.name: r.status for fb, r in record.feedback_results.items()}
        assert statuses == {"slow": FeedbackStatus.DONE, "_good": FeedbackStatus.DONE}
    df, _ = session.get_records_and_feedback()  # read-your-writes, no waiting
    assert list(df["slow status"]) == ["done", "done"]
    assert list(df["slow"]) == [0.5, 0.5]


async def test_with_app_mode_under_async_with(session: Session) -> None:
    async def slow(answer: str) -> float:
        await asyncio.sleep(0.2)
        return 0.5

    f = Feedback(slow).on_output()
    app = _app()
    async with ChainRecorder(app, app_name="with_app", feedbacks=[f], session=session,
                             feedback_mode="with_app") as recording:
        await app.ainvoke({"question": "q"})
    assert recording.get().feedback_results[f].status is FeedbackStatus.DONE


def test_session_with_app_mode_is_honoured_by_the_recorder(database_url: str) -> None:
    async def slow(answer: str) -> float:
        await asyncio.sleep(0.2)
        return 0.5

    f = Feedback(slow).on_output()
    app = _app()
    with Session(database_url, feedback_mode=FeedbackMode.WITH_APP) as session:
        with ChainRecorder(app, app_name="m", feedbacks=[f], session=session) as recording:
            app.invoke({"question": "q"})
        assert recording.get().feedback_results[f].status is FeedbackStatus.DONE


def test_none_mode_results_are_skipped_with_a_reason(session: Session) -> None:
    called: list[str] = []

    def judge(answer: str) -> float:
        called.append(answer)
        return 1.0

    f = Feedback(judge).on_output()
    app = _app()
    with ChainRecorder(app, app_name="none", feedbacks=[f], session=session,
                       feedback_mode=FeedbackMode.NONE) as recording:
        app.invoke({"question": "q"})
    result = recording.get().wait_for_feedback_results(timeout=WAIT)[f]
    assert result.status is FeedbackStatus.SKIPPED
    assert result.error
    assert "none" in result.error
    assert result.result is None
    assert called == []
    df, _ = session.get_records_and_feedback()
    assert list(df["judge status"]) == ["skipped"]


# ---------------------------------------------------------------------------- payloads
@dataclasses.dataclass
class Report:
    when: datetime
    tags: set[str]
    blob: bytes


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Slotted({self.value})"


def test_non_json_outputs_and_uncopyable_inputs_are_stored_safely(session: Session) -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

    def build(inputs: dict[str, Any]) -> dict[str, Any]:
        return {"report": Report(when, {"b", "a"}, b"\x00\x01binary"),
                "slotted": Slotted(7), "question": inputs["question"]}

    app = RunnableLambda(build).with_config(run_name="build")
    f = Feedback(lambda out: 1.0, name="seen").on(lambda r: r.output)
    lock = threading.Lock()
    with ChainRecorder(app, app_name="odd", feedbacks=[f], session=session) as recording:
        out = app.invoke({"question": "odd?", "lock": lock, "gen": (i for i in range(3))})

    assert isinstance(out["report"], Report)  # the app got its own objects back
    assert out["report"].tags == {"a", "b"}
    record = recording.get()
    assert record.status is RecordStatus.OK
    assert record.wait_for_feedback_results(timeout=WAIT)[f].status is FeedbackStatus.DONE

    df, _ = session.get_records_and_feedback()
    assert len(df) == 1
    output = df.loc[0, "output"]
    assert isinstance(output, dict)
    report = output["report"]
    assert report["when"].startswith("2024-05-01T12:00:00")
    assert report["tags"] == ["a", "b"]
    assert report["blob"]["__type__"] == "bytes"
    assert report["blob"]["length"] == len(b"\x00\x01binary")
    assert "Slotted(7)" in output["slotted"]["__repr__"]
    assert df.loc[0, "input"] == "odd?"

    stored = session.get_record(record.record_id)
    assert stored is not None
    root = stored.root_span()
    assert root is not None
    assert "lock" in root.inputs
    assert "locked" in str(root.inputs["lock"])


def test_a_dataclass_output_is_the_main_output(session: Session) -> None:
    app: Any = RunnableLambda(lambda q: Report(datetime.now(timezone.utc), {"x"}, b""))
    with ChainRecorder(app, app_name="odd", session=session) as recording:
        app.invoke("q")
    assert isinstance(recording.get().output, Report)
    df, _ = session.get_records_and_feedback()
    assert df["output"].tolist()[0]["tags"] == ["x"]
