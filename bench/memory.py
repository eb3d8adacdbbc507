"""Memory of a long-running recorded app: does the process stay the same size?

The 3-step chain is called CALLS times bare, then CALLS times recorded (inside
``with recorder:``, a sync and an async feedback on every record, default mode, SQLite).
The resident set size (VmRSS) is read after WARM calls of each phase and at its end, each
time after every feedback is stored and a full garbage collection. `growth_mb_per_10k` is
how much it grew per 10,000 calls after the warm-up; the bare phase is the baseline (the
interpreter's and LangChain's own drift), and `recorded_minus_bare_mb_per_10k` is what
recording adds: about 0 when records, spans and results are freed once stored.
`session_step_mb` is the one-time step between the phases (the session's threads,
connections and caches, and the handler's `keep_records` latest records).
"""

from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, make_chain, r, temp_db

from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import ChainRecorder

CALLS = int(os.environ.get("BENCH_MEMORY_CALLS", "12000"))
WARM = 2000


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def length(text: str) -> float:
    return float(len(text))


async def words(text: str) -> float:
    return float(len(text.split()))


def main() -> None:
    chain = make_chain()
    question = {"question": "What is the capital of France?"}
    feedbacks = [Feedback(length).on_output(), Feedback(words).on_output()]
    with temp_db() as url:
        session = Session(url, max_concurrency=64)
        recorder = ChainRecorder(chain, app_name="memory", feedbacks=feedbacks,
                                 session=session)

        def bare() -> None:
            chain.invoke(question)

        def recorded() -> None:
            with recorder:
                chain.invoke(question)

        def settled() -> float:
            session.wait_for_feedback(120)
            gc.collect()
            return rss_mb()

        phases: dict[str, tuple[float, float]] = {}
        for name, call in (("bare", bare), ("recorded", recorded)):
            for _ in range(WARM):
                call()
            start = settled()
            for _ in range(CALLS - WARM):
                call()
            phases[name] = (start, settled())
        stats = session.stats()
        session.close()

    per_10k = {name: (end - start) / (CALLS - WARM) * 10_000 + 0.0  # (+ 0.0: no "-0.0")
               for name, (start, end) in phases.items()}
    emit({
        "bench": "memory",
        "calls_per_phase": CALLS,
        "rss_mb": {name: [r(start, 1), r(end, 1)] for name, (start, end) in phases.items()},
        "growth_mb_per_10k": {name: r(v, 2) for name, v in per_10k.items()},
        "recorded_minus_bare_mb_per_10k": r(per_10k["recorded"] - per_10k["bare"] + 0.0, 2),
        # once, not per call: the session's threads and connections, the warm-up's records
        "session_step_mb": r(phases["recorded"][0] - phases["bare"][1], 1),
        "dropped_writes": stats["dropped_writes"],
        "unfinished_feedback": stats["unfinished_feedback"],
    })


if __name__ == "__main__":
    main()
