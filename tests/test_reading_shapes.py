"""What the readers (tables, leaderboard, pages, the dashboard's list) read and say: writes
still queued are named, lists do not decode span trees, wide leaderboards stay quiet, and
two results of one feedback name on one record are both shown."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from scrutiny import Feedback, Record, Session, Span
from scrutiny.core import _rows
from scrutiny.dashboard import _views
from tests.support.postgres import postgres_url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table_prefix): a fresh SQLite file, or fresh tables on the PostgreSQL server."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/reading.sqlite", prefix
    return postgres_url(), prefix


def _record(i: int, **extra: object) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=f"q{i}", output=f"answer {i}",
                  start_time=now + i * 0.001, end_time=now + i * 0.001 + 0.5,
                  **extra)  # type: ignore[arg-type]


def _queued_warnings(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING
                     ) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= level and "still queued" in r.getMessage()]


# ---------------------------------------------------------------------- 1: queued writes
def test_reads_say_how_many_writes_are_not_in_them(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the SQLite write lock: the records made meanwhile are not in
    the table, and the reader says so (it returned 1 row of 4 without a word)."""
    db = tmp_path / "held.sqlite"
    session = Session(database_url=f"sqlite:///{db}", flush_timeout=0.2)
    try:
        one = Feedback(lambda output: 1.0, name="one").on_output()
        session.ingest(_record(0), [one]).wait_for_feedback_results(timeout=30)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            for i in range(1, 4):
                session.ingest(_record(i))
            with caplog.at_level(logging.DEBUG, logger="scrutiny"):
                frame, _ = session.get_records_and_feedback()
                board = session.get_leaderboard()
                session.query_records()
                session.get_apps()
                session.get_feedback_summary()
                frame_waited, _ = session.get_records_and_feedback(wait=True, timeout=0.2)
            said = _queued_warnings(caplog, logging.DEBUG)
            # (a warning, then debug lines for a minute: a polling dashboard's reads)
            assert len(_queued_warnings(caplog)) == 1
            assert len(frame) == 1
            assert len(frame_waited) == 1
            assert int(board["records"].iloc[0]) == 1
            assert len(said) == 6, said
            assert all("3 write(s)" in m for m in said), said
            assert "not in this table" in said[0]
            assert "leaderboard" in said[1]
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert session.flush(60)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scrutiny"):
            frame, _ = session.get_records_and_feedback()
        assert len(frame) == 4
        assert _queued_warnings(caplog) == []
    finally:
        session.close()


# ---------------------------------------------------------------------- 2, 3: span trees
@contextlib.contextmanager
def _statements() -> Iterator[list[str]]:
    """The SQL every engine runs meanwhile."""
    seen: list[str] = []

    def note(conn: object, cursor: object, statement: str, *rest: object) -> None:
        seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", note)


def _reads_of(statements: list[str], column: str) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith("SELECT") and column in s]


