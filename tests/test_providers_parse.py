"""Reading scores out of judge answers: what is accepted, and what fails with the raw text."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest

from scrutiny import InvalidFeedbackValue
from scrutiny.providers._budget import estimate_tokens, fit_prompt
from scrutiny.providers._parse import ParsedScore, parse_score, parse_statement_scores
from scrutiny.providers._prompts import CRITERIA, GROUNDEDNESS, SYSTEM
from scrutiny.providers._text import as_text, split_statements


@pytest.mark.parametrize(("answer", "score", "reasons"), [
    ('{"score": 8, "reasons": "on topic"}', 0.8, "on topic"),
    ('```json\n{"score": 10, "reason": "exact"}\n```', 1.0, "exact"),
    ('{"Score": "7/10", "explanation": "mostly"}', 0.7, "mostly"),
    ('{"score": 0, "reasons": ["off topic", "evasive"]}', 0.0, "off topic; evasive"),
    ("7", 0.7, ""),
    ("  **9**  ", 0.9, ""),
    ("4/5", 0.8, ""),
    ("3 out of 10", 0.3, ""),
    ("Score: 6\nReasons: partly answers", 0.6, "partly answers"),
    ("The answer is close.\n**Rating:** 5/10", 0.5, "The answer is close."),
    ('Here is my verdict: {"score": 2, "reasons": "wrong city"}', 0.2, "wrong city"),
    ("7.5", 0.75, ""),
    ('{"score": 8, "reasons": "good"}\n\nLet me know if you need more.', 0.8, "good"),
    ('{"Score": "8/10", "Reasons": "ok"}', 0.8, "ok"),
    ('{"rating": 4, "out_of": 5, "reason": "good"}', 0.8, "good"),  # its own scale, stated
    # a dash then a smaller number is the reasons, not a range ("8 - 9" is one)
    ("Score: 7 - 2 minor issues keep it from a 9", 0.7, "2 minor issues keep it from a 9"),
    ("Rating: 6/10 \u2014 3 of the 5 facts are right", 0.6, "3 of the 5 facts are right"),
    # the score first, then the reasons (which may hold other numbers)
    ("9\nThe answer is relevant. It names 3 facts.", 0.9,
     "The answer is relevant. It names 3 facts."),
    ("8/10 - mostly relevant", 0.8, "mostly relevant"),
    ("7 out of 10: partly answers", 0.7, "partly answers"),
    ("**8**\n\nCovers 2 of the 3 points.", 0.8, "Covers 2 of the 3 points."),
    # a reasoning model's thinking before its answer is not the answer
    ('<think>\nScore: 3? No: it answers it. {"score": 9} then.\n</think>\n\n'
     '{"score": 9, "reasons": "on topic"}', 0.9, "on topic"),
    ("<think>Hmm, Score: 6?</think>\nScore: 8\nReasons: fine", 0.8, "fine"),
    ("The prompt opened the block; Score: 2 at first.</think>\n\n8", 0.8, ""),
    # what is left of the score line is no reason
    ("Score: 7.\nReasons: fine", 0.7, "fine"),
    ("**Score:** 8\n**Reasons:** good", 0.8, "good"),
    ("Score: 8, because it is on topic", 0.8, "because it is on topic"),
    ("Score: 7\nReasons: short.\nScore: 7", 0.7, "short."),
    # a rating the judge quotes mid-sentence is not a second score
    ('The source gives the hotel a guest rating: 4/5.\n{"score": 7, "reasons": "partly"}',
     0.7, "partly"),
])
def test_good_answers_are_read_on_the_stated_scale(answer: str, score: float,
                                                   reasons: str) -> None:
    parsed = parse_score(answer, 10)
    assert parsed.score == pytest.approx(score)
    assert parsed.reasons == reasons


@pytest.mark.parametrize(("answer", "why"), [
    ("", "empty"),
    ("The answer is quite good.", "no score"),
    ('{"score": 8, "reasons": "the answer', "cut off"),
    ('{"score": 8,, }', "not valid JSON"),
    ('{"reasons": "fine"}', "no 'score'"),
    ('{"score": null}', "not a number"),
    ('{"score": true}', "not a number"),
    ('{"score": "high"}', "not a number"),
    ('{"score": NaN}', "finite"),
    ("[1, 2]", "not an object"),
    ("Score: 3\nOn reflection, Score: 8", "several different scores"),
    # a reasoning block cut off before the answer: its "Score: 6" is a draft
    ("<think>\nThe answer is on topic, so Score: 6 seems right, unless", "never closes"),
    ("<think>All reasoning.</think>\n", "no answer after its reasoning"),
    # the prose around the JSON disagrees with it
    ('Score: 3\n{"score": 7, "reasons": "fine"}', "several different scores"),
    ('{"score": 7, "reasons": "fine"}\n\nOn reflection, Score: 4', "several different scores"),
    ("Score: 8-9", "a range"),
    ("Rating: 6 to 7", "a range"),
    ("Score: 1e1", "no score"),
    # a 0-1 answer on the 0-10 scale: read as stated, 0.7 was 0.07
    ('{"score": 0.7, "reasons": "mostly"}', "0-1 scale"),
    ("Score: 0.8", "0-1 scale"),
    ("0.9", "0-1 scale"),
])
def test_malformed_answers_fail_with_the_raw_text(answer: str, why: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match=why) as info:
        parse_score(answer, 10)
    assert info.value.value == answer


@pytest.mark.parametrize("answer", ['{"score": 11}', '{"score": -1}', "12", "-3", "6/5",
                                    '{"score": 6, "max_score": 5}',
                                    "Score: 42", '{"score": "11/10"}'])
def test_out_of_range_scores_fail_and_are_never_clamped(answer: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match="outside the scale") as info:
        parse_score(answer, 10)
    assert info.value.value == answer


@pytest.mark.parametrize("answer", [
    '{"score": 4, "out_of": 5, "reasons": "good"}',
    '{"score": "4", "out_of": 5, "reasons": "good"}',
    '{"rating": 4, "out_of": "5", "reasons": "good"}',
    '{"score": "4/5", "max_score": 5, "reasons": "good"}',
    '{"score": 4, "scale": "0-5", "reasons": "good"}',
    'Verdict: {"score": "4", "out_of": "5", "reasons": "good"}',
])
def test_a_scale_the_judge_gives_beside_its_score_is_read_as_text_or_number(
        answer: str) -> None:
    """A score or scale written as text ("4", "5") was read on the prompt's 0-10: 0.4."""
    assert parse_score(answer, 10) == ParsedScore(0.8, "good")


