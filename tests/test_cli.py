"""The `scrutiny` command on a real SQLite file: reading records and the leaderboard
(table, JSON, CSV), wrong input, and starting a worker."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from scrutiny import Feedback, Record, Session
from scrutiny.cli import TABLE_LIMIT, main
from tests.support.worker_process import run_worker_until

REPO = Path(__file__).resolve().parents[1]
AWKWARD = 'héllo 🌍 "quoted", comma\nsecond line\ttab\rcarriage \x1b[31mred\x1b[0m'
LONG = "x" * 200_000


def score(output: str) -> float:
    return 1 / 3


SCORE = Feedback(score).on_output()


def _record(i: int, *, app: str = "qa", version: str = "v1", text: str | None = None,
            **fields: object) -> Record:
    return Record(app_name=app, app_version=version, input=text or f"question {i}",
                  output=f"answer {i}", start_time=1_700_000_000.123456 + i,
                  end_time=1_700_000_000.5 + i, **fields)  # type: ignore[arg-type]


def _store(url: str, records: list[Record]) -> None:
    with Session(url) as s:
        for record in records:
            s.ingest(record, [SCORE])
        assert s.wait_for_feedback(30)


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _csv_rows(text: str) -> list[dict[str, str]]:
    limit = csv.field_size_limit(1_000_000)  # (its default, 131,072, is under LONG's length)
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    finally:
        csv.field_size_limit(limit)


@pytest.fixture
def awkward(database_url: str) -> str:
    """A database whose records hold unicode, quotes, commas, newlines and a long text."""
    _store(database_url, [_record(0, text=AWKWARD), _record(1, text=LONG),
                          _record(2, app="team:qa", version="v2")])
    return database_url


# ---------------------------------------------------------------------- records
def test_json_and_csv_hold_every_record_unless_a_limit_is_asked(database_url: str) -> None:
    """The table's default of 20 records cut JSON and CSV exports short, silently."""
    _store(database_url, [_record(i) for i in range(TABLE_LIMIT + 5)])
    out = _run("records", "--database-url", database_url, "--format", "json")
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)) == TABLE_LIMIT + 5
    out = _run("records", "--database-url", database_url, "--format", "csv")
    assert len(_csv_rows(out.stdout)) == TABLE_LIMIT + 5
    out = _run("records", "--database-url", database_url, "--format", "json", "--limit", "3")
    assert len(json.loads(out.stdout)) == 3


def test_a_table_says_when_it_shows_only_part_of_the_records(database_url: str) -> None:
    _store(database_url, [_record(i) for i in range(TABLE_LIMIT + 1)])
    out = _run("records", "--database-url", database_url)
    assert out.exit_code == 0
    assert f"question {TABLE_LIMIT}" in out.stdout
    assert "question 0 " not in out.stdout
    assert f"more with --offset {TABLE_LIMIT}" in out.stderr
    out = _run("records", "--database-url", database_url, "--offset", str(TABLE_LIMIT))
    assert "question 0" in out.stdout
    assert out.stderr == ""


def test_json_keeps_every_digit_and_microsecond(awkward: str) -> None:
    """pandas' to_json rounded scores to 10 digits and times to milliseconds."""
    out = _run("records", "--database-url", awkward, "--format", "json")
    rows = {r["input"]: r for r in json.loads(out.stdout)}
    row = rows[AWKWARD]
    assert row["score"] == 1 / 3
    assert row["latency"] == pytest.approx(0.376544, abs=1e-6)
    assert row["start_time"] == "2023-11-14T22:13:20.123456+00:00"
    board = json.loads(_run("leaderboard", "--database-url", awkward, "--format",
                            "json").stdout)
    assert {(b["app_name"], b["app_version"], b["score"]) for b in board} == {
        ("qa", "v1", 1 / 3), ("team:qa", "v2", 1 / 3)}


def test_json_and_csv_read_back_unicode_newlines_and_long_texts_exactly(awkward: str) -> None:
    rows = json.loads(_run("records", "--database-url", awkward, "--format", "json").stdout)
    assert {r["input"] for r in rows} == {AWKWARD, LONG, "question 2"}
    out = _run("records", "--database-url", awkward, "--format", "csv")
    assert out.exit_code == 0
    rows = _csv_rows(out.stdout)
    assert {r["input"] for r in rows} == {AWKWARD, LONG, "question 2"}
    assert {r["app_id"] for r in rows} == {"qa:v1", "team\\:qa:v2"}
    table = _run("records", "--database-url", awkward)
    assert table.exit_code == 0
    assert "héllo 🌍" in table.stdout
    assert "\\n" in table.stdout
    assert len(table.stdout.strip().splitlines()) == 4


def test_csv_writes_lists_and_mappings_as_json(database_url: str) -> None:
    """A structured input came out as Python's repr ({'q': ...}), which nothing parses."""
    _store(database_url, [_record(0, tags=["prod", "é"])])
    with Session(database_url) as s:
        s.ingest(Record(app_name="qa", app_version="v1", input={"question": "q", "n": 1},
                        output=["a", "b"], start_time=1.0, end_time=2.0), [])
    out = _run("records", "--database-url", database_url, "--format", "csv")
    rows = _csv_rows(out.stdout)
    assert json.loads(rows[0]["tags"]) == ["prod", "é"]
    assert json.loads(rows[1]["input"]) == {"question": "q", "n": 1}
    assert json.loads(rows[1]["output"]) == ["a", "b"]