def _count_span_decoding(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The stored span trees decoded meanwhile (into records)."""
    decoded: list[object] = []
    real = _rows.spans_text

    def spy(value: object) -> object:
        if value is not None:
            decoded.append(value)
        return real(value)  # type: ignore[arg-type]

    monkeypatch.setattr(_rows, "spans_text", spy)
    return decoded


@pytest.fixture
def spanned(backend: tuple[str, str]) -> Iterator[Session]:
    """Three records with span trees and contexts, each evaluated by one feedback."""
    url, prefix = backend
    session = Session(url, table_prefix=prefix)
    one = Feedback(lambda output: 0.5, name="half").on_output()
    for i in range(3):
        spans = [Span(span_id=f"{i}-{k}", parent_id=None if k == 0 else f"{i}-0",
                      name=f"step{k}", kind="chain", start_time=1.0e9 + i,
                      end_time=1.0e9 + i + 1, inputs="x" * 5000, outputs="ok")
                 for k in range(3)]
        session.ingest(_record(i, spans=spans, contexts=[f"context {i}"],
                               metadata={"n": i}), [one])
    assert session.wait_for_feedback(60)
    yield session
    session.close()


def test_the_table_does_not_read_span_trees(spanned: Session,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _count_span_decoding(monkeypatch)
    with _statements() as seen:
        frame, columns = spanned.get_records_and_feedback()
    assert len(frame) == 3
    assert columns == ["half"]
    assert list(frame["half status"]) == ["done"] * 3
    assert list(frame["input"]) == ["q2", "q1", "q0"]
    assert _reads_of(seen, "records") != []
    assert _reads_of(seen, "spans_json") == []
    assert _reads_of(seen, "contexts_json") == []
    assert _reads_of(seen, "calls_json") == []
    assert _reads_of(seen, "explanation") == []
    assert decoded == []


def test_the_dashboards_list_reads_no_span_trees_and_one_record_reads_them(
        spanned: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _count_span_decoding(monkeypatch)
    with _statements() as seen:
        page = _views.records_page(spanned, limit=50)
    assert page["total"] == 3
    assert [r["input_preview"] for r in page["records"]] == ["q2", "q1", "q0"]
    assert [r["feedback"] for r in page["records"]] == [
        {"half": {"status": "done", "score": 0.5, "reason": None}}] * 3
    assert _reads_of(seen, "spans_json") == []
    assert decoded == []
    # the same rows as a page read whole (the public default is unchanged)
    whole = spanned.query_records()
    assert [len(r.spans) for r in whole.records] == [3, 3, 3]
    assert page["records"] == [_views.record_summary(r) for r in whole.records]
    # one record, as the dashboard's record view reads it: its span tree
    one = spanned.get_record(page["records"][0]["record_id"])
    assert one is not None
    detail = _views.record_detail(one)
    assert len(detail["spans"]) == 3
    assert len(decoded) == 4  # (the whole page read above, and this record)
    assert detail["contexts"] == ["context 2"]
    assert detail["metadata"] == {"n": 2}


# ---------------------------------------------------------------------- 4: wide leaderboards
def test_a_leaderboard_of_many_feedbacks_makes_no_pandas_warnings(tmp_path: Path) -> None:
    """120 feedback names: 27 PerformanceWarnings a call (errors here: filterwarnings)."""
    session = Session(f"sqlite:///{tmp_path}/wide.sqlite")
    try:
        feedbacks = [Feedback(lambda output, k=k: k / 120, name=f"metric_{k:03d}").on_output()
                     for k in range(120)]
        session.ingest(_record(0), feedbacks)
        session.ingest(Record(app_name="qa", app_version="v2", input="q", output="a"),
                       feedbacks)
        assert session.wait_for_feedback(60)
        board = session.get_leaderboard()
        assert list(board.columns[:2]) == ["metric_000", "metric_001"]
        assert list(board.columns[120:]) == ["records", "latency", "total_tokens", "pending",
                                             "running", "failed", "skipped"]
        assert board.loc[("qa", "v2"), "metric_060"] == pytest.approx(0.5)
        assert list(board["records"]) == [1, 1]
        assert list(board["failed"]) == [0, 0]
    finally:
        session.close()


# ---------------------------------------------------------------------- 5: two of one name
def test_two_results_of_one_name_are_both_shown(backend: tuple[str, str]) -> None:
    """Releases before the second result of a name was refused stored one beside the first
    (a record scored again): the table and the dashboard's list showed the later, failed
    one and hid the done score the leaderboard counted."""
    url, prefix = backend
    session = Session(url, table_prefix=prefix)
    try:
        score = Feedback(lambda output: 0.16, name="length").on_output()
        other = Feedback(lambda output: 1.0, name="other").on_output()
        record = session.ingest(_record(0), [score, other])
        alone = session.ingest(_record(1), [score])
        record.wait_for_feedback_results(timeout=60)
        assert session.wait_for_feedback(60)
        results = session.store.tables.results  # type: ignore[attr-defined]
        with session.store.engine.begin() as conn:  # type: ignore[attr-defined]
            [first] = conn.execute(sa.select(results).where(
                results.c.record_id == record.record_id,
                results.c.feedback_name == "length")).mappings().all()
            later = first["created_at"] + timedelta(seconds=5)
            # (result_id sorting before the first's: the order is by time, then id)
            conn.execute(sa.insert(results).values({
                **first, "result_id": "0" * 32, "status": "failed", "score": None,
                "error": "judge API down", "created_at": later, "updated_at": later}))

        frame, columns = session.get_records_and_feedback()
        assert columns == ["length", "length (2)", "other"]
        row = frame.set_index("record_id").loc[record.record_id]
        assert row["length"] == pytest.approx(0.16)
        assert row["length status"] == "done"
        assert row["length (2) status"] == "failed"
        assert row["other status"] == "done"
        assert frame.set_index("record_id").loc[alone.record_id,
                                                "length (2) status"] == "n/a"

        [listed] = [r for r in _views.records_page(session)["records"]
                    if r["record_id"] == record.record_id]
        assert listed["feedback"] == {
            "length": {"status": "done", "score": 0.16, "reason": None},
            "length (2)": {"status": "failed", "score": None, "reason": "judge API down"},
            "other": {"status": "done", "score": 1.0, "reason": None}}

        board = session.get_leaderboard()  # (counts both, as ever)
        assert board["length"].iloc[0] == pytest.approx(0.16)
        assert int(board["failed"].iloc[0]) == 1
        one = session.get_record(record.record_id)
        assert one is not None
        assert sorted((r.feedback_name, r.status.value)
                      for r in one.feedback_results.values()) == [
            ("length", "done"), ("length", "failed"), ("other", "done")]
    finally:
        session.close()


def test_result_labels() -> None:
    from scrutiny.core._frames import result_labels  # (new: the file runs on older code)

    assert result_labels(["a", "b", "a", "a"]) == ["a", "b", "a (2)", "a (3)"]
    assert result_labels(["a", "a"], {"a", "a (2)"}) == ["a", "a (3)"]
    assert result_labels(["a (2)", "a", "a"]) == ["a (2)", "a", "a (3)"]


# ---------------------------------------------------------------------- 3: pages
def test_the_table_is_read_in_pages_in_one_snapshot(backend: tuple[str, str]) -> None:
    """Every record read at once held a dict per stored row beside the table (200,000
    records: 1.7 GB for a 171 MB frame): pages make the same table."""
    from scrutiny.core._frames import (  # (new: the file runs on older code)
        FRAME_RECORD_COLUMNS,
        FRAME_RESULT_COLUMNS,
        RecordsFrame,
        records_frame,
    )

    url, prefix = backend
    session = Session(url, table_prefix=prefix)
    try:
        early = Feedback(lambda output: 0.25, name="early").on_output()
        late = Feedback(lambda output: 0.75, name="late").on_output()
        for i in range(7):  # the newest records (first pages) only have "late"
            session.ingest(_record(i), [early] if i < 3 else [late])
        assert session.wait_for_feedback(60)
        whole, whole_columns = records_frame(*session.store.records_and_results())
        pages: list[int] = []
        table = RecordsFrame()

        def add(records: list[dict[str, object]], results: list[dict[str, object]]) -> None:
            pages.append(len(records))
            table.add(records, results)

        session.store.records_and_results_in_pages(  # type: ignore[attr-defined]
            add, record_columns=FRAME_RECORD_COLUMNS, result_columns=FRAME_RESULT_COLUMNS,
            page=2)
        frame, columns = table.build()
        assert pages == [2, 2, 2, 1]
        assert columns == whole_columns == ["early", "late"]
        pd.testing.assert_frame_equal(frame, whole)
        assert list(frame["early status"]) == ["n/a"] * 4 + ["done"] * 3
        pd.testing.assert_frame_equal(session.get_records_and_feedback()[0], whole)
        paged, _ = session.get_records_and_feedback(limit=3, offset=2)
        pd.testing.assert_frame_equal(paged, whole.iloc[2:5].reset_index(drop=True))
    finally:
        session.close()


def test_the_table_says_why_each_result_ended_when_asked(backend: tuple[str, str]) -> None:
    """Exported to CSV or JSON, the table said only "failed" or "skipped": the reason (and
    a judge's explanation) could be read one record at a time, or in the dashboard."""
    import json
    import subprocess
    import sys

    url, prefix = backend

    def broken(output: str) -> float:
        raise ValueError("the judge is down")

    fbs = [Feedback(broken).on_output(),
           Feedback(lambda output: (0.5, "half of it"), name="judged").on_output(),
           Feedback(lambda context: 1.0, name="ctx").on_contexts()]
    with Session(url, table_prefix=prefix) as session:
        session.ingest(Record(app_name="why", app_version="v1", input="q", output="o"), fbs)
        assert session.wait_for_feedback(20)
        plain, _ = session.get_records_and_feedback()
        frame, names = session.get_records_and_feedback(reasons=True)
    assert names == ["broken", "ctx", "judged"]
    assert not [c for c in plain.columns if c.endswith(" reason")]
    row = frame.iloc[0]
    assert (row["broken status"], row["broken reason"]) == (
        "failed", "ValueError: the judge is down")
    assert (row["judged"], row["judged reason"]) == (0.5, "half of it")
    assert row["ctx status"] == "skipped"
    assert "Select.contexts found nothing" in row["ctx reason"]
    ran = subprocess.run(
        [sys.executable, "-m", "scrutiny.cli", "records", "--database-url", url,
         "--table-prefix", prefix, "--format", "json", "--reasons"],
        capture_output=True, text=True, timeout=60, check=True)
    [exported] = json.loads(ran.stdout)
    assert exported["broken reason"] == "ValueError: the judge is down"


def test_the_records_table_sums_what_judging_each_record_cost(tmp_path: Path) -> None:
    """A judge's tokens were stored on each result alone: no table summed what evaluating
    a record cost. `eval_total_tokens` does, apart from the app's own `total_tokens`;
    a record whose feedbacks used no model has none (<NA>), not 0."""
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from scrutiny.providers import LLMJudge

    usage = {"input_tokens": 100, "output_tokens": 10, "total_tokens": 110}
    judge = LLMJudge(GenericFakeChatModel(messages=iter(
        [AIMessage(content='{"score": 8, "reasons": "ok"}', usage_metadata=usage)] * 4)))
    with Session(f"sqlite:///{tmp_path}/cost.sqlite") as session:
        judged = Record(app_name="qa", app_version="v1", input="q", output="a",
                        usage={"prompt_tokens": 7, "completion_tokens": 3,
                               "total_tokens": 10})
        session.ingest(judged, [Feedback(judge.coherence).on_output(),
                                Feedback(judge.conciseness).on_output(),
                                Feedback(lambda output: 1.0, name="plain").on_output()])
        plain = Record(app_name="qa", app_version="v1", input="q2", output="b")
        session.ingest(plain, [Feedback(lambda output: 1.0, name="plain").on_output()])
        assert session.wait_for_feedback(30)
        df, _ = session.get_records_and_feedback()
    by_id = df.set_index("record_id")
    assert by_id.loc[judged.record_id, "eval_total_tokens"] == 220
    assert by_id.loc[judged.record_id, "total_tokens"] == 10
    assert pd.isna(by_id.loc[plain.record_id, "eval_total_tokens"])
    assert str(df["eval_total_tokens"].dtype) == "Int64"
