"""Scrutiny inside real async applications: an ASGI app under concurrent requests, the
application's own event loop and its executor, feedbacks that reach for threads and
executors, and sessions closed from wherever a user closes them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, Record, Session
from scrutiny.core import add_evaluation_cost
from tests.support.loop_ticks import LoopTicks

WAIT = 20.0


def _record(text: str = "q") -> Record:
    now = time.time()
    return Record(app_name="a", app_version="v", input=text, output="o", start_time=now,
                  end_time=now)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds the feedbacks that wait on it until the test sets it (set at the end anyway)."""
    event = threading.Event()
    yield event
    event.set()


async def test_waits_on_stored_records_leave_the_apps_executor_to_the_app(
        session: Session, gate: threading.Event) -> None:
    """A stored record's await read the database on the loop's default executor, one
    thread per wait until its results ended: with as many waits as that executor has
    threads (cpus + 4 by default), the app's own run_in_executor / to_thread calls — a
    sync-only model's ainvoke among them — queued behind them for good."""

    def held(output: str) -> float:
        gate.wait(WAIT)
        return 1.0

    ids = [session.ingest(_record(f"q{i}"), [Feedback(held).on_output()]).record_id
           for i in range(2)]
    assert session.flush(WAIT)
    loop = asyncio.get_running_loop()
    app_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    loop.set_default_executor(app_executor)  # (two threads: the waits fill it at once)
    stored = [session.get_record(i) for i in ids]
    assert all(r is not None for r in stored)
    waits = [asyncio.ensure_future(r.await_feedback_results()) for r in stored if r]
    try:
        await asyncio.sleep(0)  # the waits start
        app_call = loop.run_in_executor(None, lambda: "the app's call")
        done, _ = await asyncio.wait([app_call], timeout=WAIT)
        assert app_call in done, "the app's executor call waited for the stored waits"
        assert not any(w.done() for w in waits)  # (they were still waiting meanwhile)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waits), WAIT)
    finally:
        gate.set()
        for w in waits:
            w.cancel()
        app_executor.shutdown(wait=False)
    assert [[r.status for r in res.values()] for res in results] == \
        [[FeedbackStatus.DONE]] * 2


def test_an_executor_call_of_an_async_feedback_keeps_its_evaluation_cost(
        session: Session) -> None:
    """``loop.run_in_executor(None, ...)`` inside an async feedback ran the call outside
    the evaluation's context: the cost it reported was lost."""

    async def judge(output: str) -> float:
        def call() -> float:
            add_evaluation_cost(prompt_tokens=5)
            return 0.5
        return await asyncio.get_running_loop().run_in_executor(None, call)

    record = session.ingest(_record(), [Feedback(judge).on_output()])
    (result,) = record.wait_for_feedback_results(timeout=WAIT).values()
    assert result.status is FeedbackStatus.DONE
    assert result.cost == {"prompt_tokens": 5}


def test_closing_the_session_from_a_results_callback_ends_within_its_timeout(
        database_url: str) -> None:
    """close() on Scrutiny's callback thread (a record's callback): stores what it can,
    leaves the rest pending and returns, without joining its own thread."""
    session = Session(database_url)
    closed = threading.Event()
    outcome: list[bool] = []

    async def never(output: str) -> float:
        await asyncio.sleep(3600)
        return 1.0

    def close_then_signal(results: object) -> None:
        outcome.append(session.close(timeout=2))
        closed.set()

    quick = session.ingest(_record("quick"), [Feedback(lambda output: 1.0, name="one")
                                               .on_output()])
    slow = session.ingest(_record("slow"), [Feedback(never).on_output()])
    quick.wait_for_feedback_results(callback=close_then_signal)
    assert closed.wait(WAIT)
    assert outcome == [False]  # (the slow one was left unfinished)
    assert [r.status for r in slow.wait_for_feedback_results(timeout=WAIT).values()] == \
        [FeedbackStatus.PENDING]
    with Session(database_url) as reader:
        df, _ = reader.get_records_and_feedback()
    by_input = df.set_index("input")
    assert by_input.loc["quick", "one status"] == "done"
    assert by_input.loc["slow", "never status"] == "pending"


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_closing_the_session_from_a_signal_handler_ends_a_blocked_wait(
        database_url: str) -> None:
    """A SIGTERM-style handler closes the session while the main thread blocks in a wait
    without a timeout: the wait ends with the unfinished result pending."""
    session = Session(database_url)

    async def never(output: str) -> float:
        await asyncio.sleep(3600)
        return 1.0

    closed: list[bool] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: closed.append(session.close(2)))
    try:
        record = session.ingest(_record(), [Feedback(never).on_output()])
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        results = record.wait_for_feedback_results()  # (no timeout: close ends it)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert closed == [False]
    assert [r.status for r in results.values()] == [FeedbackStatus.PENDING]


# ---------------------------------------------------------------------- LangChain
def _langchain() -> Any:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListChatModel

    return FakeListChatModel


def test_a_feedback_calling_a_recorded_model_through_run_in_executor_is_not_recorded(
        session: Session) -> None:
    """The app's model carries the recorder's handler (given at its construction) and a
    feedback calls it through ``loop.run_in_executor(None, model.invoke, ...)``: the
    judge's call became an app record, as the executor's thread ran outside the
    evaluation's context."""
    from scrutiny.integrations.langchain import ScrutinyCallbackHandler

    fake_model = _langchain()
    handler = ScrutinyCallbackHandler("app", session=session)
    model = fake_model(responses=["8"], callbacks=[handler])

    async def judge(output: str) -> float:
        reply = await asyncio.get_running_loop().run_in_executor(None, model.invoke, output)
        return float(reply.content) / 10

    record = session.ingest(_record(), [Feedback(judge).on_output()])
    (result,) = record.wait_for_feedback_results(timeout=WAIT).values()
    assert (result.status, result.result) == (FeedbackStatus.DONE, 0.8)
    assert session.wait_for_feedback(WAIT)
    assert handler.records == []
    df, _ = session.get_records_and_feedback()
    assert list(df["record_id"]) == [record.record_id]