@pytest.mark.parametrize(("answer", "why"), [
    ('{"score": 8, "score": 3, "reasons": "two scores"}', "'score' twice"),
    ('{"score": 8, "Score": 3}', "'Score' twice"),
    ('Verdict: {"rating": 4, "out_of": 5, "out_of": 10}', "'out_of' twice"),
    ('{"score": "8/10", "out_of": 5}', "not out of the 5"),
])
def test_a_json_verdict_giving_its_score_twice_fails(answer: str, why: str) -> None:
    """JSON keeps the last of two equal keys: {"score": 8, "score": 3} was read as 0.3."""
    with pytest.raises(InvalidFeedbackValue, match=why) as info:
        parse_score(answer, 10)
    assert info.value.value == answer
    assert parse_score('{"score": 8, "score": 8}', 10).score == pytest.approx(0.8)


def test_a_statement_verdict_giving_its_score_twice_fails() -> None:
    answer = ('{"statements": [{"statement": 1, "score": 10, "score": 0}, '
              '{"statement": 2, "score": 5}]}')
    with pytest.raises(InvalidFeedbackValue, match="'score' twice"):
        parse_statement_scores(answer, 2)


@pytest.mark.parametrize(("answer", "score"), [
    ('Here is my verdict: {"score": 8, "reasons": "ok"} (ignoring {x})', 0.8),
    ('The set {1, 2} is right. Verdict: {"score": 8, "reasons": "ok"}', 0.8),
    ('Statement {1} holds. {"score": 8, "reasons": "ok"} Same: {"score": 8}', 0.8),
    ('Verdict: {"score": 8, "reasons": "ok"} or rather {"score": 3}', None),
    ('The set {1, 2}. {"score": 8, "reasons": "ok"}\nScore: 3', None),
])
def test_a_json_verdict_in_prose_with_braces_of_its_own_is_read(answer: str,
                                                                 score: float | None) -> None:
    """Read from the first "{" to the last "}", such an answer was no JSON and failed "no
    score found"; each object is read on its own now, a second score still failing."""
    if score is None:
        with pytest.raises(InvalidFeedbackValue, match="several different scores"):
            parse_score(answer, 10)
        return
    assert parse_score(answer, 10) == ParsedScore(score, "ok")
    verdicts = f"Statement {{1}} holds; {{2}} does not. {TWO_VERDICTS}"
    assert [v.score for v in parse_statement_scores(verdicts, 2)] == [0.9, 0.3]


