"""A process forked while its session's writer is inside SQLite can use SQLite.

SQLite keeps process-wide mutexes and its file locks' bookkeeping in the process's memory:
a child forked while the writer was in a write got them copied held, and its first use of
SQLite waited for good (a mutex no thread of the child would release) or found the
database "locked" for good — its records were lost (gunicorn --preload, multiprocessing
with the fork start method, os.fork in a running app).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import scrutiny

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILDREN = 12

# The parent records big outputs in a thread and forks CHILDREN times while it does, each
# time as its writer begins an INSERT (SQLite's trace callback says so): even children
# record a call through the session and read, odd ones open a connection of their own
# with sqlite3 and write. A child that hangs is killed at the deadline; each child's exit
# code is printed.
SCRIPT = textwrap.dedent("""
    import json, os, signal, sqlite3, sys, threading, time
    from sqlalchemy import event
    from scrutiny import Feedback, Record, Session

    DB, CHILDREN = sys.argv[1], int(sys.argv[2])
    fb = Feedback(lambda output: 1.0, name="q").on_output()
    session = Session(f"sqlite:///{DB}")
    inserting = threading.Event()

    def on_connect(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(
            lambda sql: sql.startswith("INSERT") and inserting.set())

    event.listen(session.store.engine, "connect", on_connect)
    session.store.engine.dispose()  # (the connections made so far: without the callback)
    big = "x" * 100_000
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            session.ingest(Record(app_name="parent", app_version="v", input="i",
                                  output=big + str(i)), [fb])
            i += 1
            if i % 10 == 0:
                session.flush(10)

    def writer_busy():
        inserting.clear()
        assert inserting.wait(20), "no traffic"

    def child(k):
        if k % 2:
            con = sqlite3.connect(DB, timeout=5, isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            con.close()
            return 0
        record = session.ingest(Record(app_name=f"child{k}", app_version="v", input="i",
                                       output="o"), [fb])
        results = record.wait_for_feedback_results(timeout=10)
        if [r.status.value for r in results.values()] != ["done"]:
            return 2
        if not session.flush(10):
            return 3
        session.get_records_and_feedback(limit=1)  # (a read)
        return 0

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    pids = {}
    for k in range(CHILDREN):
        writer_busy()
        pid = os.fork()
        if pid == 0:
            try:
                code = child(k)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 5
            os._exit(code)
        pids[pid] = k
    codes = {}
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
        if pids:
            time.sleep(0.02)  # (polling the children's exits, with a deadline)
    for pid, k in pids.items():  # hung: killed
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        codes[k] = "hung"
    stop.set()
    thread.join(20)
    assert session.close(20)
    print(json.dumps({str(k): c for k, c in sorted(codes.items())}))
""")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new interpreter that imports this scrutiny package."""
    package_root = os.path.dirname(os.path.dirname(scrutiny.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_children_forked_while_the_writer_writes_can_use_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "fork.sqlite"
    started = time.monotonic()
    proc = _run(SCRIPT, str(db), str(CHILDREN))
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == {str(k): 0 for k in range(CHILDREN)}, (
        f"children's exit codes (2: result not done, 3: not flushed, 5: raised, 'hung': "
        f"killed at the deadline): {codes}\n{proc.stderr[-3000:]}")
    con = sqlite3.connect(db)
    try:
        stored = dict(con.execute(
            "SELECT r.app_name, f.status FROM scrutiny_records r JOIN "
            "scrutiny_feedback_results f ON f.record_id = r.record_id "
            "WHERE r.app_name LIKE 'child%'").fetchall())
    finally:
        con.close()
    assert stored == {f"child{k}": "done" for k in range(0, CHILDREN, 2)}
    assert time.monotonic() - started < 60


def test_a_fork_while_idle_leaves_the_parent_and_the_child_working(tmp_path: Path) -> None:
    """The gate in the fork hooks lets go after the fork: the parent goes on writing, and
    a child of the child (whose gate was made anew) can fork and write as well."""
    url = f"sqlite:///{tmp_path}/idle.sqlite"
    code = textwrap.dedent(f"""
        import os, sys
        from scrutiny import Feedback, Record, Session
        fb = Feedback(lambda output: 1.0, name="q").on_output()
        s = Session({url!r})
        def rec(tag):
            r = s.ingest(Record(app_name=tag, app_version="v", input="i", output="o"), [fb])
            return [x.status.value for x in r.wait_for_feedback_results(timeout=10).values()]
        assert rec("before") == ["done"]
        pid = os.fork()
        if pid == 0:
            ok = rec("child") == ["done"]
            grandchild = os.fork()
            if grandchild == 0:
                os._exit(0 if rec("grandchild") == ["done"] and s.flush(10) else 4)
            _, status = os.waitpid(grandchild, 0)
            os._exit(0 if ok and s.flush(10) and status == 0 else 3)
        assert rec("after") == ["done"]
        _, status = os.waitpid(pid, 0)
        assert s.close(10)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    con = sqlite3.connect(tmp_path / "idle.sqlite")
    try:
        names = sorted(n for (n,) in con.execute("SELECT app_name FROM scrutiny_records"))
    finally:
        con.close()
    assert names == ["after", "before", "child", "grandchild"]



def test_a_child_goes_on_storing_after_its_parent_closed(tmp_path: Path) -> None:
    """The child closes its copies of the parent's idle SQLite connections: left to the
    garbage collector, they kept the parent's lock bookkeeping in the child, where SQLite
    took it for locks the child held. The parent, closing its last connection, then
    found the database unused: it deleted the write-ahead log the child was writing to,
    and the child's later records were lost, though its flush said they were stored."""
    db = tmp_path / "closed.sqlite"
    code = textwrap.dedent(f"""
        import os, sys
        from scrutiny import Record, Session
        s = Session({f"sqlite:///{db}"!r})
        def rec(tag):
            s.ingest(Record(app_name=tag, app_version="v", input="i", output="o"))
            return s.flush(10)
        assert rec("parent")
        to_parent, from_child = os.pipe()
        to_child, from_parent = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = rec("child1")
            os.write(from_child, b"1")
            os.read(to_child, 1)  # (the parent has closed its session)
            ok = rec("child2") and ok
            os._exit(0 if s.close(10) and ok else 3)
        os.read(to_parent, 1)
        assert s.close(10)
        os.write(from_parent, b"1")
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    con = sqlite3.connect(db)
    try:
        names = sorted(n for (n,) in con.execute("SELECT app_name FROM scrutiny_records"))
    finally:
        con.close()
    assert names == ["child1", "child2", "parent"]


def test_an_in_memory_session_goes_on_in_a_forked_child() -> None:
    """The child keeps its copy of the in-memory database: a new connection opened an
    empty one, and every write of the child failed ("no such table")."""
    code = textwrap.dedent("""
        import os, sys
        from scrutiny import Feedback, Record, Session
        fb = Feedback(lambda output: 1.0, name="q").on_output()
        s = Session("sqlite://")
        s.ingest(Record(app_name="parent", app_version="v", input="i", output="o"))
        assert s.flush(10)
        pid = os.fork()
        if pid == 0:
            r = s.ingest(Record(app_name="child", app_version="v", input="i", output="o"),
                         [fb])
            done = [x.status.value for x in r.wait_for_feedback_results(timeout=10).values()]
            df, _ = s.get_records_and_feedback()
            os._exit(0 if done == ["done"] and sorted(df["app_name"]) == ["child", "parent"]
                     else 3)
        _, status = os.waitpid(pid, 0)
        assert s.close(10)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_a_fork_waits_for_a_thread_inside_sqlite_which_may_take_another_connection(
        tmp_path: Path) -> None:
    """The fork waits until the thread using SQLite is out; that thread, taking a second
    connection while the fork waits, goes on (it waited for the fork, which waited for
    it, until the fork gave up)."""
    code = textwrap.dedent(f"""
        import logging, os, sys, threading, time
        from scrutiny import Session
        warnings = []
        logging.getLogger("scrutiny").addHandler(logging.Handler())
        logging.getLogger("scrutiny").handlers[-1].emit = warnings.append
        s = Session({f"sqlite:///{tmp_path}/gate.sqlite"!r})
        inside, forking, out = threading.Event(), threading.Event(), []
        # (registered after scrutiny's: runs before it, as the fork begins)
        os.register_at_fork(before=forking.set)
        def use():
            with s.store._connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                inside.set()
                assert forking.wait(20)
                with s.store._connect() as again:  # (while the fork waits)
                    again.exec_driver_sql("SELECT 1")
                out.append(True)  # (still inside)
        t = threading.Thread(target=use)
        t.start()
        assert inside.wait(20)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if out else 3)
        took = time.monotonic() - started
        t.join(20)
        _, status = os.waitpid(pid, 0)
        assert out and took < 2, took
        assert not warnings, warnings
        assert s.close(10)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
