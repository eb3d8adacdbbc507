"""Storage: exact round trips, safe representations, limits, concurrent writers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import multiprocessing
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import sqlalchemy as sa

from scrutiny import Feedback, FeedbackStatus, Record, Session, TokenUsage
from scrutiny.core import _serialize
from scrutiny.core._serialize import TRUNCATED_KEY
from tests.support.postgres import postgres_url


def make_record(**kw: object) -> Record:
    now = time.time()
    base: dict[str, object] = {"app_name": "app", "app_version": "v1", "input": "q",
                               "output": "a", "start_time": now, "end_time": now}
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


@dataclasses.dataclass
class Answer:
    text: str
    at: dt.datetime


class Model(pydantic.BaseModel):
    name: str
    score: float


class Slotted:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1


def _gen():  # type: ignore[no-untyped-def]
    yield 1


@pytest.mark.parametrize(
    "value",
    [
        Answer("hi", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)),
        Model(name="m", score=0.5),
        {"when": dt.datetime.now(dt.timezone.utc), "tags": {"b", "a"}},
        b"\x00\x01bytes",
        np.arange(3),
        np.float64(0.5),
        Slotted(),
        threading.Lock(),
        _gen(),
        {1: "int key"},
    ],
    ids=["dataclass", "pydantic", "datetime-set", "bytes", "ndarray", "npfloat", "slots",
         "lock", "generator", "intkey"],
)
def test_anything_serializes_without_raising(value: object) -> None:
    text = _serialize.dumps(value)
    assert isinstance(_serialize.loads(text), dict | list | str | int | float)


def test_only_the_odd_part_of_a_value_becomes_a_description() -> None:
    """One value orjson refuses (a cycle, an int over 64 bits, a tuple key, nesting past
    its depth) turned the whole structure — a record's whole span tree — into a repr."""
    loop: list[object] = ["kept"]
    loop.append(loop)
    deep: list[object] = []
    level = deep
    for _ in range(300):
        level.append([])
        level = level[0]  # type: ignore[assignment]
    value = {"cycle": loop, "big": 2 ** 70, ("a", 1): "tuple key", "deep": deep, "ok": 1}
    back = _serialize.loads(_serialize.dumps(value))
    assert back["cycle"][0] == "kept"
    assert back["cycle"][1] == {"__type__": "list", "__repr__": "<cycle>"}
    assert back["big"] == str(2 ** 70)
    assert back["('a', 1)"] == "tuple key"
    assert back["ok"] == 1
    assert "<nested too deep>" in _serialize.dumps(back["deep"])


def test_an_object_shared_by_many_spans_is_converted_once_per_encoding() -> None:
    """Every step of a LangGraph chat holds the same message objects: each was dumped
    once per occurrence (a 60-turn chat: 14,580 pydantic dumps for 3,000 objects)."""
    dumps: list[str] = []

    class Message(pydantic.BaseModel):
        text: str

        def model_dump(self, **kw: Any) -> dict[str, Any]:
            dumps.append(self.text)
            return super().model_dump(**kw)

    history = [Message(text=f"m{i}") for i in range(3)]
    spans = [{"inputs": {"messages": list(history)}, "outputs": list(history)}
             for _ in range(4)]
    back = _serialize.loads(_serialize.dumps(spans))
    assert sorted(dumps) == ["m0", "m1", "m2"]
    assert back == [{"inputs": {"messages": [{"text": f"m{i}"} for i in range(3)]},
                     "outputs": [{"text": f"m{i}"} for i in range(3)]}] * 4
    _serialize.dumps(spans)  # a new encoding converts again (objects may have changed)
    assert len(dumps) == 6


def test_oversized_payload_is_truncated_with_an_explicit_marker_within_the_limit() -> None:
    """The marker held a prefix of the JSON text, escaped again: over the limit (quotes
    and newlines doubled it), and a preview that was not the text."""
    for text in ("x" * 5000, 'say "hi"\n' * 600, "\x00" * 5000, "🎉" * 2000):
        dumped = _serialize.dumps(text, max_bytes=1000)
        assert len(dumped.encode()) <= 1000
        back = _serialize.loads(dumped)
        assert back[TRUNCATED_KEY] is True
        assert back["original_bytes"] == len(_serialize.dumps(text).encode())
        assert text.startswith(back["preview"])
        assert len(back["preview"]) > 0


def test_a_huge_or_odd_value_in_one_span_keeps_the_span_tree(tmp_path: Path) -> None:
    """The span tree is one JSON list: one span's 5 MB output, or a value orjson refuses,
    replaced the whole tree with one marker or repr and the record read back no spans."""
    from scrutiny import Span

    spans = [Span("1", None, "root", "chain", 0.0, end_time=1.0, outputs="answer"),
             Span("2", "1", "retriever", "retriever", 0.0, end_time=1.0,
                  outputs="x" * 5_000_000),
             Span("3", "1", "model", "chat_model", 0.0, end_time=1.0,
                  outputs={"tokens": 2 ** 70})]
    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url, max_payload_bytes=100_000) as s:
        record = s.ingest(make_record(spans=spans), [])
    with Session(url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert [sp.name for sp in back.spans] == ["root", "retriever", "model"]
    assert back.spans[0].outputs == "answer"
    assert "[__scrutiny_truncated__" in back.spans[1].outputs or \
        back.spans[1].outputs[TRUNCATED_KEY] is True
    assert back.spans[2].outputs == {"tokens": str(2 ** 70)}


def test_non_serializable_output_is_stored_safely(tmp_path: Path) -> None:
    out = {"answer": Answer("hello", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)),
           "lock": threading.Lock(), "raw": b"\x00"}
    with Session(f"sqlite:///{tmp_path}/s.sqlite") as s:
        fb = Feedback(lambda output: 1.0, name="x").on_output()
        record = s.ingest(make_record(output=out), [fb])
        assert record.wait_for_feedback_results(timeout=10)[fb].status is FeedbackStatus.DONE
        df, _ = s.get_records_and_feedback()
    stored = df.loc[0, "output"]
    assert stored["answer"] == {"text": "hello", "at": "2026-01-01T00:00:00Z"}
    assert stored["lock"]["__type__"].endswith("lock")
    assert stored["raw"] == {"__type__": "bytes", "length": 1, "preview": "00"}


