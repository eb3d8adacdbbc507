"""Judge throughput: do 500 LLM-judge calls that each take 50 ms really run 64 at a time?

The judge model answers ``"8"`` (a bare score on the judge's 0-10 scale) after awaiting 50 ms:
`AnswersAfter`, LangChain's own `FakeListChatModel` with an async ``_agenerate`` that awaits
``asyncio.sleep`` — the shape of every chat model behind an async HTTP client (ChatOpenAI,
ChatAnthropic, ... await their client in ``_agenerate``). `FakeListChatModel` as shipped
cannot stand for such a model: its async path either runs the blocking ``_call`` (which
``time.sleep``s) in a 6-thread executor, or, with ``.bind(stream=True)``, awaits the sleep
per chunk and then runs LangChain's ``generate_from_stream`` in that executor — one thread
hop per call, which is LangChain's cost, not the judge's. That variant is still measured
(`langchain_stream_path`, with its own no-session baseline) so the difference is visible.
`llama_index` runs the same judge over a LlamaIndex `MockLLM` whose ``achat`` awaits 50 ms
(through LlamaIndex's real instrumentation decorator).

Each variant runs REPEATS times (3; ``BENCH_REPEATS``); the run with the median ratio is
reported, with every run's ratio in `ratios`.

Variant `rag_triad`: 100 records with 3 retrieved contexts each, judged with
``rag_triad(judge)``: 3 context-relevance calls, 1 groundedness call and 1 answer-relevance
call per record = 500 judge calls (300 stored results). Variant `per_record`: 500 records,
one answer-relevance call each (500 results). All go through the real path: a `Session`
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

from _common import FullCollections, emit, r, temp_db

from scrutiny import Feedback, Record, Session
from scrutiny.providers import LLMJudge, rag_triad

CALLS = 500
DELAY = 0.05
CONCURRENCY = 64
TARGET = 0.9
CONTEXTS = ["Paris is the capital of France.", "France is in Western Europe.",
            "The Eiffel Tower is in Paris."]


def _answers_after() -> Any:
    import itertools

    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class AnswersAfter(FakeListChatModel):
        """FakeListChatModel whose async path awaits `sleep`, then answers."""

        async def _agenerate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                             **kwargs: Any) -> ChatResult:
            await asyncio.sleep(self.sleep or 0.0)
            text = next(self._answers)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

        @property
        def _answers(self) -> Any:
            cycle = self.__dict__.get("_cycle")
            if cycle is None:
                cycle = self.__dict__["_cycle"] = itertools.cycle(self.responses)
            return cycle

    return AnswersAfter


def _slow_mock_llm() -> Any:
    from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
    from llama_index.core.llms.callbacks import llm_chat_callback
    from llama_index.core.llms.mock import MockLLM

    class SlowMockLLM(MockLLM):
        """LlamaIndex's MockLLM whose async chat awaits 50 ms, then answers "8"."""

        @llm_chat_callback()
        async def achat(self, messages: Any, **kwargs: Any) -> ChatResponse:
            await asyncio.sleep(DELAY)
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="8"))

    return SlowMockLLM()


def make_judge(kind: str = "langchain") -> LLMJudge:
    if kind == "llama_index":
        return LLMJudge(_slow_mock_llm())
    if kind == "langchain_stream":
        from langchain_core.language_models.fake_chat_models import FakeListChatModel

        return LLMJudge(FakeListChatModel(responses=["8"], sleep=DELAY).bind(stream=True))
    return LLMJudge(_answers_after()(responses=["8"], sleep=DELAY))


def make_record(i: int, app: str) -> Record:
    now = time.time()
    return Record(app_name=app, app_version="v1", input=f"What is the capital of France? #{i}",
                  output="Paris is the capital of France.", contexts=list(CONTEXTS),
                  start_time=now, end_time=now)


async def sleep_only(question: str, answer: str) -> float:
    """The core's ceiling: a feedback that only waits 50 ms (no model, no parsing)."""
    await asyncio.sleep(DELAY)
    return 0.8


REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def median_of_runs(run: Any, *args: str) -> dict[str, Any]:
    """The run with the median ratio of REPEATS runs, with every run's ratio beside it (the
    machine is shared). Each timed run starts from a collected heap and counts the full
    garbage-collector passes inside it (`full_gc`; see `_common.FullCollections`)."""
    runs = sorted((run(*args) for _ in range(REPEATS)), key=lambda x: x["ratio"])
    return {**runs[len(runs) // 2], "ratios": [x["ratio"] for x in runs]}


def run_variant(variant: str, kind: str = "langchain") -> dict[str, Any]:
    judge = make_judge(kind)
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

        with FullCollections() as full_gc:
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
        "full_gc": full_gc.count,
        "pass": bool(finished and ratio >= TARGET and done == records * len(feedbacks)),
    }


def run_direct(kind: str = "langchain") -> dict[str, Any]:
    """The judge alone: 500 answer-relevance calls under asyncio.gather, 64 at a time."""
    judge = make_judge(kind)

    async def main() -> float:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> float:
            async with gate:
                score, _ = await judge.answer_relevance(f"Capital of France? #{i}", "Paris.")
                return score

        await asyncio.gather(*(one(i) for i in range(16)))  # warm up
        with full_gc:
            t0 = time.perf_counter()
            scores = await asyncio.gather(*(one(i) for i in range(CALLS)))
            wall = time.perf_counter() - t0
        assert all(s == 0.8 for s in scores)
        return wall

    full_gc = FullCollections()
    wall = asyncio.run(main())
    ratio = CALLS * DELAY / wall / CONCURRENCY
    return {"judge_calls": CALLS, "wall_s": r(wall),
            "effective_concurrency": r(CALLS * DELAY / wall, 1), "ratio": r(ratio),
            "full_gc": full_gc.count, "pass": ratio >= TARGET}


def main() -> None:
    variants: dict[str, Any] = {name: median_of_runs(run_variant, name)
                                for name in ("rag_triad", "per_record", "baseline_sleep")}
    variants["direct_no_session"] = median_of_runs(run_direct)
    variants["llama_index"] = median_of_runs(run_variant, "per_record", "llama_index")
    variants["langchain_stream_path"] = {
        "per_record": median_of_runs(run_variant, "per_record", "langchain_stream"),
        "direct_no_session": median_of_runs(run_direct, "langchain_stream"),
    }
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
