"""Per-query overhead of recording a LlamaIndex query engine.

A `VectorStoreIndex` over 20 documents with `MockEmbedding` and `MockLLM` (both offline).
Two variants, interleaved with alternating order (so drift, frequency scaling and GC hit
them alike): `bare` query; `recorded` inside ``with recorder:`` with 3 trivial sync
feedbacks (one on the retrieved contexts) in the default mode. The timed region of
`recorded` covers entering and leaving the block as well as the query; no feedback is
awaited inside it.

Two phases of `ITERATIONS` pairs each:
- `ratio` (the target): after each recorded call the session is drained *outside* the timed
  regions, so every timed call starts from an idle process; the background work it causes
  (storing the record, evaluating and storing 3 results) is reported on its own as
  `background_cpu_ms_per_record`.
- `ratio_contended`: no draining; evaluation and storage run on background threads while
  the next calls are timed, and slow bare and recorded calls alike through the GIL.
`cpu_ratio` compares the CPU time of the application's thread alone (phase 1): it does not
move with the load of the machine. At the end every feedback is awaited and the stored
statuses are counted.
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, median, percentile, r, status_counts, temp_db
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM

from scrutiny import Feedback, Select, Session
from scrutiny.integrations.llama_index import LlamaIndexRecorder

ITERATIONS = int(os.environ.get("BENCH_ITERATIONS", "500"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "50"))
TARGET = 1.15
TOPICS = ("rain", "sun", "wind", "snow", "fog")


def length(text: str) -> float:
    return float(len(text))


def nonempty(text: str) -> float:
    return 1.0 if text else 0.0


def mentions_topic(context: str) -> float:
    return float(any(t in context for t in TOPICS))


def main() -> None:
    Settings.llm = MockLLM(max_tokens=32)
    Settings.embed_model = MockEmbedding(embed_dim=8)
    documents = [Document(text=f"Document {i} is about {TOPICS[i % 5]} on day {i}.")
                 for i in range(20)]
    engine = VectorStoreIndex.from_documents(documents).as_query_engine(similarity_top_k=2)
    question = "What is the weather like?"
    feedbacks = [Feedback(length).on_output(), Feedback(nonempty).on_output(),
                 Feedback(mentions_topic).on(Select.contexts)]

    with temp_db() as url:
        session = Session(url, max_concurrency=64)
        recorder = LlamaIndexRecorder(engine, app_name="bench", app_version="v1",
                                      feedbacks=feedbacks, session=session)

        def bare() -> None:
            engine.query(question)

        def recorded() -> None:
            with recorder:
                engine.query(question)

        variants = {"bare": bare, "recorded": recorded}
        for _ in range(WARMUP):
            for fn in variants.values():
                fn()
        session.wait_for_feedback(60)  # start timing with the warm-up backlog drained

        def run(drain: bool) -> tuple[dict[str, list[float]], dict[str, list[float]], float]:
            wall: dict[str, list[float]] = {k: [] for k in variants}
            cpu: dict[str, list[float]] = {k: [] for k in variants}
            background_cpu = 0.0
            gc.collect()
            for i in range(ITERATIONS):
                order = list(variants.items())
                if i % 2:
                    order.reverse()
                for name, fn in order:
                    c0, t0 = time.thread_time(), time.perf_counter()
                    fn()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.thread_time() - c0)
                    if drain and name == "recorded":
                        p0 = time.process_time()
                        session.wait_for_feedback(60)
                        background_cpu += time.process_time() - p0
            return wall, cpu, background_cpu

        wall0 = time.perf_counter()
        samples, cpu, background_cpu = run(drain=True)
        contended, _, _ = run(drain=False)
        loop_wall = time.perf_counter() - wall0

        t_wait = time.perf_counter()
        all_done = session.wait_for_feedback(120)
        drain_s = time.perf_counter() - t_wait
        session.close()
        counts = status_counts(url)

    med = {k: median(v) * 1e3 for k, v in samples.items()}
    p90 = {k: percentile(v, 90) * 1e3 for k, v in samples.items()}
    ratio = med["recorded"] / med["bare"]
    cpu_med = {k: median(v) * 1e3 for k, v in cpu.items()}
    contended_med = {k: median(v) * 1e3 for k, v in contended.items()}
    emit({
        "bench": "llama_index_overhead",
        "iterations": ITERATIONS,
        "documents": len(documents),
        "bare_median_ms": r(med["bare"]),
        "recorded_median_ms": r(med["recorded"]),
        "ratio": r(ratio),
        "cpu_bare_median_ms": r(cpu_med["bare"]),
        "cpu_recorded_median_ms": r(cpu_med["recorded"]),
        "cpu_ratio": r(cpu_med["recorded"] / cpu_med["bare"]),
        "background_cpu_ms_per_record": r(background_cpu / ITERATIONS * 1e3),
        "contended_bare_median_ms": r(contended_med["bare"]),
        "contended_recorded_median_ms": r(contended_med["recorded"]),
        "ratio_contended": r(contended_med["recorded"] / contended_med["bare"]),
        "p90_ms": {k: r(v) for k, v in p90.items()},
        "target_ratio": TARGET,
        "pass": ratio <= TARGET,
        "loop_wall_s": r(loop_wall, 2),
        "drain_after_loop_s": r(drain_s, 3),
        "feedback_all_finished": all_done,
        "results_expected": (WARMUP + 2 * ITERATIONS) * len(feedbacks),
        "results_done": counts.get("done", 0),
        "results_by_status": counts,
    })


if __name__ == "__main__":
    main()