def test_an_echoed_prompt_never_yields_a_score() -> None:
    for criterion in CRITERIA.values():
        echoed = SYSTEM + "\n\n" + criterion.template.format(
            **dict.fromkeys(criterion.fields, "Paris, 10 out of 10 sources."))
        with pytest.raises(InvalidFeedbackValue):
            parse_score(echoed, 10)
    echoed = GROUNDEDNESS.template.format(contexts="[1] a", statements="1. b\n2. c", count=2)
    with pytest.raises(InvalidFeedbackValue):
        parse_statement_scores(echoed, 2)


def test_a_score_quoted_from_what_the_judge_read_is_not_its_score() -> None:
    """MockLLM echoes its prompt, and real models quote contexts: a document saying
    "Guest rating: 4/5" scored 0.8 on every criterion."""
    context = "Hotel Bellevue. Guest rating: 4/5. Quiet rooms near the lake."
    for answer in (f"Looking at the context:\n{context}",
                   'It says {"score": 3}', f"system: judge this\n<context>\n{context}"):
        quoted = [context, 'It says {"score": 3} somewhere']
        with pytest.raises(InvalidFeedbackValue, match=r"no score|not JSON|no 'score'"):
            parse_score(answer, 10, quoted=quoted)
    both = f"{context}\nScore: 9\nReasons: it is quiet"
    assert parse_score(both, 10, quoted=[context]).score == pytest.approx(0.9)


def test_a_bare_score_is_not_taken_for_a_digit_of_what_the_judge_read() -> None:
    """A score alone on its line counted as copied from the prompt when any text read
    held that digit ("9" in "1999", "0" in "$20"): the result failed, or a draft score
    before it won. It is copied only when it is a whole line of what was read."""
    assert parse_score("0\n\nThe text is harmless.", 10,
                       quoted=["Plans start at $20 a month."]).score == 0.0
    assert parse_score("It reads as one whole.\n\n9", 10,
                       quoted=["Founded in 1999, the firm grew."]).score == pytest.approx(0.9)
    with pytest.raises(InvalidFeedbackValue, match="several different scores"):
        parse_score("Initial score: 6\nOn reflection it is fine.\n\n9", 10,
                    quoted=["Founded in 1999, the firm grew."])
    with pytest.raises(InvalidFeedbackValue, match="no score"):  # (a whole line of it)
        parse_score("The table says:\n9", 10, quoted=["Ratings:\n9\nend"])


@pytest.mark.parametrize("answer", [
    "Score: 7\n\nThe answer gives the key years:\n1998\n2004",
    "Score: 7\n\nThe answer names the steps in order:\n1\n2\n3",
    "Score: 7\n\nIt was founded in:\n1998",
])
def test_numbers_listed_in_the_reasons_after_a_stated_score_are_not_scores(
        answer: str) -> None:
    """They failed the result: "the score 1998 is outside the scale 0-10", "several
    different scores"."""
    parsed = parse_score(answer, 10)
    assert parsed.score == pytest.approx(0.7)
    assert parsed.reasons.endswith(answer.rsplit(":", 1)[1].strip())


@pytest.mark.parametrize(("answer", "reasons"), [
    ("## Evaluation\n\n**Score: 8/10**\n\nThe answer is good.",
     "Evaluation\n\nThe answer is good."),
    ("Relevance score: 8/10\nThe answer addresses it.", "The answer addresses it."),
    ("My score: 8\nThe answer addresses it.", "The answer addresses it."),
    ("```json5\n{\"score\": 8, \"reasons\": \"fine\"}\n```", "fine"),
])
def test_reasons_keep_nothing_of_the_scores_line(answer: str, reasons: str) -> None:
    """The reasons kept "**\n**", "Relevance ", "My " of the score's line, and a ```json5
    fence failed as "several different scores" (its 5)."""
    parsed = parse_score(answer, 10)
    assert (parsed.score, parsed.reasons) == (pytest.approx(0.8), reasons)