def test_an_asgi_app_under_concurrent_requests(session: Session) -> None:
    """An ASGI app (Starlette) serving 500 requests, 50 at a time, each a recorded chain
    (``async with`` one shared recorder, ``ainvoke``) awaiting its scores; and sync
    endpoints (run on the server's thread pool) blocking on theirs: one record per
    request with its own input and output, no run left open, the thread count flat."""
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    _langchain()
    from langchain_core.runnables import RunnableLambda
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from scrutiny.integrations.langchain import ChainRecorder

    def answer(question: str) -> str:
        return f"answer to {question}"

    async def aanswer(question: str) -> str:
        await asyncio.sleep(0)  # (the requests interleave)
        return answer(question)

    chain = RunnableLambda(lambda q: q) | RunnableLambda(answer, afunc=aanswer)

    async def on_topic(question: str, answer: str) -> float:
        await asyncio.sleep(0)
        return float(answer == f"answer to {question}")

    recorder = ChainRecorder(chain, app_name="api", session=session, feedbacks=[
        Feedback(on_topic).on_input_output(),
        Feedback(lambda output: float(output.startswith("answer")), name="plain")
        .on_output()])

    def reply(record: Record, results: dict[Feedback, Any], question: str) -> JSONResponse:
        return JSONResponse({"question": question, "input": record.input,
                             "output": record.output,
                             "scores": sorted(r.result for r in results.values())})

    async def async_endpoint(request: Request) -> JSONResponse:
        question = request.query_params["q"]
        async with recorder as recording:
            await chain.ainvoke(question)
        record = recording.get()
        return reply(record, await record.await_feedback_results(timeout=WAIT), question)

    def sync_endpoint(request: Request) -> JSONResponse:
        question = request.query_params["q"]
        with recorder as recording:
            chain.invoke(question)
        record = recording.get()
        return reply(record, record.wait_for_feedback_results(timeout=WAIT), question)

    app = Starlette(routes=[Route("/a", async_endpoint), Route("/s", sync_endpoint)])
    threads: list[int] = []

    async def serve() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for batch in range(10):
                path = "/a" if batch % 2 == 0 else "/s"
                responses = await asyncio.gather(*(
                    client.get(path, params={"q": f"{batch}-{i}"}) for i in range(50)))
                for response in responses:
                    assert response.status_code == 200, response.text
                    body = response.json()
                    assert body["input"] == body["question"]
                    assert body["output"] == f"answer to {body['question']}"
                    assert body["scores"] == [1.0, 1.0]
                threads.append(sum(not t.name.startswith("AnyIO worker")  # (the server's)
                                   for t in threading.enumerate()))

    asyncio.run(serve())
    assert session.wait_for_feedback(WAIT)
    df, _ = session.get_records_and_feedback(limit=1000)
    assert len(df) == 500
    assert df["input"].nunique() == 500
    assert recorder.handler._roots == {}
    assert recorder.handler._runs == {}
    assert threads[-1] <= threads[0] + 1, threads


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs signals")
def test_ctrl_c_during_a_recorded_async_call_gives_a_cancelled_record(
        session: Session) -> None:
    """Ctrl-C while ``asyncio.run`` awaits a recorded call: asyncio cancels the main task;
    the call is recorded `cancelled`, nothing stays open, and the next run records."""
    _langchain()
    from langchain_core.runnables import RunnableLambda

    from scrutiny.integrations.langchain import ChainRecorder

    started = threading.Event()

    async def slow(question: str) -> str:
        if question == "hang":
            started.set()
            await asyncio.sleep(3600)
        return question

    chain = RunnableLambda(lambda q: q) | RunnableLambda(lambda q: q, afunc=slow)
    recorder = ChainRecorder(chain, app_name="cli", session=session)

    async def main() -> None:
        async with recorder:
            call = asyncio.ensure_future(chain.ainvoke("hang"))
            await asyncio.to_thread(started.wait, WAIT)
            os.kill(os.getpid(), signal.SIGINT)
            await call

    # (as a terminal's Ctrl-C finds it: a process started in the background by a shell
    # without job control inherits SIGINT ignored, and asyncio then installs no handler)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(main())
    finally:
        signal.signal(signal.SIGINT, inherited)
    (record,) = recorder.handler.records
    assert record.status.value == "cancelled"
    assert recorder.handler._roots == {}
    assert recorder.handler._runs == {}

    async def again() -> Record:
        async with recorder as recording:
            await chain.ainvoke("quick")
        return recording.get()

    assert asyncio.run(again()).status.value == "ok"


async def _takes_a_moment(output: str) -> float:
    await asyncio.sleep(0.3)  # (the feedback's own work)
    return 1.0


async def test_async_with_session_closes_without_holding_the_event_loop(tmp_path: Any) -> None:
    """close() on a running loop held it while evaluations finished: a web app's shutdown
    hook or a notebook cell stopped serving for up to flush_timeout."""
    fb = Feedback(_takes_a_moment).on_output()
    async with LoopTicks() as ticks, Session(f"sqlite:///{tmp_path}/a.sqlite") as session:
        record = session.ingest(_record(), [fb])
    assert session.closed
    assert record.feedback_results[fb].status is FeedbackStatus.DONE  # finished, not dropped
    assert ticks.count >= 5, ticks.count  # the loop went on while the session closed
