"""Deferred evaluation on PostgreSQL: throughput with 1, 2 and 4 worker processes, and the
ingest rate (records stored per second) on SQLite and PostgreSQL.

Needs a PostgreSQL URL in $SCRUTINY_BENCH_POSTGRES_URL or $SCRUTINY_TEST_POSTGRES_URL
(`eval "$(.ci/postgres.sh)"` starts a throwaway server); without one, the PostgreSQL figures
are reported as null with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _common import emit, r, temp_db

from scrutiny import Feedback, Record, Session

BENCH = Path(__file__).resolve().parent
N_RESULTS = 1000
PER_WORKER_CONCURRENCY = 16
N_INGEST = 2000


def _record(i: int) -> Record:
    now = time.time()
    return Record(app_name="bench", app_version="v1", input=f"question {i}",
                  output=f"answer {i}", start_time=now, end_time=now)


def ingest_rate(url: str, prefix: str) -> float:
    """Records (each with one pending result) stored per second, through the session."""
    sys.path.insert(0, str(BENCH))
    from bench_feedbacks import wait_50ms

    fb = Feedback(wait_50ms).on_output()
    with Session(url, table_prefix=prefix, feedback_mode="deferred") as s:
        for i in range(50):  # warm-up
            s.ingest(_record(i), [fb])
        s.flush(60)
        start = time.perf_counter()
        for i in range(N_INGEST):
            s.ingest(_record(i), [fb])
        assert s.flush(120)
        return N_INGEST / (time.perf_counter() - start)


def _start_workers(url: str, prefix: str, n: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "SCRUTINY_DATABASE_URL": url}
    return [subprocess.Popen(
        [sys.executable, "-m", "scrutiny.cli", "worker", "--table-prefix", prefix,
         "--import-path", str(BENCH), "--concurrency", str(PER_WORKER_CONCURRENCY),
         "--poll-interval", "0.05", "--log-every", "3600"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        for _ in range(n)]


def deferred_throughput(url: str, workers: int) -> float:
    """Evaluations per second by `workers` processes on N_RESULTS pending results."""
    from bench_feedbacks import wait_50ms

    prefix = f"b{uuid.uuid4().hex[:8]}_"
    fb = Feedback(wait_50ms).on_output()
    app = Session(url, table_prefix=prefix, feedback_mode="deferred")
    procs = _start_workers(url, prefix, workers)
    try:
        time.sleep(3.0)  # let the worker processes import and start polling
        for i in range(N_RESULTS):
            app.ingest(_record(i), [fb])
        assert app.flush(120)
        start = time.perf_counter()
        while app.store.count_results().get("done", 0) < N_RESULTS:
            if time.perf_counter() - start > 300:
                raise RuntimeError("workers did not finish in 300 s")
            time.sleep(0.02)
        return N_RESULTS / (time.perf_counter() - start)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        app.close()


def main() -> None:
    pg_url = os.environ.get("SCRUTINY_BENCH_POSTGRES_URL") or os.environ.get(
        "SCRUTINY_TEST_POSTGRES_URL")
    with temp_db() as sqlite_url:
        sqlite_ingest = ingest_rate(sqlite_url, "scrutiny_")
    payload: dict[str, object] = {
        "benchmark": "deferred",
        "ingest_records_per_s_sqlite": r(sqlite_ingest, 1),
    }
    if not pg_url:
        payload["postgres"] = None
        payload["reason"] = "no PostgreSQL URL (eval \"$(.ci/postgres.sh)\" first)"
        emit(payload)
        return
    pg_ingest = ingest_rate(pg_url, f"i{uuid.uuid4().hex[:8]}_")
    payload["ingest_records_per_s_postgres"] = r(pg_ingest, 1)
    rates = {n: deferred_throughput(pg_url, n) for n in (1, 2, 4)}
    payload.update({
        "feedback_wait_s": 0.05,
        "results": N_RESULTS,
        "per_worker_concurrency": PER_WORKER_CONCURRENCY,
        "evals_per_s_1_worker": r(rates[1], 1),
        "evals_per_s_2_workers": r(rates[2], 1),
        "evals_per_s_4_workers": r(rates[4], 1),
        "scaling_2_vs_1": r(rates[2] / rates[1], 2),
        "scaling_4_vs_1": r(rates[4] / rates[1], 2),
    })
    emit(payload)


if __name__ == "__main__":
    main()
