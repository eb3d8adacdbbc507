"""The dashboard's JSON API, over HTTP (Starlette's TestClient), on a real SQLite file.

Records are stored through `Session.ingest(Record(...), [Feedback(...)])`, and every answer
is compared with what the `Session` query API says about the same database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient

from scrutiny import Feedback, Record, RecordStatus, Session, Span, TokenUsage
from scrutiny.core.storage import MemoryStore
from scrutiny.dashboard import create_app

BASE = 1_767_000_000.0
SCRIPT = "<script>alert(1)</script>"
TOKEN = "t0ken-for-tests-0123456789"


# ---------------------------------------------------------------------- data (shared)
def rag_record(i: int, *, app: str = "qa", version: str = "v1", output: str | None = None,
               start: float | None = None, status: RecordStatus = RecordStatus.OK,
               contexts: list[str] | None = None) -> Record:
    """A record shaped like a LangChain RAG chain's: chain > retriever, prompt, model,
    parser; with retrieved contexts and token usage."""
    t = BASE + 10 * i if start is None else start
    rid = uuid.uuid4().hex
    question = f"What is the capital of country {i}?"
    answer = output if output is not None else f"The capital of country {i} is City {i}."
    docs = contexts if contexts is not None else [
        f"City {i} is the capital of country {i}.", "Paris is the capital of France."]
    usage = TokenUsage(120 + i, 30, 150 + i)
    end = t + 1.2 + 0.1 * i
    root = Span(rid + "-0", None, "RunnableSequence", "chain", t, end,
                inputs={"question": question}, outputs=answer)
    spans = [
        root,
        Span(rid + "-1", root.span_id, "VectorStoreRetriever", "retriever", t + 0.01,
             t + 0.21, inputs=question, outputs=docs),
        Span(rid + "-2", root.span_id, "ChatPromptTemplate", "prompt", t + 0.22, t + 0.23,
             inputs={"question": question, "context": "\n".join(docs)},
             outputs=[{"role": "user", "content": question}]),
        Span(rid + "-3", root.span_id, "ChatOpenAI", "chat_model", t + 0.24, t + 1.15,
             inputs=[{"role": "user", "content": question}], outputs=answer, usage=usage,
             model="gpt-4o-mini"),
        Span(rid + "-4", root.span_id, "StrOutputParser", "parser", t + 1.16, t + 1.19,
             inputs=answer, outputs=answer),
    ]
    return Record(app_name=app, app_version=version, input=question, output=answer,
                  record_id=rid, status=status, start_time=t, end_time=end,
                  spans=spans, contexts=docs, usage=usage, framework="langchain",
                  error="boom" if status is RecordStatus.ERROR else None)


def _quality(output: str) -> tuple[float, str]:
    return (0.9 if "City" in output else 0.2), "The answer names a city from the context."


def _verbosity(output: str) -> float:
    return min(1.0, len(output) / 100)


def _broken(output: str) -> float:
    raise RuntimeError("judge unavailable")


QUALITY = Feedback(_quality, name="quality").on_output()
VERBOSITY = Feedback(_verbosity, name="verbosity", higher_is_better=False).on_output()
BROKEN = Feedback(_broken, name="broken").on_output()


def fill(session: Session) -> list[Record]:
    """9 records of qa:v1 / qa:v2 / other:v1, one with a <script> output, one failing."""
    records = []
    for i in range(6):
        version = "v1" if i < 3 else "v2"
        out = "I am not sure." if version == "v1" and i == 0 else None
        rec = rag_record(i, version=version, output=out)
        session.ingest(rec, [QUALITY, VERBOSITY, BROKEN] if i == 5 else [QUALITY, VERBOSITY])
        records.append(rec)
    evil = rag_record(6, app="other", output=SCRIPT)
    session.ingest(evil, [QUALITY])
    records.append(evil)
    records.append(session.ingest(rag_record(7, app="other", status=RecordStatus.ERROR),
                                  [QUALITY]))
    assert session.wait_for_feedback(30)
    return records


@pytest.fixture
def filled(database_url: str) -> Iterator[Session]:
    s = Session(database_url)
    fill(s)
    yield s
    s.close()


@pytest.fixture
def client(filled: Session) -> Iterator[TestClient]:
    with TestClient(create_app(filled), base_url="http://127.0.0.1:8765") as c:
        yield c


def get(client: TestClient, path: str, **params: Any) -> Any:
    resp = client.get(path, params=params)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


# ---------------------------------------------------------------------- apps & leaderboard
def test_apps_lists_every_version_with_counts(client: TestClient, filled: Session) -> None:
    apps = get(client, "/api/apps")
    assert [(a["app_id"], a["records"]) for a in apps] == [
        ("other:v1", 2), ("qa:v1", 3), ("qa:v2", 3)]
    assert {a["app_id"] for a in apps} == {a["app_id"] for a in filled.get_apps()}


def test_leaderboard_agrees_with_the_session(client: TestClient, filled: Session) -> None:
    board = get(client, "/api/leaderboard")
    expected = filled.get_leaderboard()
    assert [(r["app_name"], r["app_version"]) for r in board["rows"]] == list(expected.index)
    assert board["feedbacks"] == [
        {"name": "broken", "higher_is_better": True},
        {"name": "quality", "higher_is_better": True},
        {"name": "verbosity", "higher_is_better": False},
    ]
    rows = {r["app_id"]: r for r in board["rows"]}
    v2 = rows["qa:v2"]
    assert v2["records"] == 3
    assert v2["scores"]["quality"]["mean"] == pytest.approx(
        expected.loc[("qa", "v2"), "quality"])
    assert v2["scores"]["quality"]["done"] == 3
    assert v2["scores"]["broken"] == {"mean": None, "done": 0, "pending": 0, "running": 0,
                                      "failed": 1, "skipped": 0}
    assert v2["failed"] == 1
    assert rows["qa:v1"]["scores"]["quality"]["mean"] == pytest.approx((0.2 + 0.9 + 0.9) / 3)
    assert "broken" not in rows["qa:v1"]["scores"]


def test_leaderboard_filters_by_app(client: TestClient) -> None:
    board = get(client, "/api/leaderboard", app="qa")
    assert sorted(r["app_id"] for r in board["rows"]) == ["qa:v1", "qa:v2"]
    only = get(client, "/api/leaderboard", app="qa:v2")
    assert [r["app_id"] for r in only["rows"]] == ["qa:v2"]


# ---------------------------------------------------------------------- records
def test_records_are_paginated_newest_first(client: TestClient) -> None:
    first = get(client, "/api/records", limit=3)
    assert first["total"] == 8
    assert first["limit"] == 3
    assert first["offset"] == 0
    assert [r["input_preview"] for r in first["records"]] == [
        f"What is the capital of country {i}?" for i in (7, 6, 5)]
    last = get(client, "/api/records", limit=3, offset=6)
    assert [r["input_preview"][-2] for r in last["records"]] == ["1", "0"]


def test_record_rows_carry_each_feedback_status_score_and_reason(client: TestClient) -> None:
    """(The reason, cut short: the list showed a "failed" badge and never why.)"""
    row = get(client, "/api/records", version="v2", limit=1)["records"][0]
    assert row["app_id"] == "qa:v2"
    assert row["feedback"] == {
        "broken": {"status": "failed", "score": None,
                   "reason": "RuntimeError: judge unavailable"},
        "quality": {"status": "done", "score": 0.9,
                    "reason": "The answer names a city from the context."},
        "verbosity": {"status": "done", "score": pytest.approx(0.35), "reason": None}}


@pytest.mark.parametrize(("params", "expected"), [
    ({"app": "other"}, 2),
    ({"app": "qa", "version": "v1"}, 3),
    ({"record_status": "error"}, 1),
    ({"feedback": "broken", "status": "failed"}, 1),
    ({"feedback": "quality", "max_score": "0.5"}, 2),
    ({"feedback": "quality", "min_score": "0.5", "app": "qa"}, 5),
    ({"q": "NOT SURE"}, 1),
    ({"q": "<script>"}, 1),
    ({"q": "100%_"}, 0),
])
def test_records_filters(client: TestClient, filled: Session, params: dict[str, str],
                         expected: int) -> None:
    page = get(client, "/api/records", **params)
    assert page["total"] == expected == len(page["records"])


def test_records_page_matches_query_records(client: TestClient, filled: Session) -> None:
    page = get(client, "/api/records", feedback="quality", status="done", limit=4)
    direct = filled.query_records(feedback_name="quality", statuses=["done"], limit=4)
    assert page["total"] == direct.total
    assert [r["record_id"] for r in page["records"]] == [r.record_id for r in direct.records]
    # (a status with no feedback was refused, and the page filled in its first feedback:
    # "0 matching" for records whose other feedbacks had results of that status)
    for status in ("done", "failed", "skipped"):
        any_feedback = get(client, "/api/records", status=status, limit=1000)
        frame, names = filled.get_records_and_feedback()
        having = frame[frame[[f"{n} status" for n in names]].eq(status).any(axis=1)]
        assert any_feedback["total"] == len(having), status


@pytest.mark.parametrize(("params", "message"), [
    ({"limit": "0"}, "limit must be 1..1000"),
    ({"limit": "many"}, "limit must be an integer"),
    ({"feedback": "quality", "min_score": "high"}, "min_score must be a number"),
    ({"min_score": "0.5", "max_score": "0.9"},
     "filtering by min_score and max_score needs feedback=<name>"),
    ({"feedback": "quality", "status": "lost"}, "unknown status"),
    # these were a 500 (SQLite refuses LIKE patterns over 50,000 bytes and integers over
    # 2**63) or an empty 200
    ({"q": "x" * 50_001}, "at most 1000 are searched for"),
    ({"offset": str(2 ** 63)}, "offset 0.."),
    ({"record_status": "bogus"}, "unknown record_status 'bogus'"),
    ({"feedback": "quality", "min_score": "nan"}, "min_score must be a finite number"),
    ({"feedback": "quality", "min_score": "0.9", "max_score": "0.1"}, "is above max_score"),
])
def test_bad_parameters_are_a_400_with_the_reason(client: TestClient, params: dict[str, str],
                                                  message: str) -> None:
    resp = client.get("/api/records", params=params)
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_one_record_with_spans_contexts_and_results(client: TestClient,
                                                    filled: Session) -> None:
    rid = get(client, "/api/records", version="v2", limit=1)["records"][0]["record_id"]
    rec = get(client, f"/api/records/{rid}")
    stored = filled.get_record(rid)
    assert stored is not None
    assert rec["input"] == stored.input
    assert rec["output"] == stored.output
    assert rec["contexts"] == stored.contexts
    assert rec["usage"] == {"prompt_tokens": 125, "completion_tokens": 30, "total_tokens": 155}
    assert [(s["name"], s["depth"]) for s in rec["spans"]] == [
        ("RunnableSequence", 0), ("VectorStoreRetriever", 1), ("ChatPromptTemplate", 1),
        ("ChatOpenAI", 1), ("StrOutputParser", 1)]
    model = rec["spans"][3]
    assert model["kind"] == "chat_model"
    assert model["model"] == "gpt-4o-mini"
    assert model["offset_ms"] == pytest.approx(240, abs=1)
    assert model["duration_ms"] == pytest.approx(910, abs=1)
    assert rec["total_ms"] == pytest.approx(1700, abs=1)
    results = {r["feedback_name"]: r for r in rec["feedback"]}
    assert results["quality"]["score"] == 0.9
    assert results["quality"]["explanation"] == "The answer names a city from the context."
    assert results["broken"]["status"] == "failed"
    assert "judge unavailable" in results["broken"]["error"]
    assert rec["final"] is True


def test_a_step_that_ended_before_it_began_lasts_zero(database_url: str) -> None:
    """A clock set back during a step (NTP) ended it before its start: the waterfall drew
    a negative bar and the span's latency was negative."""
    span = Span(span_id="s1", parent_id=None, name="step", kind="chain", start_time=100.5,
                end_time=100.2)
    assert span.latency == 0.0
    with Session(database_url) as session:
        record = session.ingest(Record(app_name="clock", app_version="v1", input="q",
                                       output="a", start_time=100.0, end_time=101.0,
                                       spans=[span]))
        assert session.flush(10)
        with TestClient(create_app(session), base_url="http://127.0.0.1:8765") as client:
            rec = get(client, f"/api/records/{record.record_id}")
    assert [s["duration_ms"] for s in rec["spans"]] == [0.0]
    assert rec["spans"][0]["offset_ms"] == pytest.approx(500)


