"""Fixtures shared by the test suite.

Framework imports happen inside the fixtures that need them, so tests of one integration
never need the other framework installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scrutiny import Session

CORPUS = (
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "Rome is the capital of Italy.",
)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for this test."""
    return f"sqlite:///{tmp_path}/t.sqlite"


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    """A session on a fresh SQLite file, closed (and flushed) after the test."""
    s = Session(database_url)
    try:
        yield s
    finally:
        s.close(timeout=10)


@pytest.fixture
def make_retrieval_chain() -> Callable[..., Any]:
    """A factory of small LangChain RAG chains built only from langchain-core's fakes.

    ``make_retrieval_chain(responses=["Paris."], k=2, texts=CORPUS, model=None)`` returns
    ``{"context": retriever | join, "question": passthrough} | prompt | model | parser``:
    a string in, a string out, with chain, retriever, prompt, chat_model and parser runs.
    """
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.language_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    def make(responses: list[str] | None = None, *, k: int = 2,
             texts: tuple[str, ...] | list[str] = CORPUS, model: Any = None) -> Any:
        store = InMemoryVectorStore.from_texts(list(texts), DeterministicFakeEmbedding(size=16))
        retriever = store.as_retriever(search_kwargs={"k": k})
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Answer from this context:\n{context}"), ("human", "{question}")])
        llm = model if model is not None else FakeListChatModel(
            responses=responses or ["Paris is the capital of France."])

        def join_docs(docs: list[Any]) -> str:
            return "\n".join(d.page_content for d in docs)

        return (
            {"context": retriever | RunnableLambda(join_docs),
             "question": RunnablePassthrough()}
            | prompt
            | llm
            | StrOutputParser()
        )

    return make