def test_statement_verdicts_are_read_in_order_or_by_number() -> None:
    answer = ('{"statements": [{"statement": 2, "score": 0, "reason": "absent"}, '
              '{"statement": 1, "score": 10, "reason": "stated"}]}')
    first, second = parse_statement_scores(answer, 2)
    assert (first.score, first.reasons) == (1.0, "stated")
    assert (second.score, second.reasons) == (0.0, "absent")
    assert [v.score for v in parse_statement_scores("[10, 5, 0]", 3)] == [1.0, 0.5, 0.0]
    assert parse_statement_scores('{"score": 9, "reasons": "ok"}', 1)[0].score == 0.9
    assert parse_statement_scores("Score: 4", 1)[0].score == 0.4
    thought = ('<think>Statement {1} is in source [1]; {2} is not.</think>\n'
               '{"statements": [{"statement": 1, "score": 10}, {"statement": 2, "score": 0}]}')
    assert [v.score for v in parse_statement_scores(thought, 2)] == [1.0, 0.0]


@pytest.mark.parametrize(("answer", "why"), [
    ('{"statements": [{"statement": 1, "score": 10}]}', "1 verdict"),
    ('{"statements": [{"statement": 1, "score": 10}, {"statement": 2, "score": 20}]}',
     "outside the scale"),
    ('{"statements": [{"statement": 1, "score": 10}, {"statement": 2, "sc', "cut off"),
    ("Both are supported.", "not JSON"),
    ('{"statements": [{"statement": 1, "score": 1}, {"statement": 1, "score": 2}]}',
     "two verdicts"),
    ('{"statements": [{"statement": 1, "score": 0.9}, {"statement": 2, "score": 0.5}]}',
     "0-1 scale"),
    ('<think>\n1. supported {"statement": 1, "score": 10}', "never closes"),
])
def test_bad_statement_verdicts_fail(answer: str, why: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match=why) as info:
        parse_statement_scores(answer, 2)
    assert info.value.value == answer


@pytest.mark.parametrize("numbers", [(2, 1), ("2", "1"), (" 2", "1 ")])
def test_statement_verdicts_numbered_with_numbers_or_strings_go_to_their_statements(
        numbers: tuple[Any, Any]) -> None:
    """"statement": "2" was ignored and the verdicts taken in order: the explanation showed
    the unsupported claim as supported and the supported one as not."""
    answer = json.dumps({"statements": [
        {"statement": numbers[0], "score": 0, "reason": "not in sources"},
        {"statement": numbers[1], "score": 10, "reason": "stated"}]})
    first, second = parse_statement_scores(answer, 2)
    assert (first.score, first.reasons) == (1.0, "stated")
    assert (second.score, second.reasons) == (0.0, "not in sources")


TWO_VERDICTS = ('{"statements": [{"statement": 1, "score": 9, "reason": "stated"}, '
                '{"statement": 2, "score": 3, "reason": "partly"}]}')


@pytest.mark.parametrize(("answer", "count", "why"), [
    ('{"statements": [{"statement": 1, "score": 9}]}\n\nOn reflection: '
     '{"statements": [{"statement": 1, "score": 2}]}', 1, "different scores"),
    ('{"statements": [{"statement": 1, "score": 9}]}\nScore: 2', 1, "different scores"),
    (f"{TWO_VERDICTS}\nOn reflection: {{\"statements\": [{{\"statement\": 2, \"score\": 7}}]}}",
     2, "two different verdicts for statement 2"),
    (f"{TWO_VERDICTS}\nNo, rather: {{\"verdicts\": [9, 8]}}", 2,
     "two different verdicts for statement 2"),
])
def test_statement_verdicts_followed_by_different_ones_fail(answer: str, count: int,
                                                            why: str) -> None:
    """The first JSON's verdicts were taken and a second, different set after them (the
    judge changing its mind) ignored: 0.9 where a plain score fails the same answer."""
    with pytest.raises(InvalidFeedbackValue, match=why) as info:
        parse_statement_scores(answer, count)
    assert info.value.value == answer


