"""Delivering results back to the app: what close() and the exit still deliver, and what a
slow-callback warning names."""

from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from scrutiny import Feedback, FeedbackResult, Record, Session


def make_record(i: int = 0) -> Record:
    return Record(app_name="app", app_version="v1", input=f"question {i}",
                  output=f"answer {i}")


def one(name: str = "one") -> Feedback:
    return Feedback(lambda output: 1.0, name=name).on_output()


# ---------------------------------------------------------------- close() and the exit
def test_close_runs_every_queued_callback_within_its_timeout(database_url: str) -> None:
    """close() gave the callback thread half a second whatever its timeout, and returned
    True: a listener forwarding each result (0.2 s each) got 2 of 5."""
    got: list[str] = []

    def forward(result: FeedbackResult, record: Record) -> None:
        time.sleep(0.2)  # (the listener's own slow work: an HTTP post)
        got.append(result.feedback_name)

    session = Session(database_url, on_result=[forward])
    record = session.ingest(make_record(), [one(f"f{i}") for i in range(5)])
    futures = list(record.feedback_futures().values())
    concurrent.futures.wait(futures, timeout=10)
    assert session.close(timeout=10) is True
    assert sorted(got) == [f"f{i}" for i in range(5)]


def test_close_that_runs_out_says_how_many_callbacks_it_left(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    calls: list[str] = []

    def stuck(result: FeedbackResult, record: Record) -> None:
        calls.append(result.feedback_name)
        release.wait(10)

    session = Session(database_url, on_result=[stuck])
    try:
        record = session.ingest(make_record(), [one("a"), one("b"), one("c")])
        concurrent.futures.wait(list(record.feedback_futures().values()), timeout=10)
        began = time.monotonic()
        assert session.close(timeout=1.0) is False
        assert time.monotonic() - began < 5
    finally:
        release.set()
    said = [r.getMessage() for r in caplog.records if "not yet run" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "3 callback(s)" in said[0]


def test_wait_for_feedback_returns_once_the_listeners_of_its_results_ran(
        database_url: str) -> None:
    """A batch script waits with wait_for_feedback(), then exits: its forwarders had run
    for about half of the results."""
    got: list[str] = []

    def forward(result: FeedbackResult, record: Record) -> None:
        time.sleep(0.01)
        got.append(record.record_id)

    called: list[str] = []
    answers: list[bool] = []  # (a wait on the callback thread cannot wait for itself)
    with Session(database_url, on_result=[forward]) as session:
        records = [session.ingest(make_record(i), [one()]) for i in range(40)]
        records[0].wait_for_feedback_results(
            callback=lambda results: answers.append(session.wait_for_feedback(10)))
        for record in records:
            record.wait_for_feedback_results(
                callback=lambda results, rid=record.record_id: called.append(rid))
        assert session.wait_for_feedback(30) is True
        assert len(got) == 40
        assert len(called) == 40
        assert answers == [True]


EXIT_APP = """
import sys, time
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import FEEDBACK_EVENT, ChainRecorder

out = open(sys.argv[2], "a")

class Forward(BaseCallbackHandler):
    def on_custom_event(self, name, data, **kw):
        if name == FEEDBACK_EVENT:
            time.sleep(0.2)  # (an HTTP post to monitoring)
            out.write("E " + data["feedback_name"] + "\\n"); out.flush()

def listen(result, record):
    time.sleep(0.002)
    out.write("L\\n"); out.flush()

session = Session(sys.argv[1], on_result=[listen])
llm = FakeListChatModel(responses=["hello"])
recorder = ChainRecorder(llm, app_name="a", session=session, feedbacks=[
    Feedback(lambda output: 1.0, name=f"f{i}").on_output() for i in range(5)])
with recorder as r:
    llm.invoke("hi", config={"callbacks": [Forward()]})
r.get().wait_for_feedback_results(timeout=10)
for i in range(200):
    session.ingest(Record(app_name="b", app_version="1", input="q", output="a"),
                   [Feedback(lambda output: 1.0, name="ok").on_output()])
"""


def test_the_exit_delivers_queued_feedback_events_and_listener_calls(tmp_path: Path) -> None:
    """The callback thread is a daemon: what it had not run when the session closed at
    exit (given half a second) died with the process."""
    pytest.importorskip("langchain_core")
    out = tmp_path / "delivered.txt"
    script = "from scrutiny import Record\n" + textwrap.dedent(EXIT_APP)
    done = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path}/t.sqlite", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = out.read_text().split("\n")
    assert sorted(line for line in lines if line.startswith("E ")) == [
        f"E f{i}" for i in range(5)]
    assert lines.count("L") == 205  # (5 results of the chain's record, 200 of the others)
    assert "not yet run" not in done.stderr


# ---------------------------------------------------------------- slow-callback warnings
class Forwarder:
    """A listener object, naming what it stands for as the framework bridges do."""

    __scrutiny_name__ = "LangChain handler MyForwarder"

    def __call__(self, result: FeedbackResult, record: Record) -> None:
        time.sleep(0.06)


def test_a_slow_callback_object_is_named_by_its_own_name_once(
        database_url: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning named `<..._FeedbackBridge object at 0x...>`, once per record (each
    had its own bridge, so its own address)."""
    from scrutiny.core import _runtime

    monkeypatch.setattr(_runtime, "SLOW_CALLBACK", 0.05)
    with Session(database_url) as session:
        for i in range(3):
            session.ingest(make_record(i), [one()], listeners=[Forwarder()])
        assert session.wait_for_feedback(20)
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "callback LangChain handler MyForwarder took" in slow[0]
    assert " at 0x" not in slow[0]


class Nameless:
    def __call__(self, result: FeedbackResult, record: Record) -> None:
        time.sleep(0.06)


def test_a_callable_object_is_named_by_its_class_not_its_address(
        database_url: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from scrutiny.core import _runtime

    monkeypatch.setattr(_runtime, "SLOW_CALLBACK", 0.05)
    with Session(database_url) as session:
        for i in range(3):
            session.ingest(make_record(i), [one()], listeners=[Nameless()])
        assert session.wait_for_feedback(20)
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1, slow
    assert "callback Nameless took" in slow[0]


def test_the_names_warned_about_are_bounded(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from scrutiny.core import _runtime

    monkeypatch.setattr(_runtime, "SLOW_CALLBACK", 0.0)
    monkeypatch.setattr(_runtime, "SLOW_NAMES_KEPT", 3)
    notifier = _runtime.Notifier()
    try:
        for i in range(10):
            def fn() -> None:
                pass
            fn.__qualname__ = f"made_{i}"
            notifier.call(fn)
        assert notifier.settle(10)
    finally:
        assert notifier.close(10) == 0
    slow = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "took" in r.getMessage()]
    assert len(slow) == 3, slow
    assert "no longer named" in slow[-1]
    assert len(notifier._warned) == 3
