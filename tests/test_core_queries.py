"""The query API the dashboard and the CLI read through: pages, filters, summaries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scrutiny import ConfigurationError, Feedback, Record, Session


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


def test_text_search_is_literal_and_case_insensitive(filled: Session) -> None:
    assert filled.query_records(search="QUESTION 7").total == 1
    assert filled.query_records(search="100%").total == 10  # % is not a wildcard
    assert filled.query_records(search="certainty_3").total == 1  # nor is _
    assert filled.query_records(search="certainty_3 4").total == 0


def test_bad_query_arguments_are_clear_errors(filled: Session) -> None:
    with pytest.raises(ConfigurationError, match="feedback_name"):
        filled.query_records(statuses=["done"])
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