def test_huge_output_is_truncated_in_storage(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/s.sqlite", max_payload_bytes=2048) as s:
        s.ingest(make_record(output="y" * 100_000), [])
        df, _ = s.get_records_and_feedback()
    assert df.loc[0, "output"][TRUNCATED_KEY] is True
    assert df.loc[0, "output"]["original_bytes"] == 100_002


def test_every_stored_text_keeps_within_the_payload_limit(tmp_path: Path) -> None:
    """Each context was cut on its own (4.5 MB of them under a 100 kB limit), and tags,
    explanations and errors were not cut at all; a 5 MB error also filled the log line."""
    limit = 100_000

    def wordy(output: str) -> tuple[float, str]:
        return 0.5, "because " * 600_000

    def noisy(output: str) -> float:
        raise ValueError("x" * 5_000_000)

    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url, max_payload_bytes=limit) as s:
        record = s.ingest(make_record(contexts=["c" * 90_000] * 50, tags=["t" * 1000] * 1000),
                          [Feedback(wordy).on_output(), Feedback(noisy).on_output()])
        assert s.wait_for_feedback(30)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        sizes = conn.execute(sa.text(
            "SELECT length(contexts_json), length(tags_json) FROM scrutiny_records")).one()
        messages = dict(conn.execute(sa.text(
            "SELECT feedback_name, coalesce(explanation, error) FROM scrutiny_feedback_results"
        )).all())
    engine.dispose()
    assert max(sizes) <= limit
    assert all(len(text.encode()) <= limit for text in messages.values())
    assert all(TRUNCATED_KEY in text for text in messages.values())
    with Session(url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert back.contexts  # still a list to read, marked as cut


WEIRD_NAMES = [
    "émoji 🎉 naïve",
    "name'); DROP TABLE scrutiny_records;--",
    'quote " and % and _ and \\',
    "n" * 500,
]


@pytest.mark.parametrize("name", WEIRD_NAMES, ids=["unicode", "sql", "quotes", "long"])
def test_unusual_feedback_names_round_trip_exactly(tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url) as s:
        fb = Feedback(lambda output: 0.5, name=name).on_output()
        s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)
    with Session(url) as reader:
        df, cols = reader.get_records_and_feedback()
    assert cols == [name]
    assert df.loc[0, name] == 0.5
    assert df.loc[0, f"{name} status"] == "done"