def test_unknown_record_is_a_404(client: TestClient) -> None:
    resp = client.get("/api/records/nope")
    assert resp.status_code == 404
    assert resp.json() == {"error": "no such record"}


def test_any_record_id_is_answered_by_query(database_url: str) -> None:
    """A page asking for api/records/<id> got api/records/ (a 404) for the id "." and the
    API's root for "..": a browser resolves those as dot segments, escaped as %2E or not."""
    ids = [".", "..", "%2E", "a/../b", "?x=1#y", " "]
    with Session(database_url) as session:
        for i, rid in enumerate(ids):
            session.ingest(Record(app_name="ids", app_version="v1", input=f"id {i}",
                                  output="o", record_id=rid))
        assert session.flush(10)
        with TestClient(create_app(session), base_url="http://127.0.0.1:8765") as client:
            for i, rid in enumerate(ids):
                rec = get(client, "/api/record", id=rid)
                assert (rec["record_id"], rec["input"]) == (rid, f"id {i}")
            missing = client.get("/api/record", params={"id": "nope"})
            assert (missing.status_code, missing.json()) == (404, {"error": "no such record"})
            bare = client.get("/api/record")
            assert bare.status_code == 400
            assert "id=" in bare.json()["error"]


def test_script_output_comes_back_as_plain_data(client: TestClient) -> None:
    row = get(client, "/api/records", app="other", record_status="ok")["records"][0]
    assert row["output_preview"] == SCRIPT
    assert get(client, f"/api/records/{row['record_id']}")["output"] == SCRIPT


