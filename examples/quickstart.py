"""Scrutiny quickstart: record a small retrieval chain and judge every answer, offline.

Runs with no network and no API key: the model is LangChain's FakeListChatModel, the
retriever an in-memory vector store with deterministic fake embeddings. Records go to
`scrutiny.sqlite` in the working directory (the embedded default).
"""

from __future__ import annotations

import asyncio
import threading

import pandas as pd
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from scrutiny import Feedback, FeedbackResult, Select, Session
from scrutiny.integrations.langchain import ChainRecorder

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
ANSWERS = [
    "Ireland is mild and wet, with rain on most days of the year.",
    "Irish summers are cool, usually 15 to 20 degrees Celsius.",
    "The Gulf Stream keeps Irish winters mild.",
    "Yes, Spain is one of the sunniest countries in Europe.",
]


def build_chain():  # type: ignore[no-untyped-def]
    store = InMemoryVectorStore.from_texts(DOCUMENTS, DeterministicFakeEmbedding(size=64))
    retriever = store.as_retriever(search_kwargs={"k": 2})
    prompt = ChatPromptTemplate.from_template(
        "Answer from the context.\nContext:\n{context}\n\nQuestion: {question}")
    llm = FakeListChatModel(responses=ANSWERS)

    def join(docs):  # type: ignore[no-untyped-def]
        return "\n".join(d.page_content for d in docs)

    return ({"context": retriever | join, "question": RunnablePassthrough()}
            | prompt | llm | StrOutputParser())


# --- three feedback functions: plain, async, and one that reads the retrieved contexts ---
def conciseness(answer: str) -> float:
    """1.0 for answers up to 80 characters, falling to 0 at 240."""
    return max(0.0, min(1.0, (240 - len(answer)) / 160))


async def answer_relevance(question: str, answer: str) -> tuple[float, str]:
    """Share of the question's content words that the answer uses (async, like an LLM judge)."""
    await asyncio.sleep(0.01)  # stands for a network call
    stop = {"what", "is", "the", "how", "are", "why", "a", "in"}
    words = {w.strip("?.,").lower() for w in question.split()} - stop
    hits = {w for w in words if w in answer.lower()}
    return len(hits) / max(1, len(words)), f"answer uses {sorted(hits)} of {sorted(words)}"


def context_overlap(context: str, answer: str) -> float:
    """How many of the answer's words appear in one retrieved context."""
    answer_words = {w.strip(".,").lower() for w in answer.split()}
    context_words = {w.strip(".,:").lower() for w in context.split()}
    return len(answer_words & context_words) / max(1, len(answer_words))


def main() -> None:
    session = Session()  # embedded SQLite file ./scrutiny.sqlite
    chain = build_chain()
    f_concise = Feedback(conciseness).on_output()
    f_relevance = Feedback(answer_relevance).on_input_output()
    f_grounded = Feedback(context_overlap, name="groundedness").on(
        context=Select.contexts, answer=Select.output)  # once per context, then the mean
    recorder = ChainRecorder(chain, app_name="weather-qa", app_version="v1",
                             feedbacks=[f_concise, f_relevance, f_grounded], session=session)

    # Pattern 1: record one call, then block until its feedback is stored.
    with recorder as recording:
        answer = chain.invoke(QUESTIONS[0])
    record = recording.get()
    print(f"Q: {record.input}\nA: {answer}")
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
        chain.batch(QUESTIONS[1:])
    for rec in recording.records:
        rec.wait_for_feedback_results(callback=on_done)  # returns at once
    if not all_done.wait(30):
        raise SystemExit("feedback did not finish in 30 s")

    df, feedback_columns = session.get_records_and_feedback(app_ids=["weather-qa"])
    with pd.option_context("display.width", 160, "display.max_colwidth", 48):
        print("\nRecords (score and status per feedback):")
        status_columns = [f"{c} status" for c in feedback_columns]
        paired = [col for c in feedback_columns for col in (c, f"{c} status")]
        print(df[["input", *paired]].to_string())
        print("\nLeaderboard:")
        print(session.get_leaderboard(app_ids=["weather-qa"]).to_string())
    not_done = (df[status_columns] != "done").to_numpy().sum()
    if not_done or df[feedback_columns].isna().to_numpy().any():
        raise SystemExit(f"{not_done} feedback results are not done")
    session.close()


if __name__ == "__main__":
    main()