def test_unicode_and_nul_bytes_in_content_round_trip(tmp_path: Path) -> None:
    text = "naïve café — 日本語 🚀 \x00 end"
    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url) as s:
        record = s.ingest(make_record(input=text, output=text), [])
    with Session(url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert back.input == text
    assert back.output == text


def test_nul_bytes_in_names_explanations_and_errors_survive_every_write_path(
        tmp_path: Path) -> None:
    """SQLite's JSON extraction (the one-statement batch a small write takes) cuts text at
    a NUL: names, explanations and errors came back cut, and an app name with a NUL lost
    every record after the first (its app id no longer matched)."""
    url = f"sqlite:///{tmp_path}/s.sqlite"
    explain = Feedback(lambda output: (0.5, "why\x00after"), name="ex\x00plain").on_output()

    def boom(output: str) -> float:
        raise ValueError("bad\x00after")

    fail = Feedback(boom, name="fa\x00il").on_output()
    with Session(url) as s:
        records = []
        for i in range(4):  # the first write of a session takes the general path
            record = s.ingest(make_record(app_name="my\x00app", input=f"q{i}"),
                              [explain, fail])
            record.wait_for_feedback_results(timeout=10)
            records.append(record)
    with Session(url) as reader:
        df, cols = reader.get_records_and_feedback()
        assert len(df) == 4
        assert cols == ["ex\x00plain", "fa\x00il"]
        for record in records:
            back = reader.get_record(record.record_id)
            assert back is not None
            assert back.app_name == "my\x00app"
            by_name = {r.feedback_name: r for r in back.feedback_results.values()}
            assert by_name["ex\x00plain"].explanation == "why\x00after"
            assert by_name["fa\x00il"].error == "ValueError: bad\x00after"


def test_timestamps_are_utc_aware(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/s.sqlite") as s:
        fb = Feedback(lambda output: 1.0, name="x").on_output()
        result = s.ingest(make_record(), [fb]).wait_for_feedback_results(timeout=10)[fb]
        df, _ = s.get_records_and_feedback()
        record = s.get_record(df.loc[0, "record_id"])
    assert str(df["start_time"].dt.tz) == "UTC"
    assert result.created_at.tzinfo is not None
    assert result.ended_at is not None
    assert record is not None
    stored = next(iter(record.feedback_results.values()))
    assert stored.ended_at is not None
    assert stored.ended_at.utcoffset() == dt.timedelta(0)


def test_a_naive_pandas_timestamp_is_local_time_like_a_naive_datetime(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A naive pandas Timestamp (a time column read from a CSV) was taken as UTC, while
    the same naive datetime was taken as local time: 4 hours apart in New York."""
    import pandas as pd

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        stamp = pd.Timestamp("2026-06-01 12:00:00")
        given = {"start_time": stamp, "end_time": stamp + pd.Timedelta(seconds=2)}
        from_pandas = Record(app_name="a", app_version="v1", input="q", output="a", **given)
        plain = Record(app_name="a", app_version="v1", input="q", output="a",
                       **{k: v.to_pydatetime() for k, v in given.items()})
    finally:
        monkeypatch.undo()
        time.tzset()
    assert from_pandas.start_time == plain.start_time == dt.datetime(
        2026, 6, 1, 16, tzinfo=dt.timezone.utc).timestamp()
    assert from_pandas.end_time == plain.end_time == plain.start_time + 2


def test_a_database_file_deleted_under_the_session_refuses_writes_saying_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted (or replaced) while the session ran, the SQLite file went on taking writes
    through the open connections: every result was reported stored and wait_for_feedback
    said True, and all of it was gone with the deleted file, without a word."""
    path = tmp_path / "gone.sqlite"
    one = Feedback(lambda output: 1.0, name="one").on_output()
    session = Session(f"sqlite:///{path}")
    session.ingest(make_record(), [one])
    assert session.wait_for_feedback(10)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.ERROR, logger="scrutiny"):
        records = [session.ingest(make_record(input=f"q{i}"), [one]) for i in range(30)]
        assert not session.wait_for_feedback(10)
    told = [r.wait_for_feedback_results(timeout=10)[one] for r in records]
    session.close()
    assert {r.status for r in told} == {FeedbackStatus.FAILED}
    assert session.stats()["failed_writes"] >= 30  # (each record, and its results)
    assert f"the database file {path} was deleted or replaced" in caplog.text
    assert len(caplog.records) < 10  # (said once, not once per write)


def test_table_prefix_keeps_tables_apart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite"
    with Session(url, table_prefix="team_a_") as a, Session(url, table_prefix="team_b_") as b:
        a.ingest(make_record(), [])
        assert len(a.get_records_and_feedback()[0]) == 1
        assert len(b.get_records_and_feedback()[0]) == 0


def test_a_table_prefix_that_sqlite_cannot_take_unquoted_is_refused(tmp_path: Path) -> None:
    """'1x_' opened (the migrations quote names) and then most writes failed: SQLite
    reads 1x_records as a bad number in the hand-written batch statements."""
    from scrutiny import ConfigurationError

    for bad in ("1x_", "", "é_", "a-b_"):
        with pytest.raises(ConfigurationError, match="must start with a letter or '_'"):
            Session(f"sqlite:///{tmp_path}/p.sqlite", table_prefix=bad)
    with Session(f"sqlite:///{tmp_path}/p.sqlite", table_prefix="_x1_") as s:
        fb = Feedback(lambda output: 1.0, name="f").on_output()
        for _ in range(3):
            s.ingest(make_record(), [fb])
        assert s.wait_for_feedback(10)
        assert s.stats()["failed_writes"] == 0


def _write_many(url: str, n: int) -> None:
    with Session(url) as s:
        fb = Feedback(_score, name="proc").on_output()
        for _ in range(n):
            s.ingest(make_record(), [fb])
        assert s.wait_for_feedback(60)


def _score(output: str) -> float:
    return 1.0


def test_two_processes_and_a_reader_share_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite"
    Session(url).close()  # create the schema once
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(url, 50)) for _ in range(2)]
    for p in procs:
        p.start()
    with Session(url) as reader:
        while any(p.is_alive() for p in procs):
            reader.get_records_and_feedback()  # reading while they write: no lock errors
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        df, _ = reader.get_records_and_feedback()
    assert len(df) == 100
    assert (df["proc status"] == "done").all()


