"""LangChain recording under concurrency: no cross-attribution, no leaked spans, and the
evaluators' own LLM calls never become application records."""

from __future__ import annotations

import asyncio
import contextvars
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from scrutiny import Feedback, FeedbackMode, FeedbackStatus, Record, RecordStatus, Session
from scrutiny.integrations.langchain import ChainRecorder


async def _jitter(question: str) -> str:
    await asyncio.sleep(random.uniform(0, 0.02))  # force the tasks to interleave
    return question


def _sync_jitter(question: str) -> str:
    threading.Event().wait(random.uniform(0, 0.01))  # force the threads to interleave
    return question


def _format(d: dict[str, str]) -> str:
    return f"answer to {d['question']}"


def _make_app(first_step: Any) -> Any:
    """question -> "answer to <question>", through a prompt, a chat model and a parser."""
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    model = FakeListChatModel(responses=["model says hi"])
    app: Any = (
        RunnableLambda(first_step).with_config(run_name="jitter")
        | RunnableParallel(question=RunnablePassthrough(),
                           reply=RunnableLambda(lambda q: {"question": q})
                           | prompt | model | StrOutputParser())
        | RunnableLambda(_format).with_config(run_name="format")
    )
    return app


def _check_no_cross_attribution(records: list[Record], questions: list[str]) -> None:
    assert sorted(r.input for r in records) == sorted(questions)
    span_ids = [s.span_id for r in records for s in r.spans]
    assert len(span_ids) == len(set(span_ids)), "a span is in two records"
    for r in records:
        assert r.status is RecordStatus.OK
        assert r.output == f"answer to {r.input}"
        assert len(r.spans) == len(records[0].spans), "a record gained or lost spans"
        assert sum(s.parent_id is None for s in r.spans) == 1
        known = {s.span_id for s in r.spans}
        assert all(s.parent_id is None or s.parent_id in known for s in r.spans)
        for span in r.spans:
            text = f"{span.inputs!r} {span.outputs!r}"
            mentioned = set(re.findall(r"[a-z-]+-q-\d\d", text))
            assert mentioned <= {r.input}, (
                f"record of {r.input} holds a span of another call: {span.name} {text}")


async def test_concurrent_ainvoke_under_gather_gives_one_record_each(
        session: Session) -> None:
    app = _make_app(_jitter)
    questions = [f"task-q-{i:02d}" for i in range(20)]
    recorder = ChainRecorder(app, app_name="conc", session=session)
    with recorder as recording:
        answers = await asyncio.gather(*(app.ainvoke(q) for q in questions))

    assert answers == [f"answer to {q}" for q in questions]
    _check_no_cross_attribution(recording.records, questions)
    assert recorder.handler._runs == {}, "spans leaked"
    df, _ = session.get_records_and_feedback()
    assert len(df) == 20
    assert all(out == f"answer to {q}" for q, out in zip(df["input"], df["output"],
                                                           strict=True))


def test_threads_inside_the_recorder_context_give_one_record_each(session: Session) -> None:
    app = _make_app(_sync_jitter)
    questions = [f"thread-q-{i:02d}" for i in range(8)]
    with ChainRecorder(app, app_name="threads", session=session) as recording, \
            ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(contextvars.copy_context().run, app.invoke, q)
                   for q in questions]
        answers = [f.result(timeout=30) for f in futures]

    assert answers == [f"answer to {q}" for q in questions]
    _check_no_cross_attribution(recording.records, questions)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 8


def test_threads_with_the_handler_in_config_give_one_record_each(session: Session) -> None:
    app = _make_app(_sync_jitter)
    recorder = ChainRecorder(app, app_name="threads", session=session)
    questions = [f"cfg-q-{i:02d}" for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(app.invoke, q, {"callbacks": [recorder.handler]})
                   for q in questions]
        answers = [f.result(timeout=30) for f in futures]

    assert answers == [f"answer to {q}" for q in questions]
    _check_no_cross_attribution(list(recorder.handler.records), questions)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 8


def test_threads_that_did_not_inherit_the_block_are_not_recorded(session: Session) -> None:
    app = _make_app(_sync_jitter)
    with ChainRecorder(app, app_name="threads", session=session) as recording, \
            ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(app.invoke, "outside").result(timeout=30)
        app.invoke("inside")
    assert [r.input for r in recording.records] == ["inside"]


# ---------------------------------------------------------------------------- evaluators
JUDGE_REPLY = "7"


