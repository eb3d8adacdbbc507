"""Scrutiny quickstart for LlamaIndex: record a query engine and judge every answer, offline.

Runs with no network and no API key: `MockEmbedding` and `MockLLM` are set in LlamaIndex's
`Settings` (the mock LLM answers with the prompt it was given). Records go to
`scrutiny.sqlite` in the working directory (the embedded default).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pandas as pd
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms import MockLLM

from scrutiny import Feedback, FeedbackResult, Select, Session
from scrutiny.integrations.llama_index import FeedbackResultEvent, LlamaIndexRecorder

DOCUMENTS = [
    "Ireland has a mild, wet climate: it rains on about 150 to 225 days a year.",
    "Summers in Ireland are cool, around 15 to 20 degrees Celsius.",
    "Spain is one of the sunniest countries in Europe.",
    "The Atlantic Gulf Stream keeps Irish winters mild.",
]
QUESTIONS = [
    "What is the typical weather in Ireland?",
    "How warm are Irish summers?",
    "Why are Irish winters mild?",
    "Is Spain sunny?",
]
STOP = {"what", "is", "the", "how", "are", "why", "a", "in"}


def _words(text: str) -> set[str]:
    return {w.strip("?.,:").lower() for w in text.split()} - STOP


# --- three feedback functions: plain, async, and one that reads the retrieved contexts ---
def conciseness(answer: str) -> float:
    """1.0 for answers up to 400 characters, falling to 0 at 1200."""
    return max(0.0, min(1.0, (1200 - len(answer)) / 800))


async def answer_relevance(question: str, answer: str) -> tuple[float, str]:
    """Share of the question's content words that the answer uses (async, like an LLM judge)."""
    await asyncio.sleep(0.01)  # stands for a network call
    words = _words(question)
    hits = {w for w in words if w in answer.lower()}
    return len(hits) / max(1, len(words)), f"answer uses {sorted(hits)} of {sorted(words)}"


def context_relevance(question: str, context: str) -> float:
    """Share of the question's content words found in one retrieved context."""
    words = _words(question)
    return len(words & _words(context)) / max(1, len(words))


class FeedbackEventCounter(BaseEventHandler):
    """Any LlamaIndex event handler receives Scrutiny's results as `FeedbackResultEvent`s."""

    count: int = 0

    @classmethod
    def class_name(cls) -> str:
        return "FeedbackEventCounter"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, FeedbackResultEvent):
            self.count += 1


def main() -> None:
    Settings.llm = MockLLM()  # answers with its prompt: context and question
    Settings.embed_model = MockEmbedding(embed_dim=8)
    counter = FeedbackEventCounter()
    get_dispatcher().add_event_handler(counter)

    session = Session()  # embedded SQLite file ./scrutiny.sqlite
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCUMENTS])
    query_engine = index.as_query_engine(similarity_top_k=2)
    f_concise = Feedback(conciseness).on_output()
    f_relevance = Feedback(answer_relevance).on_input_output()
    f_context = Feedback(context_relevance).on(
        question=Select.input, context=Select.contexts)  # once per context, then the mean
    recorder = LlamaIndexRecorder(query_engine, app_name="docs-qa", app_version="v1",
                                  feedbacks=[f_concise, f_relevance, f_context],
                                  session=session)

    # Pattern 1: record one query, then block until its feedback is stored.
    with recorder as recording:
        query_engine.query(QUESTIONS[0])
    record = recording.get()
    print(f"Q: {record.input}\nretrieved: {record.contexts}")
    for feedback, result in record.wait_for_feedback_results(timeout=30).items():
        print(f"  {feedback.name:<18} {result.status.value:<8} {result.result:.2f}"
              f"  {result.explanation or ''}")

    # Pattern 2: record the rest, and be called back when each record is fully judged.
    all_done = threading.Event()
    remaining = len(QUESTIONS) - 1
    lock = threading.Lock()

    def on_done(results: dict[Feedback, FeedbackResult]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            if remaining == 0:
                all_done.set()

    with recorder as recording:
        for question in QUESTIONS[1:]:
            query_engine.query(question)
    for rec in recording.records:
        rec.wait_for_feedback_results(callback=on_done)  # returns at once
    if not all_done.wait(30):
        raise SystemExit("feedback did not finish in 30 s")

    df, feedback_columns = session.get_records_and_feedback(app_ids=["docs-qa"])
    status_columns = [f"{c} status" for c in feedback_columns]
    with pd.option_context("display.width", 160, "display.max_colwidth", 48):
        print("\nRecords (score and status per feedback):")
        paired = [col for c in feedback_columns for col in (c, f"{c} status")]
        print(df[["input", *paired]].to_string())
        print("\nLeaderboard:")
        print(session.get_leaderboard(app_ids=["docs-qa"]).to_string())
    session.close()
    print(f"\nLlamaIndex event handlers received {counter.count} FeedbackResultEvents.")
    not_done = (df[status_columns] != "done").to_numpy().sum()
    if not_done or df[feedback_columns].isna().to_numpy().any():
        raise SystemExit(f"{not_done} feedback results are not done")


if __name__ == "__main__":
    main()
