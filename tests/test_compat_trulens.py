"""Code written for TruLens runs with only its imports changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scrutiny import FeedbackStatus
from scrutiny.compat.trulens import Feedback, Select, TruChain, TruLlama, TruSession


def test_a_trulens_langchain_quickstart_runs(tmp_path: Path,
                                             make_retrieval_chain: Any) -> None:
    session = TruSession(f"sqlite:///{tmp_path}/tru.sqlite")
    rag_chain = make_retrieval_chain(["Paris is the capital of France."])

    def relevance(question: str, answer: str) -> float:
        return 1.0 if "capital" in question and "capital" in answer else 0.0

    def context_relevance(question: str, context: str) -> float:
        return 1.0 if "France" in context else 0.0

    context = TruChain.select_context(rag_chain)
    f_answer = Feedback(relevance, name="Answer Relevance").on_input_output()
    f_context = (Feedback(context_relevance, name="Context Relevance")
                 .on_input().on(context).aggregate(np.mean))
    f_len = Feedback(lambda output: len(output) / 100, name="Length").on(Select.RecordOutput)
    tru_recorder = TruChain(rag_chain, app_name="ChatApplication", app_version="Chain1",
                            feedbacks=[f_answer, f_context, f_len], session=session)
    with tru_recorder as recording:
        llm_response = rag_chain.invoke("What is the capital of France?")
    assert llm_response == "Paris is the capital of France."
    rec = recording.get()
    results = rec.wait_for_feedback_results()
    assert {f.name: r.result for f, r in results.items()} == {
        "Answer Relevance": 1.0, "Context Relevance": 0.5, "Length": 0.31}
    assert all(r.status is FeedbackStatus.DONE for r in results.values())
    board = session.get_leaderboard(app_ids=[])
    assert board.loc[("ChatApplication", "Chain1"), "Answer Relevance"] == 1.0
    _, feedback_names = session.get_records_and_feedback()
    assert sorted(feedback_names) == ["Answer Relevance", "Context Relevance", "Length"]
    assert session.wait_for_feedback_results(10)
    assert session.reset_database() == 1
    assert session.get_records_and_feedback()[0].empty
    session.close()


def test_a_trulens_llama_index_quickstart_runs(tmp_path: Path) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    session = TruSession(f"sqlite:///{tmp_path}/tru.sqlite")
    index = VectorStoreIndex.from_documents(
        [Document(text="The author grew up painting."), Document(text="Rome is old.")],
        embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=8))
    f_ctx = Feedback(lambda context: 1.0, name="ctx").on(TruLlama.select_source_nodes())
    tru = TruLlama(engine, app_id="docs-qa", feedbacks=[f_ctx], session=session)
    with tru as recording:
        engine.query("What did the author do growing up?")
    result = next(iter(recording.get().wait_for_feedback_results(timeout=30).values()))
    assert result.status is FeedbackStatus.DONE
    assert session.get_records_and_feedback()[0].loc[0, "app_name"] == "docs-qa"
    session.close()


def test_a_recorders_app_id_is_what_its_records_are_filtered_by(tmp_path: Path) -> None:
    """TruLens code filters with `app_ids=[tru.app_id]`: the attribute was missing."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny.compat.trulens import TruChain, TruSession

    session = TruSession(f"sqlite:///{tmp_path}/t.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    try:
        tru = TruChain(chain, app_name="qa", app_version="v2", session=session)
        with tru:
            chain.invoke("q")
        assert tru.app_id == "qa:v2"
        df, _ = session.get_records_and_feedback(app_ids=[tru.app_id])
        assert list(df["app_id"]) == ["qa:v2"]
        assert len(session.get_leaderboard(app_ids=[tru.app_id])) == 1
    finally:
        session.close()


async def test_with_record_returns_the_result_and_its_record(tmp_path: Path) -> None:
    """TruLens code writes `response, record = tru.with_record(chain.invoke, q)`: the
    method was missing."""
    from langchain_core.runnables import RunnableLambda

    from scrutiny import ConfigurationError

    session = TruSession(f"sqlite:///{tmp_path}/w.sqlite")
    chain = RunnableLambda(lambda q: f"answer to {q}")
    f_len = Feedback(lambda output: len(output) / 100, name="Length").on_output()
    try:
        tru = TruChain(chain, app_name="qa", feedbacks=[f_len], session=session)
        response, record = tru.with_record(chain.invoke, "q1")
        assert response == "answer to q1"
        assert (record.input, record.output) == ("q1", "answer to q1")
        assert record.wait_for_feedback_results(timeout=10)[f_len].result == 0.12
        response, record = await tru.awith_record(chain.ainvoke, "q2")
        assert (response, record.input) == ("answer to q2", "q2")
        with pytest.raises(ConfigurationError, match="record_metadata"):
            tru.with_record(chain.invoke, "q3", record_metadata={"user": "u1"})
        assert session.wait_for_feedback(10)
        assert len(session.get_records_and_feedback()[0]) == 2
    finally:
        session.close()