def _judge_feedbacks(handler: Any) -> list[Feedback]:
    """Feedbacks whose functions call a LangChain chat model, sync and async; they even
    pass the recorder's handler explicitly, the strongest way to get recorded."""
    judge = FakeListChatModel(responses=[JUDGE_REPLY])

    def sync_judge(answer: str) -> float:
        reply = judge.invoke(f"Rate 0-10: {answer}", config={"callbacks": [handler]})
        return int(str(reply.content)) / 10

    async def async_judge(answer: str) -> float:
        prompt = ChatPromptTemplate.from_messages([("human", "Rate: {a}")])
        reply = await (prompt | judge | StrOutputParser()).ainvoke(
            {"a": answer}, config={"callbacks": [handler]})
        return int(reply) / 10

    def plain_judge(answer: str) -> float:  # relies on the recorder context alone
        return int(str(judge.invoke(answer).content)) / 10

    return [Feedback(sync_judge).on_output(), Feedback(async_judge).on_output(),
            Feedback(plain_judge).on_output()]


def _app() -> Any:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    return prompt | FakeListChatModel(responses=["the app's answer"]) | StrOutputParser()


def test_evaluator_llm_calls_are_not_recorded(session: Session) -> None:
    app = _app()
    recorder = ChainRecorder(app, app_name="judged", session=session)
    recorder.handler.feedbacks = _judge_feedbacks(recorder.handler)
    with recorder as recording:
        app.invoke({"question": "q"})
    results = recording.get().wait_for_feedback_results(timeout=30)

    assert [r.status for r in results.values()] == [FeedbackStatus.DONE] * 3
    assert all(r.result == 0.7 for r in results.values())
    assert session.wait_for_feedback(30)
    assert [r.input for r in recorder.handler.records] == ["q"]
    df, _ = session.get_records_and_feedback()
    assert list(df["input"]) == ["q"]
    assert "7" not in set(df["output"])


def test_evaluator_llm_calls_are_not_recorded_while_the_block_is_active(
        session: Session) -> None:
    app = _app()
    recorder = ChainRecorder(app, app_name="judged", session=session,
                             feedback_mode=FeedbackMode.WITH_APP)
    recorder.handler.feedbacks = _judge_feedbacks(recorder.handler)
    with recorder as recording:
        app.invoke({"question": "q1"})
        # evaluation runs while the block (and its configure hook) is still active
        first = recording.get().wait_for_feedback_results(timeout=30)
        app.invoke({"question": "q2"})

    assert all(r.status is FeedbackStatus.DONE for r in first.values())
    assert [r.input for r in recording.records] == ["q1", "q2"]
    assert session.wait_for_feedback(30)
    df, _ = session.get_records_and_feedback()
    assert sorted(df["input"]) == ["q1", "q2"]


# ---------------------------------------------------------------------------- one recorder,
# many blocks at once (a web server with one global recorder and a block per request)
async def test_concurrent_async_with_blocks_of_one_recorder_keep_their_own_records(
        session: Session) -> None:
    app = _make_app(_jitter)
    recorder = ChainRecorder(app, app_name="server", session=session)

    async def handle(question: str) -> tuple[str, list[Record]]:
        await asyncio.sleep(random.uniform(0, 0.01))
        async with recorder as recording:
            await app.ainvoke(question)
            await asyncio.sleep(random.uniform(0, 0.01))  # leave the blocks out of order
        return question, recording.records

    questions = [f"req-q-{i:02d}" for i in range(12)]
    results = await asyncio.gather(*(handle(q) for q in questions))

    for question, records in results:
        assert [r.input for r in records] == [question]
    _check_no_cross_attribution([r for _, rs in results for r in rs], questions)
    await app.ainvoke("after-q-00")  # every block was left: nothing is recorded any more
    assert len(recorder.handler.records) == 12


