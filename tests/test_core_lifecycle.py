"""Process lifecycle: exit right after a call, fork, many sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scrutiny import Feedback, FeedbackStatus, Record, Session

SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from scrutiny import Feedback, Record, Session
    url, delay = sys.argv[1], float(sys.argv[2])
    session = Session(url, flush_timeout=1.0)
    async def judge(output):
        await asyncio.sleep(delay)
        return 1.0
    def quick(output):
        return 0.5
    now = time.time()
    session.ingest(Record(app_name="s", app_version="v", input="q", output="a",
                          start_time=now, end_time=now),
                   [Feedback(judge).on_output(), Feedback(quick).on_output()])
    # exit at once, without close()
""")


def _run_script(tmp_path: Path, delay: float) -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    url = f"sqlite:///{tmp_path}/exit.sqlite"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), url, str(delay)], capture_output=True,
                          text=True, timeout=60)
    return proc, time.monotonic() - start


def test_short_script_exit_finishes_quick_feedback(tmp_path: Path) -> None:
    proc, _ = _run_script(tmp_path, 0.05)
    assert proc.returncode == 0, proc.stderr
    assert "cannot join" not in proc.stderr
    with Session(f"sqlite:///{tmp_path}/exit.sqlite") as reader:
        df, _ = reader.get_records_and_feedback()
    assert df.loc[0, "judge status"] == "done"
    assert df.loc[0, "quick status"] == "done"


def test_short_script_exit_is_bounded_and_leaves_slow_work_pending(tmp_path: Path) -> None:
    proc, elapsed = _run_script(tmp_path, 30)
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 15  # the flush timeout is 1 s; never waits the 30 s feedback
    assert "cannot join" not in proc.stderr
    with Session(f"sqlite:///{tmp_path}/exit.sqlite") as reader:
        df, _ = reader.get_records_and_feedback()
    assert df.loc[0, "judge status"] == "pending"
    assert df.loc[0, "quick status"] == "done"


SYNC_MODEL_SCRIPT = textwrap.dedent("""
    import sys, time
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from scrutiny import Feedback, Record, Session

    class SyncOnly(FakeListChatModel):  # no native async: LangChain runs it in an executor
        sleep: float = 30.0

    model = SyncOnly(responses=["8"])
    async def judge(output):
        return float((await model.ainvoke(output)).content) / 10
    session = Session(sys.argv[1], flush_timeout=1.0)
    now = time.time()
    session.ingest(Record(app_name="s", app_version="v", input="q", output="a",
                          start_time=now, end_time=now), [Feedback(judge).on_output()])
    session.close(timeout=1.0)
""")


def test_exit_is_bounded_when_an_async_feedback_waits_on_a_sync_only_model(
        tmp_path: Path) -> None:
    """LangChain runs a sync-only model's call in the loop's default executor: asyncio's
    own pool is joined at exit, so one hung call kept the process alive past close()."""
    script = tmp_path / "sync_model.py"
    script.write_text(SYNC_MODEL_SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path}/x.sqlite"],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20  # the model call hangs 30 s
    with Session(f"sqlite:///{tmp_path}/x.sqlite") as reader:
        df, _ = reader.get_records_and_feedback()
    assert df.loc[0, "judge status"] == "pending"  # left for a worker, not lost


def test_sync_only_models_called_from_async_feedbacks_run_as_many_at_once_as_allowed(
        tmp_path: Path) -> None:
    """asyncio's default executor has min(32, cpus + 4) threads: 6 such calls at once on
    two cores, the rest timing out in its queue."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    lock = threading.Lock()
    running = most = 0
    everyone_in = threading.Event()
    calls = 40

    class SyncOnly(FakeListChatModel):
        def _call(self, *args: object, **kwargs: object) -> str:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
                if most == calls:
                    everyone_in.set()
            everyone_in.wait(10)  # (returns at once when all are in: no fixed sleep)
            with lock:
                running -= 1
            return "8"

    model = SyncOnly(responses=["8"])

    async def judge(output: str) -> float:
        return float((await model.ainvoke(output)).content) / 10

    fb = Feedback(judge, timeout=30).on_output()
    now = time.time()
    with Session(f"sqlite:///{tmp_path}/x.sqlite", max_concurrency=calls) as s:
        for i in range(calls):
            s.ingest(Record(app_name="a", app_version="v", input=f"q{i}", output="o",
                            start_time=now, end_time=now), [fb])
        assert s.wait_for_feedback(60)
        df, _ = s.get_records_and_feedback()
    assert most == calls
    assert (df["judge status"] == "done").all()


def test_many_sessions_left_open_are_pointed_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Session per request without close() keeps each one's threads for good (35 a
    request): the log says so once, and what to do."""
    from scrutiny.core import _session

    monkeypatch.setattr(_session, "_warned_many", False)
    now = time.time()
    sessions = []
    try:
        for i in range(_session.MANY_OPEN + 2):
            s = Session(f"sqlite:///{tmp_path}/s{i}.sqlite")
            s.ingest(Record(app_name="a", app_version="v", input="q", output="o",
                            start_time=now, end_time=now), [])
            sessions.append(s)
    finally:
        for s in sessions:
            s.close()
    warnings = [r for r in caplog.records if "sessions are open in this process" in r.message]
    assert len(warnings) == 1
    assert "close() each when done" in warnings[0].message