def test_statement_verdicts_said_again_or_followed_by_an_overall_score_are_read() -> None:
    for answer in (f"{TWO_VERDICTS}\nTo repeat: {TWO_VERDICTS}",
                   f"{TWO_VERDICTS}\nOverall score: 6. Statement {{2}} is partly supported."):
        assert [v.score for v in parse_statement_scores(answer, 2)] == [0.9, 0.3]


def test_statements_are_lines_bullets_and_sentences() -> None:
    text = "Paris is the capital. It has 2 million people!\n- The Seine flows through it.\n\n"
    assert split_statements(text) == [
        "Paris is the capital.", "It has 2 million people!", "The Seine flows through it."]
    assert split_statements(" ... \n") == []
    # a title or abbreviation does not end a statement ("Dr." was judged on its own)
    assert split_statements("Dr. Smith said it works. It is fast, e.g. 2 ms. Mr. Li agreed.") \
        == ["Dr. Smith said it works.", "It is fast, e.g. 2 ms.", "Mr. Li agreed."]
    # Chinese and Japanese put no space after a full stop: each sentence is still one
    assert split_statements("巴黎是法国的首都。它很美\uff01你去过吗\uff1f") == [
        "巴黎是法国的首都。", "它很美\uff01", "你去过吗\uff1f"]


def test_selections_become_the_text_a_person_reads() -> None:
    assert as_text({"question": "Why?", "lang": "en"}) == "Why?"
    assert as_text({"q": "Why?"}) == "Why?"
    assert as_text(None) == ""
    assert as_text(["a", "b"]) == "a\nb"


def test_the_budget_keeps_short_fields_whole_and_truncates_long_ones() -> None:
    fields = {"question": "Why is the sky blue?", "answer": "x" * 40_000}
    fitted = fit_prompt("instructions " * 20, fields, max_tokens=1000,
                        on_over_budget="truncate")
    assert fitted.fields["question"] == fields["question"]
    assert "truncated by Scrutiny" in fitted.fields["answer"]
    total = estimate_tokens("instructions " * 20) + sum(
        estimate_tokens(v) for v in fitted.fields.values())
    assert total <= 1000
    assert fitted.notice is not None
    assert "answer 40,000 ->" in fitted.notice
    assert fit_prompt("x", fields, max_tokens=None, on_over_budget="skip").fields == fields


@pytest.mark.parametrize(("answer", "score"), [
    ("9" + "\n" * 400 + "Reasons: on topic", 0.9),  # a small model's run of blank lines
    ("9" + " " * 400 + "- on topic", 0.9),
    ("```json" + " " * 2000 + '{"score": 7}', 0.7),  # a fence never closed (cut off)
])
def test_answers_padded_with_long_runs_of_spaces_are_read(answer: str, score: float) -> None:
    # Optional runs of spaces side by side in the patterns backtracked over every way of
    # splitting a long run (cubic): 400 blank lines after "9" took seconds, thousands
    # hours (this test then runs into the suite's timeout). bench/parse.py measures it.
    assert parse_score(answer).score == pytest.approx(score)
    with contextlib.suppress(InvalidFeedbackValue):
        parse_statement_scores(answer, 2)


@pytest.mark.parametrize("answer", ["7\n" * 16_000, "Score: 7\n7\n" * 8_000,
                                    "Reasons: looping.\n" + "**7**\n" * 16_000])
def test_a_looping_answer_of_score_lines_is_read_in_linear_time(answer: str) -> None:
    # Each line alone on its line was checked against every score read before it: 16,000
    # lines of "7" (a looping model, 32 KB) took 15 s on the evaluation loop. Now about
    # 0.05 s; the bound is generous for a slow machine.
    start = time.perf_counter()
    assert parse_score(answer, 10, quoted=["The source.\n" * 1000]).score == 0.7
    with pytest.raises(InvalidFeedbackValue, match="several different scores"):
        parse_score(answer + "8\n", 10)
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(("answer", "why"), [
    # a leading score that is a range was read as its first number, the rest as reasons
    ("8 - 9", "a range"),
    ("**7 \u2013 8**", "a range"),
    ("8/10 - 9/10", "a range"),
    # a second score on a line of its own was taken for the reasons of the first
    ("8\n9", "several different scores"),
    ("7/10\n\n8/10", "several different scores"),
    ("Score: 7\nReasons: vague.\n**8**", "several different scores"),
    # a second JSON object after the answer's JSON
    ('{"score": 8}\n{"score": 3}', "several different scores"),
    ('{"score": 8, "reasons": "ok"}\n\n```json\n{"score": 3}\n```', "several different scores"),
    # 1.0 is the top of a 0-1 scale: read on the 0-10 scale, the best answers scored 0.1
    ("1.0", "0-1 scale"),
    ("Score: 1.0", "0-1 scale"),
    ('{"score": 1.0, "reasons": "perfect"}', "0-1 scale"),
    ('{"score": "1.0"}', "0-1 scale"),
])
def test_misreadings_of_ranges_second_scores_and_0_1_answers_fail(answer: str,
                                                                  why: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match=why) as info:
        parse_score(answer, 10)
    assert info.value.value == answer
    if answer.startswith("["):
        return
    with pytest.raises(InvalidFeedbackValue):  # one statement: read as a plain score
        parse_statement_scores(answer, 1)


