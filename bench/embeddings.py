"""Embedding throughput: 200 records x answer relevance, batched vs one at a time.

Each of 200 records (a question and an answer of 8 to 40 words) is evaluated with
``Embeddings().answer_relevance`` (the packaged all-MiniLM-L6-v2, on CPU) through a
`Session` on SQLite with ``max_concurrency=64``; the wall time runs from the first ingest
until `session.wait_for_feedback` returns True. `batched` is the default: evaluations
running at once share the model's calls (at most 64 texts a call). `one_at_a_time` is the
same run with ``MAX_BATCH = 1``: one evaluation per model call, as before the change.
The two alternate (which goes first alternates too), REPEATS times (5; ``BENCH_REPEATS``)
after one unmeasured run of each;
the medians are reported, with `speedup` = one_at_a_time / batched and every repeat's
speedup. `model_calls` counts the model's ``encode`` calls of the last run of each.
`direct_one_call_s` is the floor: the same 400 texts in one sentence-transformers
``encode`` call (batch_size 32, no session). `max_score_difference` is the largest
difference between a record's score in the two modes (batching pads; the model masks it).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FullCollections, emit, median, r, temp_db

from scrutiny import Feedback, Record, Session
from scrutiny.providers import Embeddings, _embeddings
from scrutiny.providers._embeddings import load_packaged_model

RECORDS = 200
CONCURRENCY = 64
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
WORDS = ["the", "city", "museum", "river", "budget", "report", "policy", "team", "market",
         "data", "model", "school", "history", "train", "music", "garden", "science", "law",
         "health", "energy"]


def texts() -> list[tuple[str, str]]:
    out = []
    for i in range(RECORDS):
        topic = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        answer = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 33))
        out.append((f"What does record {i} say about {topic}?", f"Record {i}: {answer}."))
    return out


class Counted:
    """Counts the calls of the model's ``encode``."""

    def __init__(self, model: Any) -> None:
        self.model, self.real, self.calls = model, model.encode, 0

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(texts, **kwargs)


def run(data: list[tuple[str, str]], max_batch: int, counted: Counted
        ) -> tuple[float, list[float], int]:
    _embeddings.MAX_BATCH = max_batch
    counted.calls = 0
    fb = Feedback(Embeddings().answer_relevance).on_input_output()
    with temp_db() as url:
        session = Session(url, max_concurrency=CONCURRENCY)
        try:
            with FullCollections():
                started = time.perf_counter()
                records = []
                for q, a in data:
                    now = time.time()
                    records.append(session.ingest(
                        Record(app_name="bench", app_version="v1", input=q, output=a,
                               start_time=now, end_time=now), [fb]))
                assert session.wait_for_feedback(600)
                wall = time.perf_counter() - started
            scores = [rec.feedback_results[fb].result or 0.0 for rec in records]
        finally:
            session.close()
    return wall, scores, counted.calls


def main() -> None:
    model = load_packaged_model()
    counted = Counted(model)
    model.encode = counted
    data = texts()
    flat = [t for pair in data for t in pair]
    default = _embeddings.MAX_BATCH
    for max_batch in (default, 1):  # warm-up: imports, and torch's first run of each shape
        run(data, max_batch, counted)
    walls: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    scores: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    direct: list[float] = []
    for repeat in range(REPEATS):
        order = [("batched", default), ("one_at_a_time", 1)]
        for mode, max_batch in order if repeat % 2 == 0 else order[::-1]:
            wall, scores[mode], calls[mode] = run(data, max_batch, counted)
            walls[mode].append(wall)
        started = time.perf_counter()
        counted.real(flat, normalize_embeddings=True, show_progress_bar=False)
        direct.append(time.perf_counter() - started)
    _embeddings.MAX_BATCH = default
    batched, alone = median(walls["batched"]), median(walls["one_at_a_time"])
    difference = max(abs(a - b) for a, b in zip(scores["batched"], scores["one_at_a_time"],
                                                strict=True))
    emit({
        "bench": "embeddings", "records": RECORDS, "texts": len(flat),
        "max_concurrency": CONCURRENCY, "max_batch": default, "repeats": REPEATS,
        "batched_s": r(batched), "one_at_a_time_s": r(alone),
        "speedup": r(alone / batched, 2),
        "speedups": [r(a / b, 2) for a, b in zip(walls["one_at_a_time"], walls["batched"],
                                                  strict=True)],
        "direct_one_call_s": r(median(direct)),
        "batched_over_direct": r(batched / median(direct), 2),
        "model_calls": calls,
        "max_score_difference": float(f"{difference:.1e}"),
    })


if __name__ == "__main__":
    main()