# ---------------------------------------------------------------------- charts
def test_charts_give_score_histograms_and_latency_points(client: TestClient) -> None:
    charts = get(client, "/api/charts", app="qa")
    assert [v["app_id"] for v in charts["versions"]] == ["qa:v1", "qa:v2"]
    quality = charts["distributions"]["quality"]
    assert (quality["lo"], quality["hi"]) == (0.0, 1.0)
    by_app = {v["app_id"]: v for v in quality["versions"]}
    assert by_app["qa:v1"]["counts"] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 2]
    assert by_app["qa:v1"]["n"] == 3
    assert by_app["qa:v2"]["mean"] == pytest.approx(0.9)
    assert "broken" not in charts["distributions"]  # never done: no distribution
    latency = {s["app_id"]: s["points"] for s in charts["latency"]}
    assert [round(p[1], 3) for p in latency["qa:v1"]] == [1.2, 1.3, 1.4]
    assert latency["qa:v1"][0][0] == pytest.approx(BASE)


def test_charts_sample_is_bounded(client: TestClient) -> None:
    assert client.get("/api/charts", params={"sample": "1"}).status_code == 400


@pytest.mark.parametrize("url", ["sqlite", "memory://"])
def test_charts_of_many_versions_keep_the_newest(tmp_path: Path, url: str) -> None:
    """With 15 versions the charts kept the first 12 in text order (v1, v10-v15, v2-v6):
    v7-v9 left out, the oldest kept."""
    database = f"sqlite:///{tmp_path}/many.sqlite" if url == "sqlite" else url
    with Session(database) as session:
        for n in range(1, 16):
            session.ingest(Record(app_name="qa", app_version=f"v{n}", input="q", output="a",
                                  start_time=1_700_000_000 + n * 60), [])
        assert session.flush(20)
        with TestClient(create_app(session), base_url="http://127.0.0.1:8765") as client:
            charts = get(client, "/api/charts")
    assert charts["truncated"] is True
    assert sorted(int(v["app_version"][1:]) for v in charts["versions"]) == list(range(4, 16))