@pytest.mark.parametrize("command", ["records", "leaderboard"])
def test_an_unknown_app_is_an_error_that_lists_the_apps(awkward: str, command: str) -> None:
    """A mistyped --app printed "no records" and exited 0, as if the app had none."""
    out = _run(command, "--database-url", awkward, "--app", "qa:v9")
    assert out.exit_code == 2
    assert out.stderr.startswith("scrutiny: error: no records of app 'qa:v9'")
    assert "qa:v1, team\\:qa:v2" in out.stderr
    for app in ("qa", "qa:v1", "team:qa"):  # an app's name or id is accepted
        out = _run(command, "--database-url", awkward, "--app", app, "--format", "json")
        assert out.exit_code == 0, out.stderr
        assert json.loads(out.stdout)


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_an_empty_database_reads_as_no_records(database_url: str, fmt: str) -> None:
    Session(database_url).close()
    for command in ("records", "leaderboard"):
        out = _run(command, "--database-url", database_url, "--format", fmt)
        assert out.exit_code == 0
        if fmt == "json":
            assert json.loads(out.stdout) == []
        elif fmt == "csv":
            assert len(out.stdout.splitlines()) == 1  # the header
        else:
            assert out.stdout == "no records\n"


@pytest.mark.parametrize(("args", "message"), [
    (["records", "--database-url", "nonsense"], "not a database URL"),
    (["records", "--database-url", "mysql://u@h/db"], "databases are not supported"),
    # (two slashes, a common slip: a raw SQLAlchemy traceback, exit 1)
    (["records", "--database-url", "sqlite://my.sqlite"], "use three slashes for a file, "
     "'sqlite:///my.sqlite'"),
    (["leaderboard", "--database-url", "sqlite:///{tmp}/none.sqlite"],
     "there is no SQLite database at"),
    (["records", "--offset", str(2 ** 63)], "Invalid value for '--offset'"),
    (["records", "--format", "xml"], "Invalid value for '--format'"),
    (["worker", "--concurrency", "0"], "Invalid value for '--concurrency'"),
    # (a mistyped folder was taken: every feedback of it then failed to import)
    (["worker", "--database-url", "sqlite:///{tmp}/none.sqlite", "--import-path",
      "{tmp}/nowhere"], "Invalid value for '--import-path': Directory"),
])
def test_wrong_input_exits_2_saying_what_is_wrong(tmp_path: Path, args: list[str],
                                                   message: str) -> None:
    out = _run(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert out.exit_code == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "none.sqlite").exists()


