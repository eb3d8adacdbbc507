"""Session(mask=...): what users typed is masked before anything is stored or judged.

Each test records through the real integrations (LangChain's fakes, LlamaIndex's MockLLM)
or ingests a hand-built record, then reads the SQLite file itself, the record read back,
the record in memory and what a feedback was given.
"""

from __future__ import annotations

import contextlib
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
    with contextlib.closing(sqlite3.connect(path)) as raw:
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


def test_tags_span_names_and_bytes_are_masked_too(tmp_path: Path,
                                                  make_retrieval_chain: Any) -> None:
    """A user id in the call's tags or run name, and a card number in a bytes output,
    reached the file: tags and names were not walked, and bytes were stored as a hex
    preview the mask could not read but anyone could decode."""
    from scrutiny.integrations.langchain import ChainRecorder

    database = tmp_path / "tags.sqlite"
    session = Session(f"sqlite:///{database}", mask=mask_pii)
    chain = make_retrieval_chain(["ok"], texts=CORPUS)
    with ChainRecorder(chain, app_name="bank", session=session):
        chain.invoke("q", config={"tags": [f"customer:{EMAIL}"],
                                  "run_name": f"support call {EMAIL}"})
    session.ingest(Record(app_name="bank", app_version="v1", input="q",
                          output=f'{{"card": "{CARD}"}}'.encode(), tags=[f"card:{CARD}"]))
    session.close()
    dump = _file_text(database)
    assert "<email>" in dump
    assert "card:<card>" in dump
    for secret in (CARD, EMAIL, CARD.encode().hex(), EMAIL.encode().hex()):
        assert secret not in dump


def test_results_texts_and_the_failure_log_are_masked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only records were masked: a feedback failing with data it fetched itself (a CRM
    lookup), or explaining its score with it, stored and logged it raw."""
    def crm(output: str) -> float:
        raise LookupError(f"CRM has no record for {EMAIL}")

    def explained(output: str) -> tuple[float, str]:
        return 1.0, f"matches the card {CARD} on file"

    database = tmp_path / "results.sqlite"
    with Session(f"sqlite:///{database}", mask=mask_pii) as session, \
            caplog.at_level(logging.DEBUG, logger="scrutiny"):
        record = Record(app_name="bank", app_version="v1", input="q", output="a")
        session.ingest(record, [Feedback(crm).on_output(), Feedback(explained).on_output()])
        results = {f.name: r for f, r in record.wait_for_feedback_results(timeout=30).items()}
    assert results["crm"].error == "LookupError: CRM has no record for <email>"
    assert results["explained"].explanation == "matches the card <card> on file"
    assert EMAIL not in caplog.text
    dump = _file_text(database)
    assert CARD not in dump
    assert EMAIL not in dump


def test_a_ground_truth_set_is_read_through_the_mask(tmp_path: Path) -> None:
    """The expected answers were compared unmasked with masked answers (a word-for-word
    answer scored 0.29), quoted raw in the explanation, and a question holding personal
    data was never found."""
    from scrutiny.providers import GroundTruth

    truth = GroundTruth({f"Which card does {EMAIL} use?": f"Card {CARD}"})
    with Session(f"sqlite:///{tmp_path}/gt.sqlite", mask=mask_pii) as session:
        record = Record(app_name="bank", app_version="v1",
                        input=f"Which card does {EMAIL} use?", output=f"Card {CARD}")
        session.ingest(record, [Feedback(truth.agreement).on_input_output()])
        (result,) = record.wait_for_feedback_results(timeout=30).values()
    assert result.status.value == "done", result.error
    assert result.result == 1.0
    assert CARD not in (result.explanation or "")
    assert truth.expected_for(f"Which card does {EMAIL} use?") == f"Card {CARD}"  # (as given)


def test_a_record_given_again_is_not_masked_twice(tmp_path: Path) -> None:
    """A mask that is not idempotent (a pseudonymiser) masked a record given again for
    more feedbacks a second time: the second feedback judged what was never stored."""
    seen: list[str] = []

    def tagged(text: str) -> str:
        return f"[{text}]"

    def first(output: str) -> float:
        seen.append(output)
        return 1.0

    def second(output: str) -> float:
        seen.append(output)
        return 1.0

    with Session(f"sqlite:///{tmp_path}/again.sqlite", mask=tagged) as session:
        record = Record(app_name="bank", app_version="v1", input="q", output="answer")
        session.ingest(record, [Feedback(first).on_output()])
        record.wait_for_feedback_results(timeout=30)
        session.ingest(record, [Feedback(second).on_output()])
        record.wait_for_feedback_results(timeout=30)
    assert seen == ["[answer]", "[answer]"]


def test_a_feedbacks_own_tokens_add_to_its_judges_total(tmp_path: Path) -> None:
    """A feedback that awaited a judge (110 tokens, with a total) and reported its own
    call's 42 without a total was stored as prompt 140, completion 12, total 110."""
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from scrutiny.core import add_evaluation_cost
    from scrutiny.providers import LLMJudge

    usage = {"input_tokens": 100, "output_tokens": 10, "total_tokens": 110}
    judge = LLMJudge(GenericFakeChatModel(messages=iter(
        [AIMessage(content='{"score": 8, "reasons": "ok"}', usage_metadata=usage)])))

    async def checked(output: str) -> float:
        score, _ = await judge.coherence(output)
        add_evaluation_cost(prompt_tokens=40, completion_tokens=2)
        return score

    with Session(f"sqlite:///{tmp_path}/cost.sqlite") as session:
        record = Record(app_name="bank", app_version="v1", input="q", output="a")
        session.ingest(record, [Feedback(checked).on_output()])
        (result,) = record.wait_for_feedback_results(timeout=30).values()
        df, _ = session.get_records_and_feedback()
    assert result.cost == {"prompt_tokens": 140, "completion_tokens": 12, "total_tokens": 152}
    assert df["eval_total_tokens"].tolist() == [152]
