"""Dashboard API latency on a large database: 100,000 records with 3 feedbacks each.

Fills a fresh SQLite file through the storage interface (`session.store.write` with batches
of `InsertRecord` built by the same row helpers the session uses), starts the dashboard on a
free loopback port, and asks the leaderboard and the first records page 20 times each over
HTTP. Server time comes from the `Server-Timing` header the dashboard adds to every API
answer (the time inside the app, from request to the last body byte); the client's wall
time is reported beside it. Targets: median server time <= 300 ms for both.

Environment: BENCH_RECORDS (default 100000), BENCH_REPEAT (default 20).
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, median, r, temp_db

from scrutiny import Feedback, FeedbackResult, FeedbackStatus, Record, Session, Span
from scrutiny.core import _rows
from scrutiny.core.storage import InsertRecord

RECORDS = int(os.environ.get("BENCH_RECORDS", "100000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "20"))
BATCH = 5000
TARGET_MS = 300.0
FILL_BUDGET_S = 120.0
VERSIONS = [("rag", "v1"), ("rag", "v2"), ("rag", "v3"), ("agent", "v1")]


def _noop(output: str) -> float:
    return 1.0


FEEDBACKS = [
    Feedback(_noop, name="relevance").on_output(),
    Feedback(_noop, name="groundedness").on_output(),
    Feedback(_noop, name="verbosity", higher_is_better=False).on_output(),
]


def _record(i: int, rng: random.Random, t0: float) -> Record:
    name, version = VERSIONS[i % len(VERSIONS)]
    start = t0 + i * 0.5
    latency = rng.uniform(0.2, 2.5)
    rid = uuid.uuid4().hex
    root = Span(span_id=rid + "0", parent_id=None, name="RunnableSequence", kind="chain",
                start_time=start, end_time=start + latency,
                inputs={"question": f"question {i}"}, outputs=f"answer {i}")
    retr = Span(span_id=rid + "1", parent_id=root.span_id, name="retriever",
                kind="retriever", start_time=start + 0.01, end_time=start + 0.1 * latency,
                inputs=f"question {i}", outputs=["Paris is the capital of France."])
    llm = Span(span_id=rid + "2", parent_id=root.span_id, name="ChatModel",
               kind="chat_model", start_time=start + 0.12 * latency,
               end_time=start + 0.95 * latency, inputs=[f"question {i}"],
               outputs=f"answer {i}", model="fake-model")
    return Record(app_name=name, app_version=version, input=f"question {i} about France",
                  output=f"The answer to question {i} is Paris.", record_id=rid,
                  start_time=start, end_time=start + latency, spans=[root, retr, llm],
                  contexts=["Paris is the capital of France.",
                            "Berlin is the capital of Germany."])


def _result(record: Record, fb: Feedback, rng: random.Random) -> FeedbackResult:
    roll = rng.random()
    ended = datetime.fromtimestamp(record.end_time + 1, tz=timezone.utc)
    if roll < 0.01:
        return FeedbackResult(record.record_id, fb.name, FeedbackStatus.PENDING,
                              result_id=uuid.uuid4().hex, feedback_id=fb.feedback_id)
    if roll < 0.02:
        return FeedbackResult(record.record_id, fb.name, FeedbackStatus.FAILED,
                              error="judge timed out", attempts=3, ended_at=ended,
                              result_id=uuid.uuid4().hex, feedback_id=fb.feedback_id)
    bias = 0.1 * (hash(record.app_version) % 3)
    return FeedbackResult(record.record_id, fb.name, FeedbackStatus.DONE,
                          result=round(min(1.0, rng.betavariate(4, 2) + bias), 3),
                          explanation="Supported by the context.", attempts=1,
                          started_at=ended - timedelta(seconds=0.5), ended_at=ended,
                          result_id=uuid.uuid4().hex, feedback_id=fb.feedback_id)


def fill(session: Session, n: int) -> float:
    """Write `n` records with 3 results each; returns the seconds it took."""
    rng = random.Random(7)
    t0 = time.time() - n * 0.5
    began = time.perf_counter()
    definitions = [_rows.definition_row(fb) for fb in FEEDBACKS]
    batch: list[InsertRecord] = []
    for i in range(n):
        rec = _record(i, rng, t0)
        batch.append(InsertRecord(
            app=_rows.app_row(rec),
            record=_rows.record_row(rec, max_bytes=1_000_000),
            definitions=definitions if i < len(VERSIONS) else [],
            results=[_rows.result_row(rec, _result(rec, fb, rng)) for fb in FEEDBACKS]))
        if len(batch) == BATCH:
            session.store.write(batch)
            batch = []
    if batch:
        session.store.write(batch)
    return time.perf_counter() - began


def _timed(client: object, path: str) -> tuple[float, float]:
    """(server ms, client ms) of one GET."""
    t0 = time.perf_counter()
    resp = client.get(path)  # type: ignore[attr-defined]
    wall = (time.perf_counter() - t0) * 1000
    resp.raise_for_status()
    match = re.search(r"dur=([0-9.]+)", resp.headers.get("server-timing", ""))
    return (float(match.group(1)) if match else float("nan")), wall


def main() -> None:
    import httpx

    with temp_db() as url:
        session = Session(url)
        fill_s = fill(session, RECORDS)
        handle = session.run_dashboard(port=0)
        out: dict[str, object] = {"benchmark": "dashboard", "records": RECORDS,
                                  "feedbacks_per_record": len(FEEDBACKS),
                                  "fill_s": r(fill_s, 1)}
        paths = {"leaderboard": "/api/leaderboard", "records_page": "/api/records?limit=50",
                 "record": None, "charts": "/api/charts?feedback=relevance",
                 "search": "/api/records?limit=50&q=question%2099999"}
        try:
            with httpx.Client(base_url=handle.url.split("?")[0], timeout=60) as client:
                first = client.get("/api/records?limit=1").json()["records"][0]
                paths["record"] = f"/api/records/{first['record_id']}"
                for label, path in paths.items():
                    _timed(client, str(path))  # warm up
                    runs = [_timed(client, str(path)) for _ in range(REPEAT)]
                    out[f"{label}_server_ms_p50"] = r(median([s for s, _ in runs]), 1)
                    out[f"{label}_client_ms_p50"] = r(median([w for _, w in runs]), 1)
        finally:
            handle.stop()
            session.close()
        out["target_ms"] = TARGET_MS
        out["ok"] = bool(
            fill_s < FILL_BUDGET_S
            and float(out["leaderboard_server_ms_p50"]) <= TARGET_MS  # type: ignore[arg-type]
            and float(out["records_page_server_ms_p50"]) <= TARGET_MS)  # type: ignore[arg-type]
        emit(out)


if __name__ == "__main__":
    main()