def test_one_session_per_request_keeps_thread_count_flat(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/many.sqlite"
    fb = Feedback(lambda output: 1.0, name="x").on_output()
    now = time.time()
    counts = []
    for _ in range(15):
        with Session(url) as s:
            s.ingest(Record(app_name="a", app_version="v", input="q", output="o",
                            start_time=now, end_time=now), [fb])
            s.wait_for_feedback(10)
        counts.append(threading.active_count())
    assert counts[-1] <= counts[2] + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_waiting_on_a_record_of_its_parent_gets_it_pending(
        tmp_path: Path) -> None:
    """The parent's evaluation goes on in the parent: a wait on its record in the child
    (without a timeout) never returned."""
    url = f"sqlite:///{tmp_path}/forkwait.sqlite"
    code = textwrap.dedent(f"""
        import os, sys, threading
        from scrutiny import Feedback, Record, Session
        gate, started = threading.Event(), threading.Event()
        def slow(output):
            started.set()
            gate.wait(30)
            return 1.0
        s = Session({url!r})
        r = s.ingest(Record(app_name="a", app_version="v", input="q", output="o"),
                     [Feedback(slow, name="slow").on_output()])
        assert started.wait(10)
        pid = os.fork()
        if pid == 0:
            waited = []
            t = threading.Thread(target=lambda: waited.append(r.wait_for_feedback_results()),
                                 daemon=True)
            t.start()
            t.join(10)
            os._exit(0 if waited and [x.status.value for x in waited[0].values()]
                     == ["pending"] else 3)
        _, status = os.waitpid(pid, 0)
        gate.set()
        assert [x.status.value for x in r.wait_for_feedback_results(timeout=10).values()] \
            == ["done"]
        s.close()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_records_and_flushes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fork.sqlite"
    now = time.time()
    code = textwrap.dedent(f"""
        import os, time, sys
        from scrutiny import Feedback, Record, Session
        s = Session({url!r})
        fb = Feedback(lambda output: 1.0, name="x").on_output()
        def rec(tag):
            return Record(app_name=tag, app_version="v", input="q", output="o",
                          start_time={now}, end_time={now})
        s.ingest(rec("parent"), [fb]).wait_for_feedback_results(timeout=10)
        pid = os.fork()
        if pid == 0:
            r = s.ingest(rec("child"), [fb])
            r.wait_for_feedback_results(timeout=10)
            ok = s.close(timeout=10)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        s.close()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    with Session(url) as reader:
        df, _ = reader.get_records_and_feedback()
    assert sorted(df["app_name"]) == ["child", "parent"]
    assert (df["x status"] == "done").all()


def test_a_session_closed_as_its_evaluation_loop_starts_closes_at_once(tmp_path: Path) -> None:
    """close() skipped stopping a loop whose thread was still starting its sync pool: that
    loop then ran for ever and close() waited out its whole timeout (60 s here)."""
    session = Session(f"sqlite:///{tmp_path}/quick.sqlite", thread_pool_size=256)
    loop = session._evaluation_loop()  # returns while its thread starts 256 pool threads
    closer = threading.Thread(target=session.close, kwargs={"timeout": 60})
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "close() is waiting for a loop that was never stopped"
    assert not loop.thread.is_alive()


NOTEBOOK = textwrap.dedent("""
    import asyncio, sys
    import nest_asyncio
    from langchain_core.language_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from scrutiny import Feedback, Session
    from scrutiny.integrations.langchain import ChainRecorder

    if sys.argv[2] == "nest":
        nest_asyncio.apply()  # what notebooks do to call asyncio.run() in a running loop
    chain = (ChatPromptTemplate.from_template("{q}")
             | FakeListChatModel(responses=["an answer"]) | StrOutputParser())

    async def judge(output):
        await asyncio.sleep(0.01)
        return 0.5

    session = Session(sys.argv[1])
    recorder = ChainRecorder(chain, app_name="nb", session=session, feedbacks=[
        Feedback(judge).on_output(), Feedback(lambda output: 1.0, name="plain").on_output()])

    async def cell():  # a notebook cell / an async web handler: a loop is running
        with recorder as blocking:
            chain.invoke({"q": "hi"})
        got = [blocking.get().wait_for_feedback_results(timeout=20)]
        async with recorder as awaited:
            await chain.ainvoke({"q": "hi"})
        got.append(await awaited.get().await_feedback_results(timeout=20))
        if sys.argv[2] == "nest":
            with recorder as nested:
                asyncio.run(chain.ainvoke({"q": "x"}))
            got.append(nested.get().wait_for_feedback_results(timeout=20))
        return got

    for results in asyncio.run(cell()):
        print(sorted(r.status.value for r in results.values()))
    print("closed", session.close(timeout=10))
""")


@pytest.mark.parametrize("mode", ["plain", "nest"])
def test_recording_and_waiting_inside_a_running_loop(tmp_path: Path, mode: str) -> None:
    """Inside a running event loop (a notebook cell, an async handler), with and without
    nest_asyncio patching asyncio: blocking and awaited waits both end with the scores."""
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    proc = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path}/nb.sqlite",
                           mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    waits = 3 if mode == "nest" else 2
    assert lines[:waits + 1] == ["['done', 'done']"] * waits + ["closed True"]


def test_a_feedback_that_outlives_close_leaves_no_asyncio_errors_behind(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """close() cancels what is unfinished and the evaluation loop closes; a feedback that
    took its time to unwind was left pending on the closed loop, and when the garbage
    collector later reached it the app's log got asyncio's "Task was destroyed but it is
    pending!" and an "Exception ignored in: <coroutine ...>" (a failure under pytest)."""
    import gc

    async def stubborn(output: str) -> float:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)  # (unwinds slowly)
        return 1.0

    fb = Feedback(stubborn).on_output()
    session = Session(f"sqlite:///{tmp_path}/s.sqlite")
    record = session.ingest(Record(app_name="a", app_version="v", input="q", output="o",
                                   start_time=time.time(), end_time=time.time()), [fb])
    assert record.wait_for_feedback_results(timeout=0.2)[fb].status is not FeedbackStatus.DONE
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert session.close(timeout=1.0) is False
        del record, session
        Session(f"sqlite:///{tmp_path}/next.sqlite").close()  # (no longer the latest one)
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_recorded_call_starts_the_sessions_threads_before_its_record(
        tmp_path: Path) -> None:
    """A stream held unread at exit is ended and stored while the interpreter exits, where
    Python 3.12+ starts no new thread: a session whose first record that was could not
    start its writer or evaluation loop (a traceback, the record lost). Its threads now
    start when the recorded call begins."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from scrutiny.integrations.langchain import ChainRecorder

    model = FakeListChatModel(responses=["hello there"])
    with Session(f"sqlite:///{tmp_path}/warm.sqlite") as session:
        recorder = ChainRecorder(model, app_name="warm", session=session, feedbacks=[
            Feedback(lambda output: 1.0, name="one").on_output()])
        assert (session._writer, session._loop) == (None, None)  # nothing recorded yet
        with recorder as recording:
            stream = model.stream("hi")
            next(stream)  # the call has begun; no record yet
            assert recording.open_calls == 1
            writer, loop = session._writer, session._loop
            stream.close()
        assert writer is not None
        assert loop is not None
        assert recording.get().wait_for_feedback_results(timeout=10)


def test_a_record_given_while_the_session_closes_has_waits_that_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A web server's request threads still serving while a shutdown hook closes the
    session: a record given after close() had taken its list of unfinished evaluations
    (its loop closed, its writer still storing) was stored pending, its evaluation never
    started, and a wait on it without a timeout never returned."""
    from scrutiny.core._writer import StorageWriter

    session = Session(f"sqlite:///{tmp_path}/late.sqlite")
    fb = Feedback(lambda output: 1.0, name="one").on_output()
    session.ingest(Record(app_name="a", app_version="v", input="q", output="o"), [fb])
    assert session.wait_for_feedback(10)
    late: list[Record] = []
    close_writer = StorageWriter.close

    def close_after_a_late_record(writer: StorageWriter, timeout: float | None) -> bool:
        # (another thread's request, given the session at this moment of its close)
        late.append(session.ingest(Record(app_name="a", app_version="v", input="late",
                                          output="o"), [fb]))
        return close_writer(writer, timeout)

    monkeypatch.setattr(StorageWriter, "close", close_after_a_late_record)
    session.close(5)
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(
        late[0].wait_for_feedback_results()), daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive(), "the wait on the late record never ended"
    (result,) = waited[0].values()
    assert result.status in (FeedbackStatus.PENDING, FeedbackStatus.FAILED)


def test_the_close_at_exit_gets_what_the_drain_left_of_flush_timeout(tmp_path: Path) -> None:
    """At exit the running evaluations are waited for first (the drain, within
    flush_timeout), then the session closes: with a stuck evaluation, the close waited
    a whole flush_timeout again, and exit took twice as long as set."""
    session = Session(f"sqlite:///{tmp_path}/exit.sqlite", flush_timeout=1.5)
    gate = threading.Event()
    stuck = Feedback(lambda output: (gate.wait(10), 1.0)[1], name="stuck").on_output()
    session.ingest(Record(app_name="s", app_version="v", input="q", output="a"), [stuck])
    try:
        assert session._exit_timeout() is None  # (not drained: close takes flush_timeout)
        session._drain()  # (waits all of flush_timeout: the evaluation is stuck)
        assert session._exit_timeout() == 1.0  # what is left is nothing: the floor
    finally:
        gate.set()
        assert session.close(10)
