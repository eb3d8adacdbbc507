"""The query API the dashboard and the CLI read through: pages, filters, summaries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scrutiny import ConfigurationError, Feedback, Record, Session
from scrutiny.core._records import app_id_for
from tests.support.postgres import postgres_url


def _score(output: str) -> float:
    return int(output.split()[-1]) / 10


@pytest.fixture(params=["sqlite", "memory"])
def filled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path}/q.sqlite" if request.param == "sqlite" else "memory://"
    s = Session(url)
    fb = Feedback(_score, name="quality").on_output()
    bad = Feedback(lambda output: "nope", name="broken").on_output()
    base = 1_700_000_000.0
    for i in range(10):
        version = "v1" if i < 6 else "v2"
        r = Record(app_name="qa", app_version=version, input=f"question {i}",
                   output=f"Answer with 100% certainty_{i} {i}", start_time=base + i,
                   end_time=base + i + 0.5)
        s.ingest(r, [fb, bad] if i % 5 == 0 else [fb])
    s.ingest(Record(app_name="other", app_version="v1", input="hello", output="hi 3",
                    start_time=base + 100, end_time=base + 101), [fb])
    assert s.wait_for_feedback(20)
    yield s
    s.close()


def test_pages_are_newest_first_with_total(filled: Session) -> None:
    page = filled.query_records(app_ids=["qa"], limit=4, offset=0)
    assert page.total == 10
    assert [r.input for r in page.records] == [f"question {i}" for i in (9, 8, 7, 6)]
    second = filled.query_records(app_ids=["qa"], limit=4, offset=8)
    assert [r.input for r in second.records] == ["question 1", "question 0"]


def test_results_come_with_each_record(filled: Session) -> None:
    record = filled.query_records(app_ids=["qa"], limit=1, offset=9).records[0]
    statuses = {r.feedback_name: r.status.value for r in record.feedback_results.values()}
    assert statuses == {"quality": "done", "broken": "failed"}


def test_filter_by_version_status_and_score_range(filled: Session) -> None:
    assert filled.query_records(app_versions=["v2"]).total == 4
    failed = filled.query_records(feedback_name="broken", statuses=["failed"])
    assert sorted(r.input for r in failed.records) == ["question 0", "question 5"]
    mid = filled.query_records(app_ids=["qa"], feedback_name="quality", min_score=0.3,
                               max_score=0.5)
    assert sorted(r.input for r in mid.records) == ["question 3", "question 4", "question 5"]
    # a status alone: a result of any feedback (every record with a failed result)
    any_failed = filled.query_records(statuses=["failed"])
    assert sorted(r.input for r in any_failed.records) == ["question 0", "question 5"]
    assert filled.query_records(statuses=["done"]).total == 11


def test_text_search_is_literal_and_case_insensitive(filled: Session) -> None:
    assert filled.query_records(search="QUESTION 7").total == 1
    assert filled.query_records(search="100%").total == 10  # % is not a wildcard
    assert filled.query_records(search="certainty_3").total == 1  # nor is _
    assert filled.query_records(search="certainty_3 4").total == 0


def test_bad_query_arguments_are_clear_errors(filled: Session) -> None:
    with pytest.raises(ConfigurationError, match="a score range needs feedback_name"):
        filled.query_records(min_score=0.5)
    with pytest.raises(ConfigurationError, match="unknown status"):
        filled.query_records(feedback_name="quality", statuses=["finished"])
    with pytest.raises(ConfigurationError, match="limit"):
        filled.query_records(limit=0)


def test_apps_and_feedback_summary(filled: Session) -> None:
    apps = {(a["app_name"], a["app_version"]): a["records"] for a in filled.get_apps()}
    assert apps == {("other", "v1"): 1, ("qa", "v1"): 6, ("qa", "v2"): 4}
    summary = {(e["app_version"], e["feedback_name"]): e
               for e in filled.get_feedback_summary(["qa"])}
    assert summary[("v1", "quality")]["done"] == 6
    assert summary[("v1", "quality")]["mean"] == pytest.approx(0.25)
    assert summary[("v1", "broken")]["failed"] == 2
    assert summary[("v1", "broken")]["mean"] is None
    assert summary[("v2", "quality")]["higher_is_better"] is True


def test_one_apps_summary_reads_only_that_apps_results(tmp_path: Path) -> None:
    """The results of the apps asked for are grouped by the database; every app's results
    were grouped and read, then most thrown away (one app's summary cost the whole
    leaderboard: 143 ms at 100k records)."""
    import sqlalchemy as sa

    fb = Feedback(_score, name="quality").on_output()
    with Session(f"sqlite:///{tmp_path}/a.sqlite") as s:
        for app in ("qa", "other", "third"):
            s.ingest(Record(app_name=app, app_version="v1", input="q", output="a 5",
                            start_time=1.0, end_time=2.0), [fb])
        assert s.wait_for_feedback(20)
        read: list[str] = []

        def rows(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "feedback_results" in statement:
                read.append(statement)

        engine = s.store.engine  # type: ignore[attr-defined]
        sa.event.listen(engine, "before_cursor_execute", rows)
        try:
            summary = s.get_feedback_summary(["qa"])
        finally:
            sa.event.remove(engine, "before_cursor_execute", rows)
    assert [(e["app_name"], e["done"]) for e in summary] == [("qa", 1)]
    assert read, "the summary read no results"
    assert all(" IN " in statement for statement in read), read


def test_leaderboard_uses_database_aggregates(filled: Session) -> None:
    board = filled.get_leaderboard(["qa"])
    assert list(board.index) == [("qa", "v2"), ("qa", "v1")]
    assert board.loc[("qa", "v2"), "quality"] == pytest.approx(0.75)
    assert board.loc[("qa", "v1"), "failed"] == 2
    assert board.loc[("qa", "v1"), "latency"] == pytest.approx(0.5)


def test_get_record_matches_the_page(filled: Session) -> None:
    listed = filled.query_records(limit=1).records[0]
    one = filled.get_record(listed.record_id)
    assert one is not None
    assert (one.input, one.output) == (listed.input, listed.output)


def test_one_name_may_be_given_as_a_string_everywhere(filled: Session) -> None:
    """A plain string was read letter by letter: app_ids="qa" matched apps "q" and "a" —
    nothing to read, and for delete_records, the wrong apps to delete."""
    df, _ = filled.get_records_and_feedback("qa")
    assert len(df) == 10
    assert list(filled.get_leaderboard("qa").index) == [("qa", "v2"), ("qa", "v1")]
    assert {e["app_name"] for e in filled.get_feedback_summary("qa")} == {"qa"}
    assert filled.query_records(app_ids="qa", app_versions="v2").total == 4
    assert filled.query_records(feedback_name="broken", statuses="failed").total == 2
    assert filled.delete_records(app_ids="other") == 1
    assert filled.get_records_and_feedback()[0]["app_name"].unique().tolist() == ["qa"]
    with pytest.raises(ConfigurationError, match="app_ids must be names"):
        filled.get_leaderboard([1, 2])  # type: ignore[list-item]


def test_an_empty_leaderboard_has_the_columns_of_a_filled_one(tmp_path: Path) -> None:
    with Session(f"sqlite:///{tmp_path}/empty.sqlite") as s:
        board = s.get_leaderboard()
        assert board.empty
        assert list(board.columns) == ["records", "latency", "total_tokens", "pending",
                                       "running", "failed", "skipped"]
        assert list(board[["pending", "failed"]].columns) == ["pending", "failed"]


def test_any_feedback_name_ranks_including_the_sorting_helpers_own(tmp_path: Path) -> None:
    """The leaderboard sorted through a temporary `_rank` column: a feedback of that
    name raised KeyError once there were two versions."""
    with Session(f"sqlite:///{tmp_path}/rank.sqlite") as s:
        fb = Feedback(_score, name="_rank").on_output()
        for version, n in (("v1", 2), ("v2", 8)):
            s.ingest(Record(app_name="qa", app_version=version, input="q",
                            output=f"answer {n}", start_time=1.0, end_time=2.0), [fb])
        assert s.wait_for_feedback(20)
        board = s.get_leaderboard()
    assert list(board.index) == [("qa", "v2"), ("qa", "v1")]
    assert board["_rank"].tolist() == pytest.approx([0.8, 0.2])


def test_the_latest_direction_of_a_feedback_is_what_every_reader_sees(
        tmp_path: Path) -> None:
    """The direction is not part of a feedback's id, and its stored definition kept the
    first one: a reader (dashboard, CLI, another session) ranked the old way."""
    url = f"sqlite:///{tmp_path}/direction.sqlite"

    def toxicity(output: str) -> float:
        return 0.1 if output == "calm" else 0.9

    for version, output, higher in (("v1", "calm", True), ("v2", "rude", False)):
        with Session(url) as writer:
            fb = Feedback(toxicity, higher_is_better=higher).on_output()
            writer.ingest(Record(app_name="qa", app_version=version, input="q",
                                 output=output, start_time=1.0, end_time=2.0), [fb])
            assert writer.wait_for_feedback(20)
    with Session(url) as reader:
        board = reader.get_leaderboard()
        assert board.attrs["higher_is_better"] == {"toxicity": False}
        assert list(board.index) == [("qa", "v1"), ("qa", "v2")]  # less toxic first
        assert {e["higher_is_better"] for e in reader.get_feedback_summary()} == {False}


def test_search_finds_quotes_escapes_and_any_letters_in_any_case(filled: Session) -> None:
    """Texts are stored as JSON: a quote, a newline or a backslash is escaped there and
    such terms found nothing; SQLite folded only ASCII letters (ПРИВЕТ missed привет)."""
    for i, text in enumerate(['she said "hello"', "one\nline", "C:\\temp\\x", "привет мир",
                              "Ünïcode été"]):
        filled.ingest(Record(app_name="search", app_version="v1", input=f"s{i}",
                             output=text, start_time=1.0, end_time=2.0), [])
    for term in ['said "hello"', "one\nline", "C:\\temp", "ПРИВЕТ", "привет", "ünïcode ÉTÉ"]:
        page = filled.query_records(app_ids="search", search=term)
        assert page.total == 1, term
    assert filled.query_records(app_ids="search", search="пока").total == 0


def test_a_version_failing_a_feedback_everywhere_does_not_rank_first(tmp_path: Path) -> None:
    """A feedback with no done result was left out of a version's rank: one failing its
    safety check on every record ranked above a safe one on the strength of the rest."""
    def safety(output: str) -> float:
        if output == "unsafe":
            raise RuntimeError("judge crashed")
        return 0.99

    def quality(output: str) -> float:
        return 0.9 if output == "unsafe" else 0.8

    with Session(f"sqlite:///{tmp_path}/rank.sqlite") as s:
        fbs = [Feedback(safety).on_output(), Feedback(quality).on_output()]
        for version, output in (("A", "unsafe"), ("B", "safe")):
            for _ in range(3):
                s.ingest(Record(app_name="qa", app_version=version, input="q", output=output,
                                start_time=1.0, end_time=2.0), fbs)
        assert s.wait_for_feedback(20)
        board = s.get_leaderboard("qa")
    assert list(board.index.get_level_values("app_version")) == ["B", "A"]
    assert board.loc[("qa", "A"), "failed"] == 3


# ---------------------------------------------------------------------- app ids and names
THREE_APPS = {("team", "qa"): 1, ("team:qa", "v1"): 2, ("team", "qa:v1"): 3}
"""Apps whose ids were all made of "team", "qa" and "v1" joined by ":", and their scores
(tenths): "team:qa:v1" was two apps' id, and "team:qa" one app's id and another's name."""


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
def three_apps(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    if request.param == "postgresql":
        s = Session(postgres_url(), table_prefix=f"t{uuid.uuid4().hex[:10]}_")
    else:
        s = Session(f"sqlite:///{tmp_path}/ids.sqlite" if request.param == "sqlite"
                    else "memory://")
    fb = Feedback(_score, name="quality").on_output()
    for (name, version), n in {**THREE_APPS, ("ops:eu", "v2"): 4}.items():
        s.ingest(Record(app_name=name, app_version=version, input=f"q{n}",
                        output=f"answer {n}", start_time=1.0 + n, end_time=2.0 + n), [fb])
    assert s.wait_for_feedback(20)
    yield s
    s.close()


def _apps_of(frame: Any) -> list[tuple[str, str]]:
    return sorted(zip(frame["app_name"], frame["app_version"], strict=True))


def test_apps_whose_names_hold_colons_keep_apart(three_apps: Session) -> None:
    """Ids were "name:version": app "team" version "qa:v1" and app "team:qa" version "v1"
    shared one id, and the filter took "team:qa" as the id of ("team", "qa") and the name
    of ("team:qa", "v1") at once: tables, leaderboard and deletes mixed the apps."""
    s = three_apps
    ids = {(a["app_name"], a["app_version"]): a["app_id"] for a in s.get_apps()}
    assert ids == {**{key: app_id_for(*key) for key in THREE_APPS},
                   ("ops:eu", "v2"): "ops\\:eu:v2"}
    assert ids[("team", "qa")] == "team:qa"  # (ids without ":" or "\" in a part: as ever)
    assert len(set(ids.values())) == 4
    assert {a["records"] for a in s.get_apps()} == {1}

    for key, n in THREE_APPS.items():  # an app's id selects that app only
        frame, _ = s.get_records_and_feedback([ids[key]])
        assert _apps_of(frame) == [key]
        assert frame["quality"].tolist() == pytest.approx([n / 10])
        assert s.query_records(app_ids=[ids[key]]).total == 1
        assert list(s.get_leaderboard([ids[key]]).index) == [key]
        assert [(e["app_name"], e["app_version"]) for e in
                s.get_feedback_summary([ids[key]])] == [key]
    # a value that is no app's id is an app name: all its versions
    assert _apps_of(s.get_records_and_feedback(["team"])[0]) == [("team", "qa"),
                                                                  ("team", "qa:v1")]
    assert _apps_of(s.get_records_and_feedback("ops:eu")[0]) == [("ops:eu", "v2")]
    assert _apps_of(s.get_records_and_feedback(["team:qa", "ops:eu"])[0]) == [
        ("ops:eu", "v2"), ("team", "qa")]

    board = s.get_leaderboard()
    assert sorted(board.index) == sorted([*THREE_APPS, ("ops:eu", "v2")])
    assert board["records"].tolist() == [1, 1, 1, 1]
    for key, n in THREE_APPS.items():
        assert board.loc[key, "quality"] == pytest.approx(n / 10)

    assert s.delete_records(app_ids=["team:qa"]) == 1  # ("team", "qa") only
    assert _apps_of(s.get_records_and_feedback()[0]) == [
        ("ops:eu", "v2"), ("team", "qa:v1"), ("team:qa", "v1")]
    # still the id of ("team", "qa"), records or not: not the name of ("team:qa", "v1")
    assert s.delete_records(app_ids="team:qa") == 0
    assert s.delete_records(app_ids=[ids[("team", "qa:v1")]]) == 1
    assert _apps_of(s.get_records_and_feedback()[0]) == [("ops:eu", "v2"), ("team:qa", "v1")]


@pytest.mark.parametrize("backend", ["sqlite", "memory", "postgresql"])
def test_search_finds_text_and_not_the_letters_of_its_escapes(backend: str,
                                                              tmp_path: Path) -> None:
    """Texts are stored as JSON: "nhere" found "first line\\nhere" (a newline, then
    "here"), "there" found "tab\\there" and "u001b" any text holding an escape character,
    none of which holds those letters."""
    url = {"sqlite": f"sqlite:///{tmp_path}/s.sqlite", "memory": "memory://"}.get(backend)
    with Session(url or postgres_url(), table_prefix=f"q{uuid.uuid4().hex[:8]}_") as s:
        for i, text in enumerate(["first line\nhere", "tab\there", "\x1b[31mred\x1b[0m",
                                  "a path C:\\nhere", "Straße NHERE"]):
            s.ingest(Record(app_name="search", app_version="v1", input=f"s{i}",
                            output=text, start_time=1.0, end_time=2.0), [])
        found = {term: sorted(r.input for r in s.query_records(search=term).records)
                 for term in ("nhere", "there", "u001b", "[31mred", "line\nhere", "ß")}
    assert found == {"nhere": ["s3", "s4"],  # (a backslash written out, then "nhere")
                     "there": [], "u001b": [], "[31mred": ["s2"], "line\nhere": ["s0"],
                     "ß": ["s4"]}


def test_an_empty_selection_selects_nothing_in_every_store(filled: Session) -> None:
    """(The in-memory store read an empty app_ids, app_versions or statuses as "all".)"""
    assert filled.query_records(app_ids=[]).total == 0
    assert filled.query_records(app_versions=[]).total == 0
    assert filled.query_records(feedback_name="quality", statuses=[]).total == 0
    assert filled.get_records_and_feedback(app_ids=[])[0].empty
    assert filled.get_leaderboard(app_ids=[]).empty
    assert filled.query_records().total == 11
