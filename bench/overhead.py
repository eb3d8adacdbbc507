"""Per-call overhead of recording a 3-step LCEL chain.

Three variants interleaved round-robin in one run (so drift, frequency scaling and GC hit
them alike): `bare` invoke; `noop` with a do-nothing BaseCallbackHandler in the config;
`recorded` inside ``with recorder:`` with 3 trivial sync feedbacks (default mode, so the
evaluation happens on background threads that compete with the app for the CPU — which is
measured, not hidden). The timed region of `recorded` covers entering and leaving the block
as well as the invoke; no feedback is awaited inside it. After the loop every feedback is
awaited (session.wait_for_feedback) and the stored statuses are counted.

`background_cpu_us_per_recorded_call` is what Scrutiny's own threads spent per recorded call
(CPU time from the timed loop's start until every result was stored, by thread: storing,
evaluating, plain feedbacks' pool, callbacks): the part of recording's cost that is not on
the app's thread, for sizing a deployment. Linux only (per-thread CPU clocks).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, make_chain, median, percentile, r, status_counts, temp_db
from langchain_core.callbacks import BaseCallbackHandler

from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import ChainRecorder

ITERATIONS = int(os.environ.get("BENCH_ITERATIONS", "2000"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "200"))
TARGET = 1.25


class NoopHandler(BaseCallbackHandler):
    """Receives every event and does nothing."""


def length(text: str) -> float:
    return float(len(text))


def nonempty(text: str) -> float:
    return 1.0 if text else 0.0


def has_digit(text: str) -> float:
    return float(any(c.isdigit() for c in text))


_THREAD_GROUPS = (("scrutiny-writer", "storage"), ("scrutiny-eval-sync", "plain_feedback_pool"),
                  ("scrutiny-eval", "evaluation_loop"), ("scrutiny-callbacks", "callbacks"))


def _scrutiny_threads_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each running Scrutiny thread, by ident, with its group."""
    out: dict[int, tuple[str, float]] = {}
    for thread in threading.enumerate():
        group = next((g for prefix, g in _THREAD_GROUPS if thread.name.startswith(prefix)),
                     "other" if thread.name.startswith("scrutiny") else None)
        if group is None or thread.ident is None:
            continue
        try:
            out[thread.ident] = (group, time.clock_gettime(
                time.pthread_getcpuclockid(thread.ident)))
        except (AttributeError, OSError):  # (not Linux, or it ended meanwhile)
            continue
    return out


def _cpu_since(before: dict[int, tuple[str, float]], calls: int) -> dict[str, float]:
    """Microseconds per call each group of threads spent since `before` (threads started
    meanwhile count from zero)."""
    spent: dict[str, float] = {}
    for ident, (group, now) in _scrutiny_threads_cpu().items():
        base = before.get(ident, (group, 0.0))[1]
        spent[group] = spent.get(group, 0.0) + now - base
    return {g: r(v / calls * 1e6, 1) for g, v in sorted(spent.items())}


def main() -> None:
    chain = make_chain()
    noop = NoopHandler()
    noop_config = {"callbacks": [noop]}
    question = {"question": "What is the capital of France?"}
    feedbacks = [Feedback(fn, name=fn.__name__).on_output()
                 for fn in (length, nonempty, has_digit)]

    with temp_db() as url:
        session = Session(url, max_concurrency=64)
        recorder = ChainRecorder(chain, app_name="bench", app_version="v1",
                                 feedbacks=feedbacks, session=session)

        def bare() -> None:
            chain.invoke(question)

        def with_noop() -> None:
            chain.invoke(question, config=noop_config)

        def recorded() -> None:
            with recorder:
                chain.invoke(question)

        variants = {"bare": bare, "noop": with_noop, "recorded": recorded}
        samples: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}

        for _ in range(WARMUP):
            for fn in variants.values():
                fn()
        session.wait_for_feedback(60)  # start timing with the warm-up backlog drained

        clock, thread_clock = time.perf_counter, time.thread_time
        gc.collect()
        threads_before = _scrutiny_threads_cpu()
        wall0 = clock()
        for i in range(ITERATIONS):
            # rotate the order so no variant always runs right after another one
            order = list(variants.items())
            shift = i % len(order)
            for name, fn in order[shift:] + order[:shift]:
                c0 = thread_clock()
                t0 = clock()
                fn()
                t1 = clock()
                cpu[name].append(thread_clock() - c0)
                samples[name].append(t1 - t0)
        loop_wall = clock() - wall0

        t_wait = clock()
        all_done = session.wait_for_feedback(120)
        drain_s = clock() - t_wait
        background = _cpu_since(threads_before, ITERATIONS)
        session.close()
        counts = status_counts(url)

    expected = (WARMUP + ITERATIONS) * len(feedbacks)
    med = {k: median(v) * 1e6 for k, v in samples.items()}
    p90 = {k: percentile(v, 90) * 1e6 for k, v in samples.items()}
    # CPU time of the calling thread only: what recording costs the app's own thread,
    # without the time it waits for the GIL while Scrutiny's threads (or other processes)
    # run. A diagnostic beside the wall-clock figures, not a replacement for them.
    med_cpu = {k: median(v) * 1e6 for k, v in cpu.items()}
    recorded_ratio = med["recorded"] / med["bare"]
    emit({
        "bench": "overhead",
        "iterations": ITERATIONS,
        "bare_us": r(med["bare"], 1),
        "noop_us": r(med["noop"], 1),
        "recorded_us": r(med["recorded"], 1),
        "noop_ratio": r(med["noop"] / med["bare"]),
        "recorded_ratio": r(recorded_ratio),
        "p90_us": {k: r(v, 1) for k, v in p90.items()},
        "thread_cpu_us": {k: r(v, 1) for k, v in med_cpu.items()},
        "thread_cpu_recorded_ratio": r(med_cpu["recorded"] / med_cpu["bare"]),
        "background_cpu_us_per_recorded_call": background,
        "target_recorded_ratio": TARGET,
        "pass": recorded_ratio <= TARGET,
        "loop_wall_s": r(loop_wall, 2),
        "drain_after_loop_s": r(drain_s, 3),
        "feedback_all_finished": all_done,
        "results_expected": expected,
        "results_done": counts.get("done", 0),
        "results_by_status": counts,
    })


if __name__ == "__main__":
    main()