def test_concurrent_with_blocks_of_one_recorder_in_threads(session: Session) -> None:
    app = _make_app(_sync_jitter)
    recorder = ChainRecorder(app, app_name="server", session=session)
    barrier = threading.Barrier(6)

    def handle(question: str) -> list[str]:
        barrier.wait(timeout=30)
        with recorder as recording:
            app.invoke(question)
            _sync_jitter(question)
        return [r.input for r in recording.records]

    questions = [f"thr-q-{i:02d}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        seen = list(pool.map(handle, questions, timeout=60))
    assert seen == [[q] for q in questions]
    app.invoke("after-q-00")
    assert len(recorder.handler.records) == 6


def test_nested_blocks_of_two_recorders_both_record(session: Session) -> None:
    app = _app()
    outer = ChainRecorder(app, app_name="outer", session=session)
    inner = ChainRecorder(app, app_name="inner", session=session)
    with outer as outer_rec:
        with inner as inner_rec:
            app.invoke({"question": "both"})
        app.invoke({"question": "outer only"})
    assert [r.input for r in inner_rec.records] == ["both"]
    assert [r.input for r in outer_rec.records] == ["both", "outer only"]
    df, _ = session.get_records_and_feedback()
    assert sorted(df["app_id"]) == ["inner:v1", "outer:v1", "outer:v1"]


async def test_child_runs_on_other_threads_stay_under_their_parent(session: Session) -> None:
    """A step handing a sub-chain to a thread (asyncio.to_thread, LangChain's
    run_in_executor, a pool given the context) gives one record with the sub-chain's span
    under the step — not a second record, not a lost span."""
    from langchain_core.runnables.config import run_in_executor

    sub = RunnableLambda(lambda x: x.upper()).with_config(run_name="sub")

    async def to_thread(x: str) -> str:
        return await asyncio.to_thread(sub.invoke, x)

    async def lc_executor(x: str) -> str:
        return await run_in_executor(None, sub.invoke, x)

    def pool(x: str) -> str:
        with ThreadPoolExecutor(2) as executor:
            return executor.submit(contextvars.copy_context().run, sub.invoke, x).result()

    for step in (to_thread, lc_executor, pool):
        app = RunnableLambda(step).with_config(run_name="step")  # type: ignore[arg-type]
        recorder = ChainRecorder(app, app_name=step.__name__, session=session)
        async with recorder as recording:
            assert await app.ainvoke("hi") == "HI"
        record = recording.get()
        by_id = {s.span_id: s for s in record.spans}
        assert [(s.name, by_id[s.parent_id].name if s.parent_id else None)
                for s in record.spans] == [("step", None), ("sub", "step")], step.__name__
        assert len(recording.records) == 1


def test_a_call_that_returned_while_a_background_step_ran_is_ok(session: Session) -> None:
    """A step that starts another LangChain call in the background and does not wait for
    it (an audit log, a cache warm-up) made the call that returned normally a `cancelled`
    record, "the consumer stopped the stream early" — there was no stream — and the steps
    the background call ran after that became records of their own."""
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def log(x: str) -> str:
        started.set()
        release.wait(10)
        return "logged"

    audit = (RunnableLambda(log, name="log")
             | RunnableLambda(lambda x: x, name="after")).with_config(run_name="audit")
    pool = ThreadPoolExecutor(1)

    def answer(x: str) -> str:
        future = pool.submit(contextvars.copy_context().run, audit.invoke, x)
        future.add_done_callback(lambda _: done.set())
        started.wait(10)
        return f"answer to {x}"

    app = RunnableLambda(answer, name="answer")
    try:
        recorder = ChainRecorder(app, app_name="background", session=session)
        with recorder as recording:
            assert app.invoke("q") == "answer to q"
        release.set()
        assert done.wait(10)
    finally:
        pool.shutdown(wait=True)
    record = recording.get()
    assert (record.status, record.output, record.error) == (RecordStatus.OK, "answer to q", None)
    audit_span = next(s for s in record.spans if s.name == "audit")
    assert "in the background" in (audit_span.error or "")
    assert session.flush(10)
    df, _ = session.get_records_and_feedback()
    assert len(df) == 1  # the audit's later step `after` is no record of its own
    # (and once the background call ended, the handler holds nothing of it)
    assert not [*recorder.handler._runs, *recorder.handler._outlived]


async def test_an_ainvoke_that_returned_while_a_task_it_started_ran_is_ok(
        session: Session) -> None:
    """The same with `asyncio.create_task(other.ainvoke(x))` in an async step."""
    started, release = asyncio.Event(), asyncio.Event()

    async def log(x: str) -> str:
        started.set()
        await release.wait()
        return "logged"

    audit = RunnableLambda(lambda x: x, afunc=log, name="audit")
    tasks: list[asyncio.Task[Any]] = []

    async def answer(x: str) -> str:
        tasks.append(asyncio.create_task(audit.ainvoke(x)))
        await started.wait()
        return f"answer to {x}"

    app = RunnableLambda(lambda x: x, afunc=answer, name="answer")
    async with ChainRecorder(app, app_name="background-task", session=session) as recording:
        assert await app.ainvoke("q") == "answer to q"
    release.set()
    await asyncio.gather(*tasks)
    record = recording.get()
    assert (record.status, record.output, record.error) == (RecordStatus.OK, "answer to q", None)