def test_oversized_contexts_stay_a_list_with_each_one_marked(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/s.sqlite", max_payload_bytes=1024) as s:
        record = s.ingest(make_record(contexts=["x" * 3000, "short"]), [])
        back = s.get_record(record.record_id)
    assert back is not None
    assert isinstance(back.contexts, list)
    assert back.contexts[0].startswith("x" * 800)
    assert back.contexts[0].endswith(f"[{TRUNCATED_KEY}: 3000 bytes in all]")
    assert len(back.contexts[0]) <= 1024  # the marker counts in the limit
    assert back.contexts[1] == "short"


def test_contexts_of_any_kind_keep_within_the_payload_limit(tmp_path: Path) -> None:
    """Contexts given as dicts (a text and its source) were estimated at 64 bytes each:
    ten of 480 kB were stored whole, 4.8 MB through a 1 MB limit."""
    docs = [{"text": f"{i}" * 480_000, "source": f"doc-{i}.md"} for i in range(10)]
    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url, max_payload_bytes=1_000_000) as s:
        record = s.ingest(make_record(contexts=[{"text": "small", "source": "a.md"}, *docs]),
                          [])
        assert s.flush(10)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT contexts_json FROM scrutiny_records")).scalar()
    engine.dispose()
    assert len(stored.encode()) <= 1_000_000
    with Session(url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert back.contexts[:3] == [{"text": "small", "source": "a.md"}, docs[0], docs[1]]
    assert back.contexts[3][TRUNCATED_KEY] is True  # (the one that did not fit: marked)
    assert back.contexts[3]["preview"].startswith('{"text":"2222')
    assert back.contexts[4:] == [f"[{TRUNCATED_KEY}: 7 more context(s) not stored]"]


def test_a_lone_surrogate_or_a_field_pydantic_cannot_dump_keeps_the_rest_of_a_value(
        tmp_path: Path) -> None:
    """One lone surrogate in a 100 kB answer, or a numpy field in a pydantic model, made
    the whole value a description cut to 2,000 characters: the text, or the model's other
    fields, were lost, and feedbacks of another process judged the description."""

    class Answer(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        text: str
        embedding: np.ndarray

    text = "a" * 50_000 + "\udc80" + "b" * 50_000
    output = {"answer": text, "model": Answer(text="Paris", embedding=np.zeros(3)),
              "bad\udc80key": 1}
    url = f"sqlite:///{tmp_path}/s.sqlite"
    with Session(url) as s:
        record = s.ingest(make_record(output=output), [])
        assert s.flush(10)
    with Session(url) as reader:
        back = reader.get_record(record.record_id)
    assert back is not None
    assert back.output == {"answer": "a" * 50_000 + "\\udc80" + "b" * 50_000,
                           "model": {"text": "Paris", "embedding": [0.0, 0.0, 0.0]},
                           "bad\\udc80key": 1}
    assert _serialize.truncate_text("\udc80" * 10, 20).endswith("60 bytes in all]")


def _insert_op(record: Record, feedback: Feedback) -> tuple[object, str]:
    from scrutiny.core import _rows
    from scrutiny.core.storage import InsertRecord

    pending = _rows.FeedbackResult(record_id=record.record_id, feedback_name=feedback.name,
                                   status=FeedbackStatus.PENDING,
                                   result_id=f"r-{record.record_id}",
                                   feedback_id=feedback.feedback_id)
    op = InsertRecord(app=_rows.app_row(record),
                      record=_rows.record_row(record, max_bytes=1_000_000),
                      definitions=[_rows.definition_row(feedback)],
                      results=[_rows.result_row(record, pending)])
    return op, pending.result_id or ""


def _traced_store(path: Path) -> tuple[Any, list[str]]:
    """A SQLStore on `path` and the list every SQL statement it runs is appended to."""
    from sqlalchemy import event

    from scrutiny.core.storage import SQLStore

    store = SQLStore(f"sqlite:///{path}")
    traced: list[str] = []
    event.listen(store.engine, "connect",
                 lambda dbapi, _rec: dbapi.set_trace_callback(traced.append))
    store.engine.dispose()
    return store, traced


def test_a_sqlite_batch_is_one_statement_and_updates_apply_in_order(tmp_path: Path) -> None:
    """Records, results and updates of a batch go in one statement (no BEGIN/COMMIT round
    trips); a batch that updates one result twice still applies the updates in order."""
    from scrutiny.core.storage import UpdateResult

    store, traced = _traced_store(tmp_path / "one.sqlite")
    fb = Feedback(lambda output: 1.0, name="f").on_output()
    first, first_id = _insert_op(make_record(), fb)
    store.write([first])  # a new app and definition: the general path
    store.write([_insert_op(make_record(), fb)[0]])  # the first one-statement batch
    traced.clear()
    ops_ids = [_insert_op(make_record(input=f"q{i}"), fb) for i in range(5)]
    done = {"status": "done", "score": 0.5, "ended_at": dt.datetime.now(dt.timezone.utc)}
    store.write([op for op, _ in ops_ids] + [UpdateResult(first_id, done)])
    statements = {s for s in traced if not s.startswith("--")}  # not trigger sub-steps
    assert len(statements) == 1, statements  # no BEGIN, no COMMIT, one statement
    assert statements.pop().startswith("INSERT INTO temp.scrutiny_write_batch")

    running = {"status": "running"}
    store.write([UpdateResult(ops_ids[0][1], running, from_statuses=("pending",)),
                 UpdateResult(ops_ids[0][1], done)])
    _, results = store.records_and_results()
    by_id = {r["result_id"]: r for r in results}
    assert by_id[first_id]["status"] == "done"
    assert by_id[first_id]["score"] == 0.5
    assert by_id[ops_ids[0][1]]["status"] == "done"  # running, then done: in order
    assert {by_id[i]["status"] for _, i in ops_ids[1:]} == {"pending"}
    assert len(results) == 7
    store.engine.dispose()


def test_a_big_sqlite_batch_is_one_statement_while_writes_wait_for_the_gil(
        tmp_path: Path) -> None:
    """Bulk batches bind rows in multi-row statements (SQLite parses JSON more slowly) —
    unless recent writes spent their time waiting rather than working (a busy app holds the
    GIL, and each statement's round trips wait for it): then one statement."""
    store, traced = _traced_store(tmp_path / "big.sqlite")
    fb = Feedback(lambda output: 1.0, name="f").on_output()
    store.write([_insert_op(make_record(), fb)[0]])  # a new app and definition

    def batch_statements(n: int) -> set[str]:
        traced.clear()
        store.write([_insert_op(make_record(input=f"q{i}"), fb)[0] for i in range(n)])
        return {s.split(" (")[0] for s in traced  # (not trigger steps, nor its DDL)
                if not s.startswith(("--", "CREATE TEMP"))}

    store._contended_until = 0.0  # (the write above may have waited on a loaded machine)
    assert not store._contended
    quiet = batch_statements(20)  # 40 rows
    assert "BEGIN IMMEDIATE" in quiet
    assert len(quiet) > 2

    # a write that took 50 ms of wall time and no CPU time: it waited
    store._note_contention(time.perf_counter() - 0.05, time.thread_time())
    assert store._contended
    busy = batch_statements(20)
    assert busy == {"INSERT INTO temp.scrutiny_write_batch"}
    store._contended_until = 0.0
    assert "BEGIN IMMEDIATE" in batch_statements(20)
    _, results = store.records_and_results()
    assert len(results) == 61
    store.engine.dispose()


def test_a_read_only_database_error_says_whether_the_file_or_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'attempt to write a readonly database' blamed the file when SQLite could not create
    its -wal/-shm files in a read-only folder. (As root every file is writable, so the
    folder's access check is stood in for.)"""
    from scrutiny.core.storage import SQLStore

    store = SQLStore(f"sqlite:///{tmp_path}/ro.sqlite")
    refused = Exception("attempt to write a readonly database")
    try:
        assert "the file" in store._readonly_hint(refused)
        monkeypatch.setattr("os.access", lambda path, mode: False)
        hint = store._readonly_hint(refused)
        assert f"the folder {str(tmp_path)!r} is not writable" in hint
        assert "'-wal' and '-shm'" in hint
        assert store._readonly_hint(Exception("disk I/O error")) == ""
        # (a folder mounted read-only: SQLite cannot even open the file, and said so bare)
        unopened = store._readonly_hint(Exception("unable to open database file"))
        assert f"the folder {str(tmp_path)!r} is not writable" in unopened
        read_only = f"sqlite:///file:{tmp_path}/ro.sqlite?mode=ro&immutable=1&uri=true"
        assert f"to read it only, open {read_only!r}" in unopened
    finally:
        store.close()
    with Session(read_only) as reader:  # (what the hint says works)
        assert reader.get_records_and_feedback()[0].empty


def test_sqlite_uri_filenames_open_and_bad_url_parameters_are_named(tmp_path: Path) -> None:
    """'sqlite:///file:...?uri=true' was refused with the folder of a path that does not
    exist ('/cwd/file:/tmp/...'); '?timeout=abc' raised a bare ValueError."""
    from scrutiny import ConfigurationError

    url = f"sqlite:///file:{tmp_path}/uri.sqlite?mode=rwc&uri=true"
    with Session(url) as s:
        s.ingest(make_record(), [])
    with Session(url) as s:
        assert len(s.get_records_and_feedback()[0]) == 1
    with pytest.raises(ConfigurationError, match=r"\?timeout=abc is not valid.*seconds"):
        Session(f"sqlite:///{tmp_path}/t.sqlite?timeout=abc")


# ---------------------------------------------------------------------- app ids (0004)
@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table_prefix): a fresh SQLite file, or fresh tables on the PostgreSQL server
    (``SCRUTINY_TEST_POSTGRES_URL``)."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ids.sqlite", prefix
    return postgres_url(), prefix


# (name, version) -> the id the old "name:version" rule stored it under
OLD_IDS = {
    ("plain", "v1"): "plain:v1",
    ("team", "qa"): "team:qa",
    ("team:qa", "v1"): "team:qa:v1",
    ("team", "qa:v1"): "team:qa:v1",  # collided: its records sat under the other's row
    ("a\\b", "v"): "a\\b:v",
    ("a\\\\b", "v"): "a\\\\b:v",  # its old id is the new id of ("a\\b", "v")
    ("gone:x", "v"): "gone:x:v",  # an apps row without records
}


def test_migration_0004_splits_apps_whose_old_ids_collided(
        backend: tuple[str, str]) -> None:
    """A database at 0003 holding apps whose names or versions hold ":" or "\\": 0004
    gives every app, record and result the id `app_id_for` gives now (an app that had lost
    its apps row to a collision gets one), leaves other ids alone, and reruns harmlessly."""
    from scrutiny.core._records import app_id_for
    from scrutiny.core.storage import HEAD_REVISION, build_tables, current_revision, upgrade

    url, prefix = backend
    t = build_tables(prefix)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    scores = {key: i / 10 for i, key in enumerate(OLD_IDS)}
    with engine.begin() as conn:
        upgrade(conn, prefix, "0003")
        stored: set[str] = set()
        for (name, version), old in OLD_IDS.items():
            if old not in stored:  # (one row per old id: the first app to use it)
                stored.add(old)
                conn.execute(t.apps.insert().values(
                    app_id=old, app_name=name, app_version=version, metadata_json=None,
                    created_at=now))
            if name.startswith("gone"):
                continue
            record_id = f"rec-{len(stored)}-{name}-{version}"
            conn.execute(t.records.insert().values(
                record_id=record_id, app_id=old, app_name=name, app_version=version,
                status="ok", start_time=now, end_time=now, latency_s=1.0, created_at=now))
            conn.execute(t.results.insert().values(
                result_id=f"res-{record_id}", record_id=record_id, app_id=old,
                feedback_id="fb", feedback_name="quality", status="done",
                score=scores[(name, version)], attempts=1, created_at=now, updated_at=now))

    def state() -> tuple[dict[str, tuple[str, str]], set[tuple[str, str, str]],
                         set[tuple[str, str]]]:
        with engine.connect() as conn:
            apps = {r.app_id: (r.app_name, r.app_version)
                    for r in conn.execute(sa.select(t.apps))}
            records = {(r.app_id, r.app_name, r.app_version)
                       for r in conn.execute(sa.select(t.records))}
            results = {(res, rec) for res, rec in conn.execute(
                sa.select(t.results.c.app_id.label("result_app"),
                          t.records.c.app_id.label("record_app"))
                .join(t.records, t.records.c.record_id == t.results.c.record_id))}
        return apps, records, results

    with Session(url, table_prefix=prefix) as s:
        assert s.store.found_revision == "0003"  # type: ignore[attr-defined]
        board = s.get_leaderboard()
        expected = sorted(k for k in OLD_IDS if not k[0].startswith("gone"))
        assert sorted(board.index) == expected
        assert board["records"].tolist() == [1] * len(expected)
        for key in expected:
            assert board.loc[key, "quality"] == pytest.approx(scores[key]), key
        frame, _ = s.get_records_and_feedback(["team:qa"])
        assert list(zip(frame["app_name"], frame["app_version"], strict=True)) == [
            ("team", "qa")]
    apps, records, results = state()
    assert apps == {app_id_for(*key): key for key in OLD_IDS}
    assert records == {(app_id_for(*key), *key) for key in expected}
    assert {new for new, _ in results} == {app_id for app_id, _, _ in records}
    assert all(result == record for result, record in results)
    assert len(results) == len(expected)
    assert apps["plain:v1"] == ("plain", "v1")
    assert apps["team:qa"] == ("team", "qa")
    assert apps["team\\:qa:v1"] == ("team:qa", "v1")
    assert apps["team:qa\\:v1"] == ("team", "qa:v1")
    assert apps["a\\\\b:v"] == ("a\\b", "v")
    with engine.connect() as conn:
        assert current_revision(conn, prefix) == HEAD_REVISION

    # run again (as if stamped back to 0003): nothing changes
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {prefix}alembic_version SET version_num = '0003'"))
    with Session(url, table_prefix=prefix) as again:
        assert again.store.found_revision == "0003"  # type: ignore[attr-defined]
    assert state() == (apps, records, results)
    engine.dispose()


# ---------------------------------------------------------------------- definitions
def toxicity(output: str) -> float:
    return 0.1 if output == "calm" else 0.9


def test_a_changed_direction_or_option_reaches_the_database_in_the_same_process(
        tmp_path: Path) -> None:
    """A definition is written once per feedback id. The id covered the name, the code and
    the wiring only: v2's higher_is_better=False stayed in the process that recorded it,
    while a new Session (the dashboard, the CLI) ranked toxicity with higher_is_better=True.
    The direction is now part of the definition (its own id and row); an option such as
    the timeout is not, and a changed one is written again under the same id (workers
    rebuilt it without its timeout)."""
    url = f"sqlite:///{tmp_path}/direction.sqlite"
    v2 = Feedback(toxicity, name="toxicity", higher_is_better=False, timeout=5)
    with Session(url) as writer:
        for version, output, fb in (
                ("v1", "calm", Feedback(toxicity, name="toxicity")),
                ("v2", "rude", v2)):
            writer.ingest(Record(app_name="qa", app_version=version, input="q",
                                 output=output, start_time=1.0, end_time=2.0),
                          [fb.on_output()])
            assert writer.wait_for_feedback(20)
        assert list(writer.get_leaderboard().index) == [("qa", "v1"), ("qa", "v2")]
    with Session(url) as reader:
        by_id = {d["feedback_id"]: d for d in reader.store.definitions()}
        assert len(by_id) == 2  # (v1's definition, and v2's other direction)
        definition = by_id[v2.on_output().feedback_id]
        assert definition["higher_is_better"] is False
        spec = _serialize.loads(definition["spec_json"])
        assert (spec["higher_is_better"], spec["timeout"]) == (False, 5)
        board = reader.get_leaderboard()
        assert board.attrs["higher_is_better"] == {"toxicity": False}
        assert list(board.index) == [("qa", "v1"), ("qa", "v2")]  # less toxic first


def test_two_apps_ranked_by_one_function_each_in_its_own_direction(tmp_path: Path) -> None:
    """One `length` function, lower is better for a summariser and higher for an essay
    writer: both apps were ranked by the direction written last."""
    url = f"sqlite:///{tmp_path}/two_apps.sqlite"

    def length(output: str) -> float:
        return float(len(output))

    with Session(url) as writer:
        for app, higher in (("summariser", False), ("essay", True)):
            fb = Feedback(length, higher_is_better=higher).on_output()
            for version, output in (("v1", "x" * 10), ("v2", "x" * 100)):
                writer.ingest(Record(app_name=app, app_version=version, input="q",
                                     output=output, start_time=1.0, end_time=2.0), [fb])
        assert writer.wait_for_feedback(20)
    with Session(url) as reader:
        for app, best_first in (("summariser", ["v1", "v2"]), ("essay", ["v2", "v1"])):
            board = reader.get_leaderboard(app_ids=[app])
            assert [version for _, version in board.index] == best_first, app


def test_what_a_feedback_scores_and_how_it_ranks_are_its_definition() -> None:
    """Two feedbacks of one name and function that score or rank differently had one id:
    workers and retry_failed evaluated one app's results with another app's definition
    (a min aggregate scored with max; a partial for "Paris" with the one for "Dublin"),
    and the leaderboard ranked both apps by one direction. A renamed feedback kept the
    id of its old name."""
    import functools

    def contains(output: str, word: str) -> float:
        return float(word in output)

    def make(threshold: float) -> Any:
        return lambda output: float(len(output) > threshold)

    def same(a: Feedback, b: Feedback) -> bool:
        return a.on_output().feedback_id == b.on_output().feedback_id

    assert same(Feedback(toxicity), Feedback(toxicity, timeout=5, retries=2))
    assert not same(Feedback(toxicity), Feedback(toxicity, higher_is_better=False))
    assert not same(Feedback(toxicity, aggregate=min), Feedback(toxicity, aggregate=max))
    paris, dublin = (functools.partial(contains, word=w) for w in ("Paris", "Dublin"))
    assert not same(Feedback(paris, name="city"), Feedback(dublin, name="city"))
    assert same(Feedback(paris, name="city"),
                Feedback(functools.partial(contains, word="Paris"), name="city"))
    assert not same(Feedback(make(10), name="long"), Feedback(make(20), name="long"))
    assert same(Feedback(make(10), name="long"), Feedback(make(10), name="long"))
    renamed = Feedback(toxicity).on_output()
    before = renamed.feedback_id
    renamed.name = "toxicity_v2"
    assert renamed.feedback_id != before
    assert renamed.feedback_id == Feedback(toxicity, name="toxicity_v2").on_output().feedback_id


def test_a_definition_is_written_again_only_when_it_changed(tmp_path: Path) -> None:
    """The writer's batches carry every record's definitions: a known, unchanged one is not
    written again (the batch stays one statement); a changed one is, the latest of a batch
    winning."""
    store, traced = _traced_store(tmp_path / "defs.sqlite")
    first = Feedback(toxicity, name="toxicity").on_output()
    changed = Feedback(toxicity, name="toxicity", timeout=5).on_output()
    assert first.feedback_id == changed.feedback_id
    store.write([_insert_op(make_record(), first)[0]])
    store.write([_insert_op(make_record(), first)[0]])
    traced.clear()
    store.write([_insert_op(make_record(), first)[0]])  # unchanged: one statement
    statements = {s for s in traced if not s.startswith("--")}  # not trigger sub-steps
    assert len(statements) == 1, statements
    assert statements.pop().startswith("INSERT INTO temp.scrutiny_write_batch")

    traced.clear()
    store.write([_insert_op(make_record(), first)[0], _insert_op(make_record(), changed)[0]])
    assert any(s.startswith("UPDATE scrutiny_feedback_definitions") for s in traced)
    [row] = store.definitions()
    assert _serialize.loads(row["spec_json"])["timeout"] == 5

    traced.clear()
    store.write([_insert_op(make_record(), changed)[0]])  # known again: one statement
    assert not any("feedback_definitions" in s for s in traced)
    store.write([_insert_op(make_record(), first)[0]])  # and back
    [row] = store.definitions()
    assert _serialize.loads(row["spec_json"])["timeout"] is None
    store.engine.dispose()


def test_the_stores_list_of_open_connections_forgets_closed_ones(tmp_path: Path) -> None:
    """The store keeps its open connections for its finalizer; one a failed connect event
    closed (no close event) must not stay listed for the life of the app."""
    import sqlite3

    from scrutiny.core.storage import SQLStore

    store = SQLStore(f"sqlite:///{tmp_path}/c.sqlite")
    try:
        for _ in range(70):
            stranded = sqlite3.connect(":memory:")
            stranded.close()
            store._connections.add(stranded)
        store.engine.dispose()  # the next connect makes a new connection
        with store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert 1 <= len(store._connections) <= 2
    finally:
        store.close()


@pytest.mark.parametrize("store_kind", ["sqlite-general", "sqlite-one statement",
                                        "postgresql", "memory"])
def test_a_result_name_or_record_id_repeated_within_one_batch_is_refused(
        store_kind: str, tmp_path: Path) -> None:
    """A store compared the results it was given with those it held: a record given twice
    in one batch (a line repeated in a log, ingested in one loop) stored both of its
    results of one name, counted twice by every aggregate; two records of one id in one
    batch stored the second one's results under the first, another app's."""
    from scrutiny.core.storage import MemoryStore, SQLStore
    from scrutiny.core.storage._base import RecordIdTaken, ResultNameTaken

    def open_store() -> Any:
        if store_kind == "memory":
            return MemoryStore()
        if store_kind == "postgresql":
            return SQLStore(postgres_url(), table_prefix=f"t{uuid.uuid4().hex[:10]}_")
        store = SQLStore(f"sqlite:///{tmp_path}/{uuid.uuid4().hex}.sqlite")
        store._one_statement = store_kind.endswith("one statement")
        return store

    fb = Feedback(lambda output: 1.0, name="len").on_output()
    line = make_record(record_id="req-7")
    again, _ = _insert_op(dataclasses.replace(line), fb)
    again.results[0]["result_id"] = "r-again"  # (its own pending result: another ingest)
    other_app, _ = _insert_op(make_record(app_name="other", record_id="req-7"), fb)
    other_app.results[0]["result_id"] = "r-other"
    for repeat, refusal in ((again, ResultNameTaken), (other_app, RecordIdTaken)):
        store = open_store()
        try:
            first, first_id = _insert_op(line, fb)
            store.write([_insert_op(make_record(record_id="warm"), fb)[0]])
            with pytest.raises(refusal):
                store.write([first, repeat])
            store.write([first])  # (the writer then stores the items one by one)
            with pytest.raises(refusal):
                store.write([repeat])
            _, results = store.records_and_results()
            assert sorted(r["result_id"] for r in results if r["record_id"] == "req-7") \
                == [first_id]
        finally:
            if store_kind != "memory":
                store.engine.dispose()


@pytest.mark.parametrize("path", ["one statement", "general"])
def test_a_record_id_another_record_has_is_refused_not_merged(
        backend: tuple[str, str], path: str, caplog: pytest.LogCaptureFixture) -> None:
    """Two processes gave one id to two records: the second was skipped at insert and its
    results stored under the first (another app's), reported done; that app had no
    record at all. The same record given again, with another feedback, is still kept."""
    url, prefix = backend
    first = make_record(app_name="app_a", record_id="req-1", output="A" * 10)

    def in_a_process_of_its_own(record: Record, name: str, score: float) -> Any:
        with Session(url, table_prefix=prefix) as s:
            if path == "general":
                s.store._one_statement = False  # type: ignore[attr-defined]
            s.ingest(record, [Feedback(lambda output: score, name=name).on_output()])
            [told] = record.wait_for_feedback_results(timeout=10).values()
            return told, s.stats()["failed_writes"]

    assert in_a_process_of_its_own(first, "len_a", 0.1)[0].status is FeedbackStatus.DONE
    for refused in (make_record(app_name="app_b", record_id="req-1"),
                    make_record(app_name="app_a", record_id="req-1",
                                start_time=first.start_time + 5)):  # (another call)
        told, failed_writes = in_a_process_of_its_own(refused, "len_b", 1.0)
        assert (told.status, failed_writes) == (FeedbackStatus.FAILED, 1)
    same_call_again = dataclasses.replace(first)  # (another process's copy)
    told, _ = in_a_process_of_its_own(same_call_again, "more", 0.5)
    assert (told.status, told.result) == (FeedbackStatus.DONE, 0.5)
    # ... but not with a feedback it has a result of: a script scoring a dataset run
    # again stored a second "len_a" beside the first (the table showed one, the
    # leaderboard averaged both)
    rescored = dataclasses.replace(first)
    told, failed_writes = in_a_process_of_its_own(rescored, "len_a", 0.9)
    assert (told.status, failed_writes) == (FeedbackStatus.FAILED, 1)
    with Session(url, table_prefix=prefix) as reader:
        df, cols = reader.get_records_and_feedback()
        stored = reader.get_record("req-1")
        board = reader.get_leaderboard()
    assert stored is not None
    assert sorted(r.feedback_name for r in stored.feedback_results.values()) == [
        "len_a", "more"]
    assert board.loc[("app_a", "v1"), "len_a"] == 0.1
    assert "record 'req-1' has a result of 'len_a' already" in caplog.text
    assert "record id taken by another record: 'req-1'" in caplog.text
    assert list(df["app_name"]) == ["app_a"]
    assert sorted(cols) == ["len_a", "more"]
    assert (df.loc[0, "len_a"], df.loc[0, "more"]) == (0.1, 0.5)


def test_an_app_label_too_long_for_every_database_is_refused_when_given(
        backend: tuple[str, str]) -> None:
    """A version of some kilobytes (a prompt template) lost every record of its app on
    PostgreSQL (an index row holds at most 2,704 bytes), while SQLite kept them. The
    longest label allowed is stored on both, even made of the characters the app id
    escapes (doubled in it)."""
    from scrutiny import ConfigurationError
    from scrutiny.core._records import MAX_APP_LABEL_BYTES

    with pytest.raises(ConfigurationError, match=r"4093 bytes.*at most 800.*Keep the "
                                                   r"version a short label.*metadata="):
        make_record(app_version="template: " + "x" * 4000 + "é" * 40)
    with pytest.raises(ConfigurationError, match=r"app_name: 900\).*Keep the name a short"):
        make_record(app_name="n" * 900)  # (the name is the long one: not "the version")
    url, prefix = backend
    name = ":\\" * 50
    version = "é:" * ((MAX_APP_LABEL_BYTES - len(name)) // 3)
    assert len((name + version).encode()) <= MAX_APP_LABEL_BYTES
    with Session(url, table_prefix=prefix) as s:
        record = s.ingest(make_record(app_name=name, app_version=version),
                          [Feedback(lambda output: 1.0, name="one").on_output()])
        assert record.wait_for_feedback_results(timeout=10)
        assert s.stats()["failed_writes"] == 0
        board = s.get_leaderboard()
        df, _ = s.get_records_and_feedback()
    assert (df.loc[0, "app_name"], df.loc[0, "app_version"], df.loc[0, "one"]) == (
        name, version, 1.0)
    assert list(board.index) == [(name, version)]


def test_a_mean_of_scores_near_the_float_limit_is_not_lost(backend: tuple[str, str]) -> None:
    """1e308 and 1.5e308 averaged past the float limit: SQLite's leaderboard said inf (the
    dashboard "—"), and PostgreSQL refused the whole summary ("value out of range")."""
    url, prefix = backend
    scores = iter([1e308, 1.5e308, 0.25, 0.75])
    big = Feedback(lambda output: next(scores), name="big").on_output()
    with Session(url, table_prefix=prefix) as s:
        for i, app in enumerate(["huge", "huge", "small", "small"]):
            record = s.ingest(make_record(app_name=app, input=f"q{i}"), [big])
            assert record.wait_for_feedback_results(timeout=10)[big].status is \
                FeedbackStatus.DONE
        board = s.get_leaderboard()
    assert board.loc[("huge", "v1"), "big"] == pytest.approx(1.25e308)
    assert board.loc[("small", "v1"), "big"] == pytest.approx(0.5)


def chat_length(output: str) -> float:
    return min(len(output) / 100, 1.0)


def sms_length(output: str) -> float:
    return min(len(output) / 160, 1.0)


def test_each_apps_feedback_ranks_by_its_own_direction(backend: tuple[str, str]) -> None:
    """Two apps of one database each had a "length": chat wants long answers, sms short
    ones. The direction was looked up by name, the definition written last deciding for
    both: once sms stored its own, chat's leaderboard ranked its versions upside down,
    in this process and in every other reader."""
    url, prefix = backend
    longer = Feedback(chat_length, name="length").on_output()
    shorter = Feedback(sms_length, name="length", higher_is_better=False).on_output()
    with Session(url, table_prefix=prefix) as s:
        for app, version, output, fb in [("chat", "v1", "x" * 90, longer),
                                         ("chat", "v2", "x" * 10, longer),
                                         ("sms", "v1", "x" * 50, shorter),
                                         ("sms", "v2", "x" * 150, shorter)]:
            record = s.ingest(make_record(app_name=app, app_version=version, output=output),
                              [fb])
            assert record.wait_for_feedback_results(timeout=10)[fb].status is \
                FeedbackStatus.DONE
        here = s.get_leaderboard(app_ids=["chat"])
    with Session(url, table_prefix=prefix) as other:  # (the CLI, the dashboard)
        boards = [here, other.get_leaderboard(app_ids=["chat"])]
        summary = {(e["app_name"], e["app_version"]): e["higher_is_better"]
                   for e in other.get_feedback_summary()}
        both = other.get_leaderboard()
    for board in boards:
        assert list(board.index) == [("chat", "v1"), ("chat", "v2")]
        assert board.attrs["higher_is_better"] == {"length": True}
    assert summary == {("chat", "v1"): True, ("chat", "v2"): True,
                       ("sms", "v1"): False, ("sms", "v2"): False}
    # one table of both: each version ranked by its own app's direction
    order = list(both.index)
    assert order.index(("chat", "v1")) < order.index(("chat", "v2"))
    assert order.index(("sms", "v1")) < order.index(("sms", "v2"))


def test_tied_versions_and_app_figures_read_the_same_on_every_backend(
        backend: tuple[str, str]) -> None:
    """Versions with equal scores came in the database's grouping order (PostgreSQL: hash
    order, v20 before v14 before v19), and get_apps() gave PostgreSQL's mean tokens as a
    Decimal, which json.dumps refused."""
    url, prefix = backend
    one = Feedback(lambda output: 1.0, name="one").on_output()
    versions = [f"v{i:02d}" for i in range(12)]
    with Session(url, table_prefix=prefix) as s:
        for i, version in enumerate(reversed(versions)):
            record = make_record(app_version=version, input=f"q{i}")
            record.usage = TokenUsage(prompt_tokens=5, completion_tokens=10, total_tokens=15)
            assert s.ingest(record, [one]).wait_for_feedback_results(timeout=10)
        board = s.get_leaderboard()
        apps = s.get_apps()
    assert [version for _, version in board.index] == versions
    assert {type(a["total_tokens"]) for a in apps} == {float}
    assert {type(a["latency"]) for a in apps} == {float}
    json.dumps(apps)
