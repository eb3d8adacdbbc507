"""Visibility latency: how soon another reader of the database sees a feedback result.

After a recorded call with one 0 ms feedback returns (the `with recorder:` block has been
left), a separate Session on the same SQLite file polls its store
(`store.record(record_id)`, one indexed read per poll, 0.5 ms apart) until the result row
is `done`. p50 / p99 over 100 calls; each call starts only after the previous one is seen.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, make_chain, percentile, r, temp_db

from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import ChainRecorder

CALLS = int(os.environ.get("BENCH_CALLS", "100"))
WARMUP = 10
POLL_SLEEP = 0.0005
GIVE_UP_S = 5.0
TARGET_P50_MS = 20.0
TARGET_P99_MS = 100.0


def instant(text: str) -> float:
    return 1.0


def main() -> None:
    chain = make_chain()
    question = {"question": "What is the capital of France?"}
    feedback = Feedback(instant, name="instant").on_output()
    latencies: list[float] = []
    polls: list[int] = []
    timeouts = 0
    with temp_db() as url:
        session = Session(url, max_concurrency=64)
        reader = Session(url)  # a second session on the same file: only its store is used
        recorder = ChainRecorder(chain, app_name="bench", app_version="v1",
                                 feedbacks=[feedback], session=session)
        clock = time.perf_counter
        for i in range(WARMUP + CALLS):
            with recorder as recording:
                chain.invoke(question)
            t0 = clock()
            record_id = recording.get().record_id
            n = 0
            while True:
                n += 1
                _row, results = reader.store.record(record_id)
                if results and all(res["status"] == "done" for res in results):
                    seen = clock() - t0
                    break
                if clock() - t0 > GIVE_UP_S:
                    seen = float("nan")
                    break
                time.sleep(POLL_SLEEP)
            if i >= WARMUP:
                if seen != seen:  # NaN: never seen
                    timeouts += 1
                else:
                    latencies.append(seen)
                polls.append(n)
        session.wait_for_feedback(30)
        session.close()
        reader.close()

    p50 = percentile(latencies, 50) * 1e3
    p99 = percentile(latencies, 99) * 1e3
    emit({
        "bench": "visibility",
        "calls": CALLS,
        "p50_ms": r(p50, 2),
        "p90_ms": r(percentile(latencies, 90) * 1e3, 2),
        "p99_ms": r(p99, 2),
        "max_ms": r(max(latencies) * 1e3, 2) if latencies else None,
        "min_ms": r(min(latencies) * 1e3, 2) if latencies else None,
        "median_polls": sorted(polls)[len(polls) // 2] if polls else 0,
        "never_seen": timeouts,
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
        "pass": timeouts == 0 and p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS,
    })


if __name__ == "__main__":
    main()
