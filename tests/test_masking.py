"""Session(mask=...): what users typed is masked before anything is stored or judged.

Each test records through the real integrations (LangChain's fakes, LlamaIndex's MockLLM)
or ingests a hand-built record, then reads the SQLite file itself, the record read back,
the record in memory and what a feedback was given.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from scrutiny import ConfigurationError, Feedback, Record, Select, Session
from scrutiny.core._mask import MASK_FAILED

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
CORPUS = (f"Customer Jane ({EMAIL}) pays with card {CARD}.", "Refunds take 5 days.")


def mask_pii(text: str) -> str:
    text = re.sub(r"\b\d{4}(?: \d{4}){3}\b", "<card>", text)
    return re.sub(r"[\w.]+@\w+(?:\.\w+)+", "<email>", text)


def _file_text(path: Path) -> str:
    with sqlite3.connect(path) as raw:
        return "\n".join(raw.iterdump())


def test_a_recorded_chain_is_stored_and_judged_masked(tmp_path: Path,
                                                      make_retrieval_chain: Any) -> None:
    from scrutiny.integrations.langchain import ChainRecorder

    database = tmp_path / "masked.sqlite"
    session = Session(f"sqlite:///{database}", mask=mask_pii)
    chain = make_retrieval_chain([f"Your card {CARD} is on file, {EMAIL}."], k=2,
                                 texts=CORPUS)
    judged: list[tuple[str, str, str]] = []

    def spy(question: str, answer: str, context: str) -> float:
        judged.append((question, answer, context))
        return 1.0

    recorder = ChainRecorder(chain, app_name="bank", session=session, feedbacks=[
        Feedback(spy, name="spy").on(question=Select.input, answer=Select.output,
                                     context=Select.contexts)])
    with recorder as recording:
        answer = chain.invoke(f"Which card did {EMAIL} use? {CARD}?")
    assert CARD in answer  # the app's own answer is untouched
    record = recording.get()
    record.wait_for_feedback_results(timeout=30)
    session.flush(30)
    assert sorted(judged) == [  # (one call per retrieved context)
        ("Which card did <email> use? <card>?", "Your card <card> is on file, <email>.",
         context) for context in sorted(("Customer Jane (<email>) pays with card <card>.",
                                         "Refunds take 5 days."))]
    assert record.output == "Your card <card> is on file, <email>."
    stored = session.get_record(record.record_id)
    assert stored is not None
    assert "Customer Jane (<email>) pays with card <card>." in stored.contexts
    assert len(stored.spans) >= 5
    session.close()
    dump = _file_text(database)
    assert "<card>" in dump
    assert CARD not in dump
    assert EMAIL not in dump


class Answer(BaseModel):
    text: str
    score: float


def test_hand_built_records_are_masked_in_objects_metadata_and_errors(tmp_path: Path) -> None:
    database = tmp_path / "hand.sqlite"
    session = Session(f"sqlite:///{database}", mask=mask_pii)
    record = Record(app_name="bank", app_version="v1",
                    input={"question": f"card {CARD}", "n": 3, "nested": [[EMAIL]]},
                    output=Answer(text=f"mail {EMAIL}", score=0.5),
                    metadata={"user": EMAIL}, error=f"ValueError: bad card {CARD}")
    session.ingest(record)
    session.flush(30)
    assert record.input == {"question": "card <card>", "n": 3, "nested": [["<email>"]]}
    assert record.output == {"text": "mail <email>", "score": 0.5}  # (its JSON form)
    assert record.metadata == {"user": "<email>"}
    assert record.error == "ValueError: bad card <card>"
    session.close()
    dump = _file_text(database)
    assert CARD not in dump
    assert EMAIL not in dump


def test_a_failing_mask_loses_the_text_not_the_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(text: str) -> str:
        if "card" in text:
            raise RuntimeError("regex bug")
        return text.upper()

    database = tmp_path / "broken.sqlite"
    session = Session(f"sqlite:///{database}", mask=broken)
    with caplog.at_level(logging.ERROR, logger="scrutiny"):
        for i in range(3):
            session.ingest(Record(app_name="bank", app_version="v1", input=f"card {CARD}",
                                  output=f"fine {i}"),
                           [Feedback(lambda output: 1.0, name="one").on_output()])
        assert session.wait_for_feedback(30)
    rows = session.get_records_and_feedback()[0]
    assert sorted(rows["output"]) == ["FINE 0", "FINE 1", "FINE 2"]
    assert set(rows["input"]) == {MASK_FAILED}
    assert set(rows["one status"]) == {"done"}
    assert sum("the session's mask" in r.getMessage() for r in caplog.records) == 1
    session.close()
    assert CARD not in _file_text(database)


def test_a_mask_that_is_not_a_function_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="mask must be a function"):
        Session(f"sqlite:///{tmp_path}/x.sqlite", mask={"card": "<card>"})  # type: ignore[arg-type]


def test_a_llama_index_query_is_stored_masked(tmp_path: Path) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM

    from scrutiny.integrations.llama_index import LlamaIndexRecorder

    index = VectorStoreIndex.from_documents([Document(text=t) for t in CORPUS],
                                            embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=6), similarity_top_k=2)
    database = tmp_path / "llama.sqlite"
    session = Session(f"sqlite:///{database}", mask=mask_pii)
    with LlamaIndexRecorder(engine, app_name="bank", session=session) as recording:
        engine.query(f"What did {EMAIL} pay with?")
    record = recording.get()
    session.flush(30)
    assert record.input == "What did <email> pay with?"
    assert any("<card>" in c for c in record.contexts)
    session.close()
    dump = _file_text(database)
    assert CARD not in dump
    assert EMAIL not in dump
