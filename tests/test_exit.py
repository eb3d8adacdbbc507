"""Calls still open when the interpreter exits: their records are stored, as cancelled.

Each case runs a real interpreter that records a streamed call, reads part of the stream,
still holds it, and exits; a fresh Session on the same file must then show the record.
(Python finalizes the held stream only while tearing down, after the sessions were closed
at exit: the record was lost, and the session printed a traceback.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from scrutiny import Session


def _langchain_app(answer: str, app_name: str) -> str:
    """The start of a script that records a 3-step chain answering `answer` in the
    database given as its argument (`chain`, `recorder`, one feedback)."""
    return f"""
import sys
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import ChainRecorder

session = Session(sys.argv[1])
chain = (ChatPromptTemplate.from_template("Q: {{q}}")
         | FakeListChatModel(responses=[{answer!r}]) | StrOutputParser())
recorder = ChainRecorder(chain, app_name={app_name!r}, feedbacks=[
    Feedback(lambda output: 1.0, name="one").on_output()])
"""


LANGCHAIN_SCRIPT = _langchain_app("hello there world", "held") + """
with recorder:
    stream = chain.stream({"q": "hi"})
    first = next(stream)
print("read", repr(first))
"""

LLAMA_INDEX_SCRIPT = """
import sys
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from scrutiny import Feedback, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder

Settings.llm = MockLLM(max_tokens=8)
Settings.embed_model = MockEmbedding(embed_dim=8)
session = Session(sys.argv[1])
engine = VectorStoreIndex.from_documents(
    [Document(text="Ireland is rainy.")]).as_query_engine(streaming=True)
recorder = LlamaIndexRecorder(engine, app_name="held", feedbacks=[
    Feedback(lambda output: 1.0, name="one").on_output()])
with recorder:
    response = engine.query("What is the weather like?")
    first = next(response.response_gen)
print("read", repr(first))
"""


def _run(tmp_path: Path, script: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    url = f"sqlite:///{tmp_path}/exit.sqlite"
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run([sys.executable, str(path), url], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return url, proc


def _only_record(url: str) -> dict[str, object]:
    reader = Session(url)
    try:
        df, columns = reader.get_records_and_feedback()
    finally:
        reader.close()
    assert len(df) == 1, "the record of the call still open at exit was lost"
    row: dict[str, object] = df.iloc[0].to_dict()
    row["columns"] = columns
    return row


def test_a_llama_index_stream_held_unread_at_exit_is_stored_as_cancelled(
        tmp_path: Path) -> None:
    url, proc = _run(tmp_path, LLAMA_INDEX_SCRIPT)
    assert "Traceback" not in proc.stderr, proc.stderr
    row = _only_record(url)
    assert row["status"] == "cancelled"
    assert row["error"] == "the process exited before the stream was read to its end"
    assert str(row["output"]).strip() == "text"  # the part the app had read
    assert row["one status"] == "done"


def test_a_langchain_stream_held_unread_at_exit_is_stored_as_cancelled(tmp_path: Path) -> None:
    url, proc = _run(tmp_path, LANGCHAIN_SCRIPT)
    assert "Traceback" not in proc.stderr, proc.stderr
    row = _only_record(url)
    assert row["status"] == "cancelled"
    assert str(row["error"]).startswith("cancelled: the process exited before the call ended")
    assert row["output"] == "h"  # the part the app had read
    assert row["one status"] == "done"


LATE_INGEST_SCRIPT = """
import sys
from scrutiny import Record, Session

session = Session(sys.argv[1])  # never started: nothing was stored before exit


class StoredOnCollection:
    def __del__(self):
        session.ingest(Record(app_name="late", app_version="v1", input="q", output="a"), [])


keep = StoredOnCollection()  # collected only as the interpreter tears down
print("exiting")
"""


def test_a_record_given_while_the_interpreter_tears_down_does_not_hang_the_exit(
        tmp_path: Path) -> None:
    """A session that started then waited forever for its threads to start (new threads
    never run once the interpreter finalizes): the process never exited."""
    _url, proc = _run(tmp_path, LATE_INGEST_SCRIPT)
    assert "was given as the interpreter shuts down: the session can no longer store it" \
        in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


APP_THREADS_SCRIPT = _langchain_app("an answer", "threads") + """
import concurrent.futures
import threading


exiting = threading.Event()


def calls(worker):
    exiting.wait()  # (the main thread has ended: the interpreter exits)
    for i in range(3):
        chain.invoke({"q": f"{worker}-{i}"}, config={"callbacks": [recorder.handler]})


chain.invoke({"q": "main"}, config={"callbacks": [recorder.handler]})
# (run at exit after Scrutiny's own hook, which that call installed, and before the
# interpreter joins the threads)
threading._register_atexit(exiting.set)
for worker in range(2):
    threading.Thread(target=calls, args=(f"thread{worker}",)).start()