def test_python_dash_m_scrutiny_is_the_command(tmp_path: Path) -> None:
    """Where the venv's bin/ is not on PATH: "'scrutiny' is a package and cannot be
    directly executed"."""
    url = f"sqlite:///{tmp_path}/m.sqlite"
    _store(url, [_record(0)])
    out = subprocess.run([sys.executable, "-m", "scrutiny", "records", "--database-url", url,
                          "--format", "json"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert [row["input"] for row in json.loads(out.stdout)] == ["question 0"]
    usage = subprocess.run([sys.executable, "-m", "scrutiny", "--help"], capture_output=True,
                           text=True, timeout=120, check=False)
    assert usage.stdout.startswith("Usage: scrutiny ")


# ---------------------------------------------------------------------- worker
def test_a_worker_refuses_a_database_that_does_not_exist(tmp_path: Path) -> None:
    """A mistyped path made a new, empty database that the worker then watched forever."""
    missing = tmp_path / "typo.sqlite"
    proc = subprocess.run([sys.executable, "-m", "scrutiny.cli", "worker", "--database-url",
                           f"sqlite:///{missing}"], capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"scrutiny: error: no database at {missing}")
    assert "scrutiny db upgrade" in proc.stderr
    assert not missing.exists()


def test_a_workers_log_is_its_own_lines(tmp_path: Path) -> None:
    """Alembic's INFO lines (two per migration step) filled the worker's log."""
    db = tmp_path / "new.sqlite"
    db.touch()  # exists, no tables yet: the worker creates them
    log, returncode = run_worker_until(["--database-url", f"sqlite:///{db}"],
                                       "scrutiny.worker worker ")
    assert returncode == 0, log
    assert "stopped cleanly" in log
    assert "alembic" not in log


def test_a_workers_first_lines_say_what_waits_and_when_no_app_stored_there(
        tmp_path: Path) -> None:
    """A worker on the wrong database (or --table-prefix) created tables of its own and
    waited for ever, its log the same as that of a worker with no work yet."""
    db = tmp_path / "empty.sqlite"
    db.touch()
    # (read up to its last line: stopped as soon as the first came, the worker was
    # sometimes told to stop before it logged the next one)
    log, returncode = run_worker_until(["--database-url", f"sqlite:///{db}"],
                                       "no app has stored anything there yet")
    assert returncode == 0, log
    assert "0 result(s) pending" in log
    assert "no app has stored anything there yet" in log
    used = tmp_path / "used.sqlite"
    with Session(f"sqlite:///{used}", feedback_mode="deferred") as app:
        for i in range(3):
            app.ingest(_record(i), [SCORE])
        assert app.flush(10)
        with app.store.engine.begin() as conn:  # (one taken by a process that died since)
            conn.exec_driver_sql("UPDATE scrutiny_feedback_results SET status = 'running' "
                                 "WHERE rowid = (SELECT min(rowid) FROM "
                                 "scrutiny_feedback_results)")
    log, returncode = run_worker_until(
        ["--database-url", f"sqlite:///{used}", "--import-path", str(REPO)],
        "scrutiny.worker worker ")
    assert returncode == 0, log
    assert "2 result(s) pending, 1 running (claimable once their lease runs out)" in log
    assert "no app has stored" not in log


def test_an_idle_worker_logs_no_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    """A worker with nothing to do logged the same counts every --log-every seconds."""
    from scrutiny.cli import _Progress
    from scrutiny.core import FeedbackResult, FeedbackStatus

    progress = _Progress(every=0.0)
    with caplog.at_level(logging.INFO, logger="scrutiny.worker"):
        progress.log(0)
        progress.log(0)
        assert caplog.messages == []
        progress(FeedbackResult(record_id="r", feedback_name="f",
                                status=FeedbackStatus.DONE, result=1.0), _record(0))
        progress.log(1)
        progress.log(1)
        assert len(caplog.messages) == 1
        assert caplog.messages[0].startswith("claimed 1, done 1, failed 0")
        progress.log(1, force=True)  # (its last line, when it stops)
        assert len(caplog.messages) == 2


def test_a_workers_default_feedback_timeout_can_be_set(tmp_path: Path) -> None:
    """A feedback without a timeout of its own got 120 s in a worker, whatever the team
    wanted: the app's Session(feedback_timeout=) is not stored with the record."""
    from tests.support import deferred_feedbacks as fbs

    db = tmp_path / "slow.sqlite"
    slow = Feedback(fbs.takes_a_while).on_output()  # (0.4 s, no timeout of its own)
    with Session(f"sqlite:///{db}", feedback_mode="deferred") as app:
        record = app.ingest(_record(0), [slow])
        assert app.flush(10)
    log, returncode = run_worker_until(
        ["--database-url", f"sqlite:///{db}", "--import-path", str(REPO),
         "--feedback-timeout", "0.1", "--log-every", "0.2"], "failed 1,")
    assert returncode == 0, log
    with Session(f"sqlite:///{db}") as reader:
        stored = reader.get_record(record.record_id)
    assert stored is not None
    [result] = stored.feedback_results.values()
    assert result.error is not None
    assert "timed out after 0.1 s" in result.error


def test_delete_erases_by_record_id_app_and_time_and_asks_first(database_url: str) -> None:
    """An erasure request had no command: it needed Python or hand-written SQL."""
    records = [_record(i) for i in range(3)] + [_record(9, app="other")]
    _store(database_url, records)

    def left() -> set[str]:
        with Session(database_url) as s:
            return set(s.get_records_and_feedback()[0]["record_id"])

    refused = CliRunner().invoke(main, ["delete", "--database-url", database_url,
                                        "--record-id", records[0].record_id], input="n\n")
    assert refused.exit_code == 2
    assert "nothing deleted" in refused.stderr
    assert len(left()) == 4
    one = _run("delete", "--database-url", database_url, "--record-id", records[0].record_id,
               "--yes")
    assert one.exit_code == 0, one.stderr
    assert one.stdout == "deleted 1 record(s)\n"
    assert records[0].record_id not in left()
    before = _run("delete", "--database-url", database_url, "--app", "qa",
                  "--before", "2023-11-14T22:13:21.5", "--yes")  # (naive: UTC) record 1 only
    assert before.stdout == "deleted 1 record(s)\n", before.stderr
    assert left() == {records[2].record_id, records[3].record_id}
    mistyped = _run("delete", "--database-url", database_url, "--record-id",
                    records[2].record_id, "--record-id", "no-such-id", "--yes")
    assert mistyped.exit_code == 1  # (an erasure job given a wrong id must not pass)
    assert mistyped.stdout == "deleted 1 record(s)\n"
    assert "1 of the 2 given record ids matched no record: no-such-id" in mistyped.stderr
    assert left() == {records[3].record_id}
    closed = CliRunner().invoke(main, ["delete", "--database-url", database_url, "--app",
                                       "other"], input="")
    assert closed.exit_code == 2
    assert "nothing deleted" in closed.stderr
    for args, said in ((["--yes"], "say what to delete"),
                       (["--record-id", " ", "--yes"], "--record-id is empty"),
                       (["--before", "last week", "--yes"], "not an ISO 8601 time"),
                       (["--app", "nope", "--yes"], "no records of app 'nope'")):
        bad = _run("delete", "--database-url", database_url, *args)
        assert bad.exit_code == 2
        assert said in bad.stderr
    assert len(left()) == 1