def _as_score(output: str) -> float:
    return float(output)


def test_charts_of_scores_wider_than_the_float_range(database_url: str) -> None:
    """Done scores of -1e308 and 1e308 made the histogram's width inf (hi - lo), and
    /api/charts a 500 ("cannot convert float NaN to integer"); and the mean of 1e308 and
    1.5e308 overflowed to no mean at all."""
    largest = 1.7976931348623157e308
    scores = {"v1": ["-1e308", "1e308"], "v2": ["1e308", "1.5e308"], "v3": [repr(largest)]}
    with Session(database_url) as session:
        fb = Feedback(_as_score, name="extreme").on_output()
        for version, outputs in scores.items():
            for i, output in enumerate(outputs):
                session.ingest(Record(app_name="big", app_version=version, input=f"q{i}",
                                      output=output), [fb])
        assert session.wait_for_feedback(30)
        with TestClient(create_app(session), base_url="http://127.0.0.1:8765") as client:
            charts = get(client, "/api/charts", app=["big:v1", "big:v2"])
            extreme = charts["distributions"]["extreme"]
            assert (extreme["lo"], extreme["hi"]) == (-1e308, 1.5e308)
            by_app = {v["app_id"]: v for v in extreme["versions"]}
            # (bins 2.5e307 wide: 1e308 is 2e308 past lo, in bin 8; 1.5e308 in the last)
            assert by_app["big:v1"]["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 1, 0]
            assert by_app["big:v2"]["counts"] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
            assert by_app["big:v1"]["mean"] == 0.0
            assert by_app["big:v2"]["mean"] == 1.25e308

            alone = get(client, "/api/charts", app="big:v3")["distributions"]["extreme"]
            assert alone["lo"] < largest <= alone["hi"] == largest  # (a range, still finite)
            assert alone["versions"][0]["counts"] == [0] * 9 + [1]
            assert alone["versions"][0]["mean"] == largest

            every = get(client, "/api/charts")["distributions"]["extreme"]
            assert sum(sum(v["counts"]) for v in every["versions"]) == 5


# ---------------------------------------------------------------------- app ids and names
def _three_apps_client(database_url: str) -> tuple[Session, TestClient, dict[Any, str]]:
    """Apps ("team", "qa"), ("team:qa", "v1"), ("team", "qa:v1"), one record each (quality
    0.2, 0.9, 0.2 and verbosity 0.1, 0.2, 0.3 by output length); and their ids."""
    session = Session(database_url)
    outputs = {("team", "qa"): "x" * 10, ("team:qa", "v1"): "City" + "x" * 16,
               ("team", "qa:v1"): "x" * 30}
    for i, ((name, version), output) in enumerate(outputs.items()):
        session.ingest(rag_record(i, app=name, version=version, output=output),
                       [QUALITY, VERBOSITY])
    assert session.wait_for_feedback(30)
    ids = {(a["app_name"], a["app_version"]): a["app_id"] for a in session.get_apps()}
    assert len(set(ids.values())) == 3
    return session, TestClient(create_app(session), base_url="http://127.0.0.1:8765"), ids


def test_apps_whose_names_hold_colons_keep_apart_on_every_page(database_url: str) -> None:
    """The dashboard built ids as "name:version" itself, and the session's filters took a
    value as an id and a name at once: ("team", "qa:v1") and ("team:qa", "v1") shared the
    leaderboard's cells and the charts' samples, and app=team:qa listed both apps."""
    session, client, ids = _three_apps_client(database_url)
    expected = {("team", "qa"): (0.2, 0.1), ("team:qa", "v1"): (0.9, 0.2),
                ("team", "qa:v1"): (0.2, 0.3)}
    with session, client:
        rows = get(client, "/api/leaderboard")["rows"]
        assert sorted((r["app_name"], r["app_version"]) for r in rows) == sorted(expected)
        for row in rows:
            key = (row["app_name"], row["app_version"])
            assert row["app_id"] == ids[key]
            assert row["records"] == 1
            for name, mean in zip(("quality", "verbosity"), expected[key], strict=True):
                assert row["scores"][name]["done"] == 1, (key, name)
                assert row["scores"][name]["mean"] == pytest.approx(mean), (key, name)
        only = get(client, "/api/leaderboard", app="team:qa")["rows"]
        assert [(r["app_name"], r["app_version"]) for r in only] == [("team", "qa")]

        charts = get(client, "/api/charts")
        assert sorted(v["app_id"] for v in charts["versions"]) == sorted(ids.values())
        assert {v["sampled"] for v in charts["versions"]} == {1}
        verbosity = {v["app_id"]: v for v in charts["distributions"]["verbosity"]["versions"]}
        for key, (_, mean) in expected.items():
            assert verbosity[ids[key]]["n"] == 1
            assert verbosity[ids[key]]["mean"] == pytest.approx(mean)
        latency = {s["app_id"]: s["points"] for s in charts["latency"]}
        assert {len(points) for points in latency.values()} == {1}
        one = get(client, "/api/charts", app="team:qa")
        assert [v["app_id"] for v in one["versions"]] == ["team:qa"]
        both = get(client, "/api/charts", app="team")  # a name: all its versions
        assert sorted(v["app_id"] for v in both["versions"]) == sorted(
            [ids[("team", "qa")], ids[("team", "qa:v1")]])

        for key, app_id in ids.items():
            page = get(client, "/api/records", app=app_id)
            assert page["total"] == 1
            assert [(r["app_name"], r["app_version"]) for r in page["records"]] == [key]
            assert page["records"][0]["app_id"] == app_id
        named = get(client, "/api/records", app="team")
        assert sorted(r["app_version"] for r in named["records"]) == ["qa", "qa:v1"]


# ---------------------------------------------------------------------- safety
def test_only_reads_are_served(client: TestClient, filled: Session) -> None:
    before = filled.store.count_results()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/api/records", "/api/leaderboard", "/"):
            assert client.request(method, path).status_code == 405
    assert filled.store.count_results() == before


def test_every_answer_carries_a_strict_content_security_policy(client: TestClient) -> None:
    for path in ("/", "/api/info", "/static/app.js"):
        resp = client.get(path)
        assert resp.status_code == 200
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["server-timing"].startswith("app;dur=")


def test_the_page_ships_everything_it_needs(client: TestClient) -> None:
    page = client.get("/").text
    assert "http://" not in page
    assert "https://" not in page
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page
        body = client.get("/" + asset).text
        assert "https://" not in body.replace("http://www.w3.org/2000/svg", "")
    assert "innerHTML" not in client.get("/static/app.js").text.split("\n", 5)[-1]


def test_requests_for_other_hosts_are_refused_without_a_token(filled: Session) -> None:
    with TestClient(create_app(filled), base_url="http://attacker.example") as c:
        assert c.get("/api/records").status_code == 421
    with TestClient(create_app(filled), base_url="http://localhost:9") as c:
        assert c.get("/api/records").status_code == 200


def test_a_token_guards_every_route(filled: Session) -> None:
    app = create_app(filled, token=TOKEN)
    with TestClient(app, base_url="http://10.1.2.3:8765") as c:
        assert c.get("/api/records").status_code == 401
        assert c.get("/api/records", headers={"Authorization": "Bearer wrong"}
                     ).status_code == 401
        assert c.get("/").status_code == 401
        assert "?token=" in c.get("/").text
        ok = c.get("/api/records", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert c.get("/api/info", params={"token": TOKEN}).status_code == 200
        opened = c.get("/", params={"token": TOKEN}, follow_redirects=False)
        assert opened.status_code == 303
        assert "token" not in opened.headers["location"]
        cookie = opened.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        c.cookies.set("scrutiny_token_8765", TOKEN)
        assert c.get("/api/leaderboard").status_code == 200
        assert c.get("/").status_code == 200


def test_the_database_password_never_reaches_the_page(tmp_path: Path) -> None:
    store = MemoryStore()
    store.url = "postgresql+psycopg://scrutiny:s3cr3t-pw@db.internal:5432/scrutiny"
    session = Session(store=store)
    try:
        session.ingest(rag_record(1), [QUALITY])
        assert session.wait_for_feedback(10)
        with TestClient(create_app(session), base_url="http://127.0.0.1") as c:
            info = get(c, "/api/info")
            assert "s3cr3t-pw" not in info["database"]
            assert info["database"].startswith("postgresql+psycopg://scrutiny:***@db.internal")
            for path in ("/", "/api/apps", "/api/leaderboard", "/api/records", "/api/charts"):
                assert "s3cr3t-pw" not in c.get(path).text
    finally:
        session.close()


def test_an_in_memory_session_is_served_too() -> None:
    session = Session("memory://")
    try:
        fill(session)
        with TestClient(create_app(session), base_url="http://127.0.0.1") as c:
            assert get(c, "/api/records")["total"] == 8
            assert len(get(c, "/api/leaderboard")["rows"]) == 3
            assert get(c, "/api/info")["database"] == "memory://"
    finally:
        session.close()