pool = concurrent.futures.ThreadPoolExecutor(2)  # (not shut down by the app)
for worker in range(2):
    pool.submit(calls, f"pool{worker}")
print("main thread done")
"""


def test_the_calls_an_apps_threads_make_while_the_interpreter_waits_for_them_are_stored(
        tmp_path: Path) -> None:
    """The sessions were closed at exit before the interpreter joined the app's threads:
    every call those threads made then was dropped ("the session is closed")."""
    url, proc = _run(tmp_path, APP_THREADS_SCRIPT)
    assert "Traceback" not in proc.stderr, proc.stderr
    reader = Session(url)
    try:
        df, _ = reader.get_records_and_feedback()
    finally:
        reader.close()
    assert sorted(df["input"]) == sorted(  # (a chain's one input: its value)
        ["main"] + [f"{worker}-{i}" for worker in ("thread0", "thread1", "pool0", "pool1")
                    for i in range(3)])
    assert (df["one status"] == "done").all()


_SLOW_AT_EXIT = """
import signal, sys, threading, time
from scrutiny import Feedback, Record, Session

signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background CI ignores it)
started, never = threading.Event(), threading.Event()

def slow(output: str) -> float:  # still running when the process exits
    started.set()
    never.wait(120)
    return 1.0

sessions = [Session(f"sqlite:///{sys.argv[1]}/{i}.sqlite", flush_timeout=float(sys.argv[2]))
            for i in range(int(sys.argv[3]))]
for session in sessions:
    started.clear()
    session.ingest(Record(app_name="a", app_version="v", input="q", output="o"),
                   [Feedback(slow, name="slow").on_output()])
    assert started.wait(20)
"""


def _pending_in(folder: Path, count: int) -> list[list[tuple[str, ...]]]:
    import sqlalchemy as sa

    out = []
    for i in range(count):
        engine = sa.create_engine(f"sqlite:///{folder}/{i}.sqlite", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            out.append([tuple(r) for r in conn.execute(sa.text(
                "SELECT status FROM scrutiny_feedback_results"))])
    return out


def test_sessions_left_open_wait_for_their_evaluations_once_at_exit_not_each_in_turn(
        tmp_path: Path) -> None:
    """Each session left open waited its own flush_timeout at exit, one after another: a
    test suite that never closed its sessions, with a slow judge, hung N x 10 s at exit."""
    import time

    began = time.monotonic()
    ran = subprocess.run([sys.executable, "-c", _SLOW_AT_EXIT, str(tmp_path), "2", "6"],
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert ran.returncode == 0, ran.stderr
    assert _pending_in(tmp_path, 6) == [[("pending",)]] * 6
    assert took < 6 * 2, (took, ran.stderr)  # (each in turn: over 12 s before the fix)


def test_ctrl_c_while_the_exit_waits_releases_what_is_unfinished_at_once(
        tmp_path: Path) -> None:
    """Ctrl-C again while the exit waited for evaluations printed a traceback ("Exception
    ignored in: <module 'threading'>") and did not cut the wait short; once more, and the
    results stayed `running`, held by the dead process's lease."""
    script = _SLOW_AT_EXIT + """
def interrupt_the_exit() -> None:  # (Ctrl-C once the exit waits for the evaluations)
    while all(s._exit_deadline is None for s in sessions):
        time.sleep(0.01)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

threading.Thread(target=interrupt_the_exit, daemon=True).start()
"""
    import time

    began = time.monotonic()
    ran = subprocess.run([sys.executable, "-c", script, str(tmp_path), "60", "2"],
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert ran.returncode == 0, ran.stderr
    assert "Exception ignored" not in ran.stderr
    assert "released as pending now" in ran.stderr
    assert _pending_in(tmp_path, 2) == [[("pending",)]] * 2
    assert took < 30, ran.stderr  # (flush_timeout is 60)


def test_a_jupyter_kernel_releases_what_is_unfinished_before_it_is_killed(
        tmp_path: Path) -> None:
    """Jupyter's "Restart kernel" gives the kernel 2.5 s, then SIGTERM (no exit handlers
    run): the exit waited flush_timeout for a running evaluation and was killed first,
    leaving its result `running`, held by the dead kernel's lease."""
    import time

    kernel = "import sys, types\nsys.modules['ipykernel'] = types.ModuleType('ipykernel')\n"
    began = time.monotonic()
    ran = subprocess.run([sys.executable, "-c", kernel + _SLOW_AT_EXIT, str(tmp_path), "60",
                          "1"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert ran.returncode == 0, ran.stderr
    assert _pending_in(tmp_path, 1) == [[("pending",)]]
    assert took < 30, ran.stderr  # (flush_timeout is 60; the kernel waits KERNEL_EXIT_WAIT)
