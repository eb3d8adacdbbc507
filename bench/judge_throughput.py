"""Judge throughput: do 500 LLM-judge calls that each take 50 ms really run 64 at a time?

The judge model is LangChain's `FakeListChatModel` with ``sleep=0.05``. Its plain ``_call``
sleeps with `time.sleep` (LangChain runs it in a small thread pool, which would cap the
concurrency), but its async streaming path ``_astream`` awaits ``asyncio.sleep(sleep)``
once per chunk; ``.bind(stream=True)`` makes ``ainvoke`` take that path. Its answer is the
single character ``"8"`` (a bare score on the judge's 0-10 scale), so every call answers
after exactly one 50 ms await — a model that "answers after 50 ms" without holding a thread.

Variant `rag_triad`: 100 records with 3 retrieved contexts each, judged with
``rag_triad(judge)``: 3 context-relevance calls, 1 groundedness call and 1 answer-relevance
call per record = 500 judge calls (300 stored results). Variant `per_record`: 500 records,
one answer-relevance call each (500 results). Both go through the real path: a `Session`
on SQLite with ``max_concurrency=64`` and ``session.ingest(record, feedbacks)``.

The wall time runs from the first ingest until `session.wait_for_feedback` returns True
(every end state stored). effective_concurrency = (500 x 0.05 s) / wall; ratio =
effective_concurrency / 64; target >= 0.9. Variant `baseline_sleep` runs the same 500
evaluations with a feedback that only awaits 50 ms: the ceiling the session itself allows
on this machine, so the judge's own overhead is the difference between the two; and
`direct_no_session` awaits the judge's methods under ``asyncio.gather`` with a semaphore of
64, without a session: the judge and LangChain alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, r, temp_db

from scrutiny import Feedback, Record, Session
from scrutiny.providers import LLMJudge, rag_triad

CALLS = 500
DELAY = 0.05
CONCURRENCY = 64
TARGET = 0.9
CONTEXTS = ["Paris is the capital of France.", "France is in Western Europe.",
            "The Eiffel Tower is in Paris."]


def make_judge() -> LLMJudge:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    model = FakeListChatModel(responses=["8"], sleep=DELAY).bind(stream=True)
    return LLMJudge(model)


def make_record(i: int, app: str) -> Record:
    now = time.time()
    return Record(app_name=app, app_version="v1", input=f"What is the capital of France? #{i}",
                  output="Paris is the capital of France.", contexts=list(CONTEXTS),
                  start_time=now, end_time=now)


async def sleep_only(question: str, answer: str) -> float:
    """The core's ceiling: a feedback that only waits 50 ms (no model, no parsing)."""
    await asyncio.sleep(DELAY)
    return 0.8


def run_variant(variant: str) -> dict[str, Any]:
    judge = make_judge()
    if variant == "rag_triad":
        feedbacks: list[Feedback] = list(rag_triad(judge))
        records, calls_per_record = CALLS // 5, 5
    elif variant == "baseline_sleep":
        feedbacks = [Feedback(sleep_only).on_input_output()]
        records, calls_per_record = CALLS, 1
    else:
        feedbacks = [Feedback(judge.answer_relevance).on_input_output()]
        records, calls_per_record = CALLS, 1
    with temp_db() as url:
        session = Session(url, max_concurrency=CONCURRENCY)
        # Warm up LangChain, the session's threads and SQLAlchemy's statement cache under
        # another app name; only app "bench" is counted below.
        for i in range(8):
            session.ingest(make_record(i, "warmup"), feedbacks)
        session.wait_for_feedback(60)

        c0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(records):
            session.ingest(make_record(i, "bench"), feedbacks)
        finished = session.wait_for_feedback(120)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        session.close()

        reader = Session(url)
        try:
            df, _cols = reader.get_records_and_feedback(app_ids=["bench"])
        finally:
            reader.close()
    names = [fb.name for fb in feedbacks]
    done = int(sum((df[f"{n} status"] == "done").sum() for n in names))
    calls = records * calls_per_record
    effective = calls * DELAY / wall
    ratio = effective / CONCURRENCY
    return {
        "records": len(df),
        "judge_calls": calls,
        "results_done": done,
        "results_expected": records * len(feedbacks),
        "wall_s": r(wall),
        "process_cpu_s": r(cpu),
        "ideal_wall_s": r(calls * DELAY / CONCURRENCY),
        "effective_concurrency": r(effective, 1),
        "ratio": r(ratio),
        "pass": bool(finished and ratio >= TARGET and done == records * len(feedbacks)),
    }


def run_direct() -> dict[str, Any]:
    """The judge alone: 500 answer-relevance calls under asyncio.gather, 64 at a time."""
    judge = make_judge()

    async def main() -> float:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> float:
            async with gate:
                score, _ = await judge.answer_relevance(f"Capital of France? #{i}", "Paris.")
                return score

        await asyncio.gather(*(one(i) for i in range(16)))  # warm up
        t0 = time.perf_counter()
        scores = await asyncio.gather(*(one(i) for i in range(CALLS)))
        wall = time.perf_counter() - t0
        assert all(s == 0.8 for s in scores)
        return wall

    wall = asyncio.run(main())
    ratio = CALLS * DELAY / wall / CONCURRENCY
    return {"judge_calls": CALLS, "wall_s": r(wall),
            "effective_concurrency": r(CALLS * DELAY / wall, 1), "ratio": r(ratio),
            "pass": ratio >= TARGET}


def main() -> None:
    variants = {name: run_variant(name)
                for name in ("rag_triad", "per_record", "baseline_sleep")}
    variants["direct_no_session"] = run_direct()
    emit({
        "bench": "judge_throughput",
        "judge_calls": CALLS,
        "delay_s": DELAY,
        "max_concurrency": CONCURRENCY,
        "target_ratio": TARGET,
        **variants,
    })


if __name__ == "__main__":
    main()