@pytest.mark.parametrize(("answer", "score", "reasons"), [
    # a decimal comma (French, German, Spanish judges): 8,5 was read as 8 with reasons "5"
    ("Score: 8,5", 0.85, ""),
    ("Score: 8,5/10", 0.85, ""),
    ("8,5", 0.85, ""),
    ('{"score": "7,5", "reasons": "gut"}', 0.75, "gut"),
    ("Score: 8, because it is on topic", 0.8, "because it is on topic"),  # no decimal
    # the reasons first, then the score on a line of its own
    ("The answer names the capital.\n\n8", 0.8, "The answer names the capital."),
    ("It covers 8 facts.\n**8/10**", 0.8, "It covers 8 facts."),
    # the same score said again is cut out where it stands, not the first "8" of the text
    ("Score: 8\nCovers 8 facts.\n8", 0.8, "Covers 8 facts."),
    ("Score: -0", 0.0, ""),  # 0, not -0.0
    ("Score: 1\nReasons: off topic", 0.1, "off topic"),  # an integer 1 is 1 of 10
])
def test_decimal_commas_and_a_score_after_the_reasons_are_read(answer: str, score: float,
                                                              reasons: str) -> None:
    parsed = parse_score(answer, 10)
    assert parsed.score == pytest.approx(score)
    assert str(parsed.score) != "-0.0"
    assert parsed.reasons == reasons


@pytest.mark.parametrize(("answer", "score", "reasons"), [
    # a judge answers in the language it is spoken to: every one of these was "no score"
    ("Puntuación: 8\nRazones: responde a la pregunta", 0.8, "responde a la pregunta"),
    ("Note : 7/10\nRaisons : pertinent", 0.7, "pertinent"),
    ("Bewertung: 9 von 10 - beantwortet die Frage", 0.9, "beantwortet die Frage"),
    ("Punteggio: 6 su 10\nMotivazione: in parte", 0.6, "in parte"),
    ("Pontuação: 8/10 - relevante", 0.8, "relevante"),
    ("Nota: 9\nRazones: responde", 0.9, "responde"),
    ("Оценка: 7\nОбоснование: по теме", 0.7, "по теме"),
    ("评分：8\n理由：回答了问题", 0.8, "回答了问题"),
    ("点数：9\n理由：完全に関連", 0.9, "完全に関連"),
    ("8 de 10 - responde", 0.8, "responde"),
    ('{"puntuación": 7, "razones": "bien"}', 0.7, "bien"),
    ('{"Bewertung": 4, "Begründung": "knapp"}', 0.4, "knapp"),
])
def test_scores_labelled_in_other_languages_are_read(answer: str, score: float,
                                                     reasons: str) -> None:
    parsed = parse_score(answer, 10)
    assert parsed.score == pytest.approx(score)
    assert parsed.reasons == reasons


@pytest.mark.parametrize(("answer", "why"), [
    # "Note" and "Nota" also mean a remark: a count in one is not a score
    ("Note: 3 of the contexts are off topic", "no score"),
    ("Nota: 2 contesti non sono pertinenti", "no score"),
    ("Score: 8\nNote: 3/10 of it is filler", "several different scores"),
    ("Puntuación: 8\nPuntuación: 3", "several different scores"),
    ("Оценка: 12", "outside the scale"),
])
def test_labels_in_other_languages_do_not_misread(answer: str, why: str) -> None:
    with pytest.raises(InvalidFeedbackValue, match=why):
        parse_score(answer, 10)
