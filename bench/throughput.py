"""Feedback throughput: can 64 concurrent slow feedbacks actually run 64 at a time?

200 recorded calls of the 3-step chain, each with 3 feedbacks that wait 50 ms — variant
`async` (``await asyncio.sleep``) and variant `sync` (``time.sleep`` in the thread pool),
each in its own session (max_concurrency=64) and SQLite file. The wall time runs from the
first call until `session.wait_for_feedback` returns True (every end state stored).
effective_concurrency = (600 x 0.05 s) / wall; ratio = effective_concurrency / 64.
Finally a fresh Session on the same file must see all 600 results `done`.

The figure that counts is the median of REPEATS warm runs (LangChain, SQLAlchemy's statement
cache and all 64 threads of the sync pool started beforehand, as in a running app); one cold
run per variant (fresh session, a single warm-up call) is reported beside it. One more,
untimed, run per variant reports how late the feedbacks' 50 ms waits end (the thread getting
the interpreter lock back included) while the app's calls run and after they are over
(`diagnostic_wait_late_ms`) and, for the sync variant, how many waits each pool thread ran
(`diagnostic_calls_per_thread`: 9 or 10 when the 64 slots work side by side from the start;
a spread such as 7 to 11 means some slots sat granted while their call waited for a
thread); `calls_s` is how long the app's 200 calls took. Each timed run
starts from a collected heap (see `_common.FullCollections`); `full_gc_in_timed_runs` counts
the full garbage-collector passes that still fell inside them.

`schedule_bound_ratio` is the best ratio the run's own calls allow (its feedbacks started
the moment each call returned, on the first free slot, taking exactly 50 ms: no dispatch,
storage or interpreter lock — see `schedule_bound`), and `of_schedule_bound` how much of it
Scrutiny reached.

`plain_python` is the baseline measured in the same run: the same 200 calls of the chain, not
recorded, each handing its 3 waits to a plain asyncio loop thread (``asyncio.Semaphore(64)``)
or to a ``ThreadPoolExecutor(max_workers=64)`` — what an app gets by running its checks
itself, with nothing stored. `vs_plain_python` = Scrutiny's ratio / that one: on the same
interpreter lock, beside the same CPU-bound app, is Scrutiny's dispatch better or worse than
the obvious hand-written one?
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import FullCollections, emit, make_chain, percentile, r, temp_db

from scrutiny import Feedback, Session
from scrutiny.integrations.langchain import ChainRecorder

CALLS = int(os.environ.get("BENCH_CALLS", "200"))
FEEDBACKS = 3
DELAY = 0.05
CONCURRENCY = 64
TARGET = 0.9
# Enough warm-up calls for max_concurrency feedbacks at once, so the thread pool of the sync
# variant has all its threads (a long-running app pays their start-up once).
WARMUP_CALLS = -(-CONCURRENCY // FEEDBACKS) + 1
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


# (started at, seconds late, thread) of every wait of the feedbacks, for the diagnostic run
LATE: list[tuple[float, float, int]] = []


def async_feedbacks() -> list[Feedback]:
    async def slow_async(text: str) -> float:
        began = time.perf_counter()
        await asyncio.sleep(DELAY)
        LATE.append((began, time.perf_counter() - began - DELAY, threading.get_ident()))
        return 1.0

    return [Feedback(slow_async, name=f"async_{i}").on_output() for i in range(FEEDBACKS)]


def sync_feedbacks() -> list[Feedback]:
    def slow_sync(text: str) -> float:
        began = time.perf_counter()
        time.sleep(DELAY)  # (returns once its thread has the interpreter lock back)
        LATE.append((began, time.perf_counter() - began - DELAY, threading.get_ident()))
        return 1.0

    return [Feedback(slow_sync, name=f"sync_{i}").on_output() for i in range(FEEDBACKS)]


def run_once(make_feedbacks: Callable[[], list[Feedback]], warmup_calls: int,
             watch_lag: bool = False) -> dict[str, Any]:
    """One timed run on a fresh session and SQLite file.

    With `watch_lag` (a diagnostic run, not one of the timed ones) it reports how late the
    feedbacks' 50 ms waits end, while the app's calls run and after they are over.
    """
    chain = make_chain()
    question = {"question": "What is the capital of France?"}
    feedbacks = make_feedbacks()
    names = [fb.name for fb in feedbacks]
    with temp_db() as url:
        session = Session(url, max_concurrency=CONCURRENCY)
        recorder = ChainRecorder(chain, app_name="bench", app_version="v1",
                                 feedbacks=feedbacks, session=session)
        # Warm up LangChain, the session's threads and SQLAlchemy's statement cache (record,
        # result and update statements) with the same feedbacks under another app name;
        # only app "bench" is counted below.
        warm = ChainRecorder(chain, app_name="warmup", app_version="v1",
                             feedbacks=make_feedbacks(), session=session)
        for _ in range(warmup_calls):
            with warm:
                chain.invoke(question)
        session.wait_for_feedback(30)
        LATE.clear()
        with FullCollections() as full_gc:
            t0 = time.perf_counter()
            returned: list[float] = []  # when each call returned (its records arrive then)
            for _ in range(CALLS):
                with recorder:
                    chain.invoke(question)
                returned.append(time.perf_counter() - t0)
            t_calls = time.perf_counter() - t0
            finished = session.wait_for_feedback(120)
            wall = time.perf_counter() - t0
        session.close()

        reader = Session(url)  # a fresh session on the same file
        try:
            df, _cols = reader.get_records_and_feedback(app_ids=["bench"])
        finally:
            reader.close()
    done = int(sum((df[f"{n} status"] == "done").sum() for n in names))
    out: dict[str, Any] = {"wall": wall, "calls": t_calls, "finished": finished,
                           "bound": schedule_bound(returned),
                           "records": len(df), "done": done, "full_gc": full_gc.count}
    if watch_lag:
        during = [lag * 1e3 for at, lag, _ in LATE if at - t0 < t_calls]
        after = [lag * 1e3 for at, lag, _ in LATE if at - t0 >= t_calls]
        out["wait_late_ms"] = {
            "during_calls_p50": r(percentile(during, 50), 2),
            "during_calls_p90": r(percentile(during, 90), 2),
            "after_calls_p50": r(percentile(after, 50), 2),
            "after_calls_p90": r(percentile(after, 90), 2)}
        per_thread = collections.Counter(thread for _, _, thread in LATE)
        out["calls_per_thread"] = sorted(collections.Counter(per_thread.values()).items())
    return out


def schedule_bound(returned: list[float]) -> float:
    """The least wall time these calls allow: their feedbacks started the moment each call
    returned, on the first free of CONCURRENCY slots, each taking exactly DELAY — no
    dispatch, no storage, no waiting for the interpreter lock. (Some slot must run
    ceil(600 / 64) = 10 waits in a row, after the calls that feed it.)"""
    free = [0.0] * CONCURRENCY  # a heap of the times each slot is free again
    end = 0.0
    for at in returned:
        for _ in range(FEEDBACKS):
            start = max(at, heapq.heappop(free))
            heapq.heappush(free, start + DELAY)
            end = max(end, start + DELAY)
    return end


def run_plain(kind: str) -> float:
    """The baseline: the same calls, unrecorded, their waits run by plain Python (no
    storage, no statuses); returns the wall time from the first call until the last wait."""
    chain = make_chain()
    question = {"question": "What is the capital of France?"}
    total = CALLS * FEEDBACKS
    left = [total]
    count_lock = threading.Lock()
    finished = threading.Event()

    def one_done() -> None:
        with count_lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY)

    async def make_gate() -> asyncio.Semaphore:
        return asyncio.Semaphore(CONCURRENCY)

    gate = asyncio.run_coroutine_threadsafe(make_gate(), loop).result()

    async def wait_async() -> None:
        async with gate:
            await asyncio.sleep(DELAY)
        one_done()

    tasks: set[asyncio.Task[None]] = set()  # (the loop keeps weak references only)

    def start_async() -> None:
        for _ in range(FEEDBACKS):
            task = loop.create_task(wait_async())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def wait_sync() -> None:
        time.sleep(DELAY)
        one_done()

    try:
        # as warm as Scrutiny's runs: every pool thread started, the chain called before
        list(pool.map(time.sleep, [0.01] * CONCURRENCY))
        for _ in range(WARMUP_CALLS):
            chain.invoke(question)
        with FullCollections():
            t0 = time.perf_counter()
            for _ in range(CALLS):
                chain.invoke(question)
                if kind == "async":
                    loop.call_soon_threadsafe(start_async)
                else:
                    for _ in range(FEEDBACKS):
                        pool.submit(wait_sync)
            if not finished.wait(120):
                raise RuntimeError("the plain baseline did not finish")
            return time.perf_counter() - t0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()
        pool.shutdown()


def ratio_of(wall: float) -> float:
    return CALLS * FEEDBACKS * DELAY / wall / CONCURRENCY


def run_variant(make_feedbacks: Callable[[], list[Feedback]], kind: str) -> dict[str, Any]:
    # Cold: a fresh session whose only warm-up is one call (its sync pool has 3 threads).
    cold = run_once(make_feedbacks, warmup_calls=1)
    # Warm (the figure that counts): the pool already has its threads, as in a running app.
    # The machine is shared, so the median of a few runs is reported.
    # The plain-Python baseline interleaved with them (same machine, same moment).
    runs, plain = [], []
    for _ in range(REPEATS):
        runs.append(run_once(make_feedbacks, warmup_calls=WARMUP_CALLS))
        plain.append(run_plain(kind))
    runs.sort(key=lambda x: x["wall"])
    plain.sort()
    plain_ratio = ratio_of(plain[len(plain) // 2])
    med = runs[len(runs) // 2]
    expected = CALLS * FEEDBACKS
    ratio = ratio_of(med["wall"])
    all_done = all(x["done"] == expected and x["finished"] for x in [*runs, cold])
    # Why the ratio is what it is: how late the feedbacks' waits end while the app's
    # CPU-bound calls hold the interpreter lock, and once they are over.
    diagnostic = run_once(make_feedbacks, warmup_calls=WARMUP_CALLS, watch_lag=True)
    return {
        "wall_s": r(med["wall"]),
        "calls_s": r(med["calls"]),
        "effective_concurrency": r(expected * DELAY / med["wall"], 1),
        "ratio": r(ratio),
        "pass": bool(ratio >= TARGET and all_done),
        "walls_s": [r(x["wall"]) for x in runs],
        "plain_python_ratio": r(plain_ratio),
        "plain_python_walls_s": [r(w) for w in plain],
        "vs_plain_python": r(ratio / plain_ratio),
        "schedule_bound_ratio": r(ratio_of(med["bound"])),
        "of_schedule_bound": r(ratio / ratio_of(med["bound"])),
        "cold_wall_s": r(cold["wall"]),
        "cold_ratio": r(ratio_of(cold["wall"])),
        "results_done": med["done"],
        "results_expected": expected,
        "all_runs_all_done": all_done,
        "full_gc_in_timed_runs": [x["full_gc"] for x in runs],
        "diagnostic_wait_late_ms": diagnostic["wait_late_ms"],
        **({"diagnostic_calls_per_thread": {str(k): v for k, v in
                                            diagnostic["calls_per_thread"]}}
           if kind == "sync" else {}),
    }


def main() -> None:
    variants = {"async": run_variant(async_feedbacks, "async"),
                "sync": run_variant(sync_feedbacks, "sync")}
    emit({
        "bench": "throughput",
        "calls": CALLS,
        "feedbacks_per_call": FEEDBACKS,
        "delay_s": DELAY,
        "max_concurrency": CONCURRENCY,
        "ideal_wall_s": r(CALLS * FEEDBACKS * DELAY / CONCURRENCY),
        "target_ratio": TARGET,
        **variants,
    })


if __name__ == "__main__":
    main()
