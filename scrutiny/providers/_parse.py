"""Reading a score out of a judge model's answer, strictly.

A judge is asked for JSON (``{"score": <0-10>, "reasons": "..."}``) on a stated scale. Its
answer is accepted when it is that JSON, a bare number on the scale (``"7"``, ``"7/10"``),
a first line that is a score followed by reasons (``"8/10 - mostly relevant"``), or plain
text with ``Score: 7`` lines (or lines that are only a score, after the reasons) that agree
(labelled in the judge's language too: ``Puntuación: 7``, ``Note : 7/10``, ``评分`` and a
full-width colon);
a decimal comma is a decimal (``"8,5"``). A reasoning model's ``<think>...</think>`` block
before its answer is set aside. Everything else — no number, invalid or cut-off JSON, a
reasoning block that never closes, a number outside the scale, a fraction such as ``0.7``
or ``1.0`` on the 0-10 scale (a 0-1 answer: read as 0.07 or 0.1 it would be a silent
misreading), a range (``"8-9"``), two different scores anywhere in the answer — raises
:class:`InvalidFeedbackValue` with the raw answer kept, so the result ends `failed` with the
text that caused it: never 0, never -1, never a number picked out of an echoed prompt.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scrutiny.core import InvalidFeedbackValue

__all__ = ["ParsedScore", "parse_score", "parse_statement_scores"]

if sys.version_info >= (3, 11):
    _regex = re
else:  # (possessive quantifiers, "*+", came to `re` with Python 3.11; `regex` has them)
    import regex as _regex

_FENCE_LANGUAGE = _regex.compile(r"(?:[a-zA-Z][\w+.-]*+)?")  # (json, json5, jsonc, ...)
# A judge answers in the language it is spoken to (a rubric in Italian, a question in
# Spanish): "Punteggio: 8", "Note : 7/10", "评分" and a full-width colon, then 8, are scores
# as "Score: 8" is. The words that also mean a remark ("Note:", "Nota:" — "Note: 3 contexts
# are off topic") are a score only with their scale ("Note : 8/10") or alone on their line
# ("Nota: 9").
_SCORE_KEYS = (
    "score", "rating", "grade", "puntuación", "puntuacion", "puntaje", "calificación",
    "calificacion", "valoración", "punteggio", "voto", "valutazione", "pontuação",
    "pontuacao", "avaliação", "bewertung", "wertung", "punktzahl", "punkte", "beoordeling",
    "cijfer", "ocena", "wynik", "puan", "skor", "оценка", "балл", "баллы", "баллов",
    "рейтинг", "评分", "分数", "得分", "打分", "評分", "分數", "スコア", "評価", "点数",
    "점수", "평가")


def _one_of(words: Sequence[str]) -> str:
    """A pattern matching any of `words`, factored by their common beginnings: the regex
    engine tries a plain alternation's words one by one at every position of the text
    (fifty words made parsing three times slower); a tree of them, one letter at a time."""
    tree: dict[str, Any] = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in node.items() if char]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 and len(branches[0]) == 1 else \
            f"(?:{'|'.join(branches)})"
        return f"{group}?" if "" in node else group

    return pattern(tree)


_SCORE_WORDS = _one_of(_SCORE_KEYS)
_REMARK_WORDS = r"note|nota"
# "out of", as the scale is said: "8/10", "8 out of 10", "8 sur 10", "8 su 10", "8 von 10",
# "8 de 10", "8 van 10", "8 из 10", "8 na 10"
_OUT_OF = r"(?:/|\uff0f|out\s++of|sur|su|von|de|van|из|na)"  # (\uff0f: a full-width slash)
_COLON = r"[:=\uff1a]"  # (\uff1a: a full-width colon)
# (a decimal comma too, as French, German or Spanish write a score: "8,5" is 8.5, not 8 and
# the reasons "5"; "8, because" and "1,000" are no decimals)
_NUMBER = r"[-+]?\d+(?:\.\d+|,\d{1,2}(?![\d,]))?"
# Possessive quantifiers ("*+") throughout: runs of spaces and stars next to each other,
# each optional, let the engine try every way of splitting a long run between them ("9", a
# thousand blank lines, then the reasons: minutes on an evaluation thread).
_BARE = _regex.compile(rf"^\s*+\**+\s*+({_NUMBER})\s*+(?:{_OUT_OF}\s*+(\d+(?:\.\d+)?))?"
                       rf"\s*+\**+\s*+\.?\s*+$", _regex.IGNORECASE)
_LABELLED = _regex.compile(
    rf"(?<![\w\"'])(?:final\s+)?(?:{_SCORE_WORDS}|(?:{_REMARK_WORDS})(?=\s*+\**+\s*+{_COLON}"
    rf"\s*+\**+\s*+{_NUMBER}\**+(?:\s*+{_OUT_OF}\s*+\**+\s*+\d|[ \t]*+\.?[ \t]*+(?:\n|$))))"
    rf"\s*+\**+\s*+{_COLON}\s*+\**+\s*+({_NUMBER})(?![\d.]*[eE][-+]?\d)\**+\s*+"
    rf"(?:{_OUT_OF}\s*+\**+\s*+(\d+(?:\.\d+)?))?"
    rf"(\s*+(?:-|\u2013|\u2014|to)\s*+(\d+(?:\.\d+)?))?",
    _regex.IGNORECASE,
)
# A first line that is a score and then the reasons: "9" alone, "8/10 - mostly relevant",
# "7 out of 10: partly answers", "9 - on topic". (Not "3. The answer ...": a numbered list.)
_LEADING = _regex.compile(
    rf"^[ \t]*+\**+[ \t]*+({_NUMBER})(?:"
    rf"[ \t]*+{_OUT_OF}[ \t]*+(\d+(?:\.\d+)?)[ \t]*+\**+[ \t]*+(?:[-\u2013\u2014:,;.(]|\n|$)"
    rf"|[ \t]*+\**+[ \t]*+\.?[ \t]*+(?:\n|$)"
    rf"|[ \t]*+\**+[ \t]*+[-\u2013\u2014][ \t])",
    _regex.IGNORECASE,
)
# A leading score that is a range: "8 - 9", "**7 - 8**", "8/10 - 9/10" ("7 - 2 minor
# issues" is a score and then its reasons: the second number is the smaller)
_LEADING_RANGE = _regex.compile(
    rf"[ \t]*+\**+[ \t]*+({_NUMBER})(?:[ \t]*+{_OUT_OF}[ \t]*+\d+(?:\.\d+)?)?[ \t]*+\**+"
    rf"[ \t]*+(?:-|\u2013|\u2014|to)[ \t]*+\**+[ \t]*+(\d+(?:\.\d+)?)", _regex.IGNORECASE)
# A line that is a score and nothing else ("9", "**8/10**"), anywhere in the answer: the
# score after the reasoning, or a second score after the first ("8\n9": two scores)
_BARE_LINE = _regex.compile(rf"^[ \t]*+\**+[ \t]*+({_NUMBER})[ \t]*+(?:{_OUT_OF}[ \t]*+"
                            rf"(\d+(?:\.\d+)?))?[ \t]*+\**+[ \t]*+\.?[ \t]*+$",
                            _regex.IGNORECASE | _regex.MULTILINE)
# A score key of a JSON object in the prose after the JSON answer ('{"score": 8}' and then
# '{"score": 3}': two scores)
_JSON_SCORE = _regex.compile(rf"[\"'](?:{_SCORE_WORDS})[\"']\s*+:\s*+[\"']?({_NUMBER})"
                             rf"(?:\s*+/\s*+(\d+(?:\.\d+)?))?", _regex.IGNORECASE)
_THINK = _regex.compile(r"^\s*<(think|thinking|reasoning)>.*?</\1>",
                        _regex.DOTALL | _regex.IGNORECASE)
_THINK_OPEN = _regex.compile(r"^\s*<(?:think|thinking|reasoning)>", _regex.IGNORECASE)
_THINK_CLOSE = _regex.compile(r"</(?:think|thinking|reasoning)>", _regex.IGNORECASE)
_REASON_WORDS = (
    "reasons", "reason", "reasoning", "explanation", "rationale", "justification",
    "razones", "razón", "razon", "motivo", "motivos", "explicación", "justificación",
    "raisons", "raison", "explication", "begründung", "erklärung",
    "motivazione", "spiegazione", "ragioni", "razões", "justificativa", "explicação",
    "toelichting", "uzasadnienie", "обоснование", "объяснение", "причины", "理由", "原因",
    "解释", "説明", "이유", "설명")
_REASONS_LABEL = _regex.compile(
    rf"^(?:\**+\s*+)(?:{_one_of(_REASON_WORDS)})\s*+\**+\s*+{_COLON}\s*+\**+\s*+",
    _regex.IGNORECASE)
_REASON_KEYS = _REASON_WORDS
_EXCERPT = 160


@dataclass(frozen=True, slots=True)
class ParsedScore:
    """A score normalized to [0, 1] and the judge's reasons (empty when it gave none)."""

    score: float
    reasons: str


def _excerpt(raw: str) -> str:
    text = " ".join(raw.split())
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "...")


def _invalid(message: str, raw: str) -> InvalidFeedbackValue:
    return InvalidFeedbackValue(f"{message}; the judge answered {_excerpt(raw)}", value=raw)


def _strip_fence(text: str) -> str:
    """What a ```` ```json ... ``` ```` fence holds (the text itself when it is not fenced).
    (Without a regex: one with optional whitespace on both sides of a lazy ``.*?`` took
    minutes on an answer with a long run of spaces after its opening fence.)"""
    stripped = text.strip()
    if len(stripped) < 6 or not stripped.startswith("```") or not stripped.endswith("```"):
        return text
    inner = stripped[3:-3]
    language = _FENCE_LANGUAGE.match(inner)  # (it matches, the empty string at least)
    return inner[language.end() if language else 0:].strip()


class _TwoValues(Exception):
    """A JSON object of the judge's gives a score key twice, with different values."""


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it gives a score (its scale, a statement's number)
    twice with different values: ``{"score": 8, "score": 3}`` was read as its last, 0.3."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        folded = key.lower()  # ("Score" is read as "score" is)
        if folded in _CHECKED_KEYS:
            if folded in seen and seen[folded] != value:
                raise _TwoValues(key)
            seen[folded] = value
    return dict(pairs)


_DECODER = json.JSONDecoder(object_pairs_hook=_checked_object)


def _decoded(text: str, raw: str, start: int = 0) -> tuple[Any, int]:
    """`_DECODER.raw_decode`, an object with two different scores failing the answer."""
    try:
        return _DECODER.raw_decode(text, start)
    except _TwoValues as exc:
        raise _invalid(f"the judge gave several different scores (its JSON gives "
                       f"{exc.args[0]!r} twice)", raw) from None


def _embedded_json(body: str, raw: str, wanted: Callable[[Mapping[str, Any]], bool],
                   quoted: Sequence[str]) -> tuple[Mapping[str, Any], str] | None:
    """The first JSON object inside a prose answer ("Here is my verdict: {...}") that is
    `wanted` and not copied from what the judge read, and the prose around it; or None.
    (Each object on its own: read from the first "{" to the last "}", a verdict in prose
    holding braces of its own, "the set {1, 2}", was no JSON and so no score.)"""
    for data, start, end in _json_objects(body, raw):
        if isinstance(data, Mapping) and wanted(data) and not _echoed(body[start:end], quoted):
            return data, f"{body[:start]}\n{body[end:]}"
    return None


def _has_score(data: Mapping[str, Any]) -> bool:
    return any(str(k).lower() in _SCORE_KEYS for k in data)


def _load_json(candidate: str, raw: str) -> tuple[Any, int]:
    """The JSON value at the start of `candidate`, and where it ends (prose may follow)."""
    try:  # the object, and any prose after it ("{...}\n\nLet me know if ...")
        return _decoded(candidate, raw)
    except ValueError:
        opened = candidate.count("{") + candidate.count("[")
        closed = candidate.count("}") + candidate.count("]")
        hint = "cut off" if opened > closed else "not valid JSON"
        raise _invalid(f"the judge's JSON answer is {hint}", raw) from None


def _number(value: Any, raw: str, scale: float, *, stated: bool = True) -> float:
    """A number on the judge's scale, from a JSON value (number, or "7" / "7/10").

    `stated`: `scale` is the one the prompt stated, not one the judge gave beside its score
    (``"out_of": 5``), which a "7/10" of its own must agree with.
    """
    denominator = scale
    if isinstance(value, bool) or value is None:
        raise _invalid(f"the score is {value!r}, not a number", raw)
    if isinstance(value, int | float):
        number = float(value)
        decimal = isinstance(value, float)
    elif isinstance(value, str):
        match = _BARE.match(value)
        if not match:
            raise _invalid(f"the score {value!r} is not a number", raw)
        number = _float(match.group(1))
        decimal = not match.group(1).lstrip("+-").isdigit()
        if match.group(2):
            denominator = float(match.group(2))
            if not stated and not math.isclose(denominator, scale):
                raise _invalid(f"the score {value!r} is not out of the {scale:g} the judge "
                               "gave beside it", raw)
            stated = False
    else:
        raise _invalid(f"the score is a {type(value).__name__}, not a number", raw)
    return _normalize(number, denominator, raw, stated=stated, decimal=decimal)


def _float(number: str) -> float:
    """A number as the patterns match it (a decimal comma read as a point)."""
    return float(number.replace(",", "."))


def _normalize(number: float, denominator: float, raw: str, *, stated: bool = False,
               decimal: bool = False) -> float:
    """`number` out of `denominator` as a fraction; a fraction states its own scale.

    `stated`: the denominator is the scale the prompt stated (the answer gave none). A
    score strictly between 0 and 1 on a stated scale of more than 1 is a 0-1 answer
    (``{"score": 0.7}`` when asked for 0-10): read on the stated scale it was 0.07. So is
    a `decimal` 1 (``1.0``: the top of a 0-1 scale, read as 0.1 the best answers scored
    lowest); an integer 1 is 1 on the stated scale.
    """
    if not math.isfinite(number):
        raise _invalid(f"the score {number} is not a finite number", raw)
    if denominator <= 0:
        raise _invalid(f"the score is out of {denominator:g}", raw)
    if number < 0 or number > denominator:
        raise _invalid(f"the score {number:g} is outside the scale 0-{denominator:g}", raw)
    if stated and denominator > 1 and (0 < number < 1 or (number == 1 and decimal)):
        shown = f"{number:g}" if number < 1 else "1.0"
        raise _invalid(f"the score {shown} looks like it is on a 0-1 scale, not the stated "
                       f"0-{denominator:g}", raw)
    return number / denominator + 0.0  # (+ 0.0: "-0" is 0, not -0.0)


def _reasons_of(obj: Mapping[str, Any]) -> str:
    lowered = {str(k).lower(): v for k, v in obj.items()}  # ("Reasons", as "Score" is read)
    for key in _REASON_KEYS:
        value = lowered.get(key)
        if value:
            if isinstance(value, list):
                return "; ".join(str(v) for v in value)
            return str(value)
    return ""


_OUT_OF_KEYS = ("out_of", "max_score", "max", "scale", "scale_max")
# (keys whose second, different value in one JSON object fails the answer)
_CHECKED_KEYS = frozenset({*_SCORE_KEYS, *_OUT_OF_KEYS, "statement", "id"})
# a scale as a judge writes it beside its score: 5, "5", "0-5", "1 to 5"
_SCALE_TOP = _regex.compile(r"\s*+(?:\d+(?:\.\d+)?\s*+(?:-|\u2013|to)\s*+)?(\d+(?:\.\d+)?)\s*+",
                            _regex.IGNORECASE)


def _stated_scale(value: Any) -> float | None:
    """The top of a scale the judge gave beside its score, or None (none it can mean)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _SCALE_TOP.fullmatch(value)
        if match:
            return float(match.group(1))
    return None


def _score_of(obj: Mapping[str, Any], raw: str, scale: float) -> float:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in _SCORE_KEYS:
        if key in lowered:
            # a scale the judge states beside its score: {"rating": 4, "out_of": 5} is 0.8,
            # and so are {"rating": "4", "out_of": 5} and {"rating": 4, "out_of": "5"}
            stated = next((_stated_scale(lowered[k]) for k in _OUT_OF_KEYS if k in lowered),
                          None)
            if stated is not None:
                return _number(lowered[key], raw, stated, stated=False)
            return _number(lowered[key], raw, scale)
    raise _invalid("the judge's JSON has no 'score'", raw)


def _echoed(text: str, quoted: Sequence[str]) -> bool:
    """Whether `text` (a line of the answer, a JSON object in it) is copied from what the
    judge was asked to read: a model that echoes its prompt (LlamaIndex's MockLLM) or
    quotes a context holding "Guest rating: 4/5" has not given a score."""
    piece = text.strip()
    if not piece:
        return False
    if any(c.isalpha() for c in piece):
        return any(piece in q for q in quoted)
    # A bare number ("9", "**0**", "8/10") is copied only when it is a whole line of what
    # was read: as a fragment it is in any text with that digit (a year, a price), and the
    # judge's real score was dropped — the result failed, or a draft score won.
    alone = re.compile(rf"^[ \t]*{re.escape(piece)}[ \t]*$", re.MULTILINE)
    return any(alone.search(q) for q in quoted)


def _line_of(body: str, match: re.Match[str]) -> str:
    start = body.rfind("\n", 0, match.start()) + 1
    end = body.find("\n", match.end())
    return body[start:] if end == -1 else body[start:end]


def _final_answer(raw: str) -> str:
    """The answer after a reasoning model's ``<think>...</think>`` block (Qwen, DeepSeek-R1
    served through Ollama or vLLM put it in the text). A block that never closes is all
    reasoning and no answer (the model stopped while thinking): a score in it is a draft."""
    text = raw
    closed = _THINK.match(text)
    if closed:
        text = text[closed.end():]
    elif _THINK_OPEN.match(text):
        raise _invalid("the judge's answer is only its reasoning: its <think> block never "
                       "closes (cut off?)", raw)
    else:
        # chat templates that open the block in the prompt: reasoning, "</think>", answer
        ends = list(_THINK_CLOSE.finditer(text))
        if ends:
            text = text[ends[-1].end():]
    if not text.strip():
        raise _invalid("the judge gave no answer after its reasoning", raw)
    return text


def _clean_reasons(text: str) -> str:
    """Reasons as a person reads them: without the score's leftovers ("." ", because" "**")
    or a "Reasons:" label, and without the blank lines where the score's lines were."""
    text = _BLANK_LINES.sub("\n\n", text)
    text = text.strip().lstrip(" \n\t-*:#.,;\u2013\u2014").rstrip(" \n\t*#")
    cleaned: str = _REASONS_LABEL.sub("", text)  # (the regex package is untyped: 3.10)
    return cleaned.strip()


def _candidates(body: str, raw: str, scale: float, quoted: Sequence[str],
                keep: Callable[[re.Match[str]], bool] = lambda _: True,
                ) -> list[tuple[re.Match[str], float]]:
    """Every score the text states (labelled anywhere, or leading its first line) that
    `keep` keeps, each normalized; echoed lines are not the judge's."""
    found: list[tuple[re.Match[str], float]] = []
    seen: dict[str, bool] = {}  # (a looping model repeats its lines: each is looked up once)

    def echoed(line: str) -> bool:
        if line not in seen:
            seen[line] = _echoed(line, quoted)
        return seen[line]

    leading = _LEADING.match(body)
    if leading and keep(leading) and not echoed(_line_of(body, leading)):
        ranged = _LEADING_RANGE.match(body, leading.start())
        if ranged and float(ranged.group(2)) > _float(ranged.group(1)):
            raise _invalid("the judge gave a range, not one score", raw)
        found.append((leading, _from_match(leading, raw, scale)))
    for match in _LABELLED.finditer(body):
        if not keep(match) or echoed(_line_of(body, match)):
            continue
        # "8 - 9" is a range; "7 - 2 minor issues" is a score and then its reasons
        if match.group(3) and float(match.group(4)) > _float(match.group(1)):
            raise _invalid("the judge gave a range, not one score", raw)
        found.append((match, _from_match(match, raw, scale)))
    # A score alone on its line, not one read above. (Those are in order and do not
    # overlap, nor do these lines: one pass over both. Each line checked against all of
    # them took 15 s for an answer of 16,000 lines of "7".)
    read = [(m.start(), m.end()) for m, _ in found]
    stated = bool(found)
    bare = list(_BARE_LINE.finditer(body))
    taken = [False] * len(bare)  # (overlapping a score read above)
    at = 0
    for i, match in enumerate(bare):
        while at < len(read) and read[at][1] <= match.start():
            at += 1
        taken[i] = at < len(read) and read[at][0] < match.end()
    # After a stated score ("Score: 7"), numbers on lines of their own one after another,
    # under a line ending in ":", are a list its reasons give ("the steps:" 1, 2, 3; "the
    # key years:" 1998, 2004), not scores: they
    # failed the result as "several different scores" or "1998 is outside the scale".
    listed = [False] * len(bare)
    if stated:
        run_start = 0
        for i in range(1, len(bare) + 1):
            if i < len(bare) and _next_line(body, bare[i - 1], bare[i]):
                continue
            if i - run_start > 1 and not any(taken[run_start:i]) and \
                    _introduced(body, bare[run_start]):
                listed[run_start:i] = [True] * (i - run_start)
            run_start = i
    for i, match in enumerate(bare):
        if taken[i] or listed[i] or not keep(match) or echoed(match.group(0)):
            continue
        try:
            value = _from_match(match, raw, scale)
        except InvalidFeedbackValue:
            if stated:  # (a number off the scale beside a stated score: not a score)
                continue
            raise
        found.append((match, value))
    return found


def _introduced(body: str, first: re.Match[str]) -> bool:
    """Whether the line before `first`'s ends with ":" (a list's introduction)."""
    end = body.rfind("\n", 0, first.start())
    return end > 0 and body[:end].rstrip(" \t*").endswith(":")


def _next_line(body: str, first: re.Match[str], then: re.Match[str]) -> bool:
    """Whether `then` is on the line right after `first`'s (no blank line between)."""
    gap = body[first.end():then.start()]
    return gap.count("\n") == 1 and not gap.strip()


def _agreeing(score: float, prose: str, raw: str, scale: float, quoted: Sequence[str]) -> float:
    """`score`, unless the prose around the JSON states a different one: a score, or a
    rating on a line of its own (not one the judge quotes mid-sentence: "the hotel has a
    guest rating: 4/5")."""
    def stated(match: re.Match[str]) -> bool:
        before = prose[prose.rfind("\n", 0, match.start()) + 1:match.start()]
        return "score" in match.group(0).lower() or not before.strip(" \t*#>-_")

    try:
        others = _candidates(prose, raw, scale, quoted, keep=stated)
        others += [(m, _from_match(m, raw, scale)) for m in _JSON_SCORE.finditer(prose)
                   if not _echoed(_line_of(prose, m), quoted)]
    except InvalidFeedbackValue:  # (a range, a score off the scale: not this one either)
        raise _invalid("the judge gave several different scores", raw) from None
    if any(not math.isclose(value, score) for _, value in others):
        raise _invalid("the judge gave several different scores", raw)
    return score


def parse_score(raw: str, scale: float = 10, *, quoted: Sequence[str] = ()) -> ParsedScore:
    """Read one score on ``0..scale`` from a judge's answer and normalize it to [0, 1].

    Args:
        raw: the model's answer, as text.
        scale: the top of the scale the prompt stated.
        quoted: the texts the judge was given to read (question, answer, contexts): a
            "score: n" line or JSON object copied from them is not the judge's score.

    Raises:
        InvalidFeedbackValue: no score, an invalid or cut-off JSON answer, a score outside
            the scale, a range, or several different scores; `.value` is the raw answer.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("the judge gave an empty answer", str(raw))
    body = _strip_fence(_final_answer(raw)).strip()
    if body.startswith(("{", "[")):
        data, end = _load_json(body, raw)
        if isinstance(data, Mapping):
            score = _agreeing(_score_of(data, raw, scale), body[end:], raw, scale, quoted)
            return ParsedScore(score, _reasons_of(data))
        raise _invalid("the judge's JSON is not an object with a 'score'", raw)
    bare = _BARE.match(body)
    if bare:
        return ParsedScore(_from_match(bare, raw, scale), "")
    embedded = _embedded_json(body, raw, _has_score, quoted)
    if embedded is not None:  # (and no other score in the prose around it)
        data, prose = embedded
        score = _agreeing(_score_of(data, raw, scale), prose, raw, scale, quoted)
        return ParsedScore(score, _reasons_of(data))
    found = _candidates(body, raw, scale, quoted)
    if not found:
        raise _invalid(f"no score on the scale 0-{scale:g} found", raw)
    score = found[0][1]
    if any(not math.isclose(value, score) for _, value in found):
        raise _invalid("the judge gave several different scores", raw)
    # The reasons are the rest: without the score, or the same score said again (cut out
    # where it stands: a "8" said again is not the first "8" of "covers 8 facts"). (A
    # number after a dash that is no range is the reasons': "7 - 2 minor issues".)
    spans = sorted(_whole_line_if_alone(body, m.start(), m.start(3) if m.re is _LABELLED
                                        and m.group(3) else m.end()) for m, _ in found)
    pieces, at = [], 0
    for start, end in spans:
        pieces.append(body[at:max(at, start)])
        at = max(at, end)
    rest = "\n".join([*pieces, body[at:]])
    return ParsedScore(score, _clean_reasons(rest))


_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")


def _whole_line_if_alone(body: str, start: int, end: int) -> tuple[int, int]:
    """The score's span, or its whole line when what else the line holds is only its
    label's first words or markup ("**Score: 8/10**", "Relevance score: 8/10", "My score:
    8"): those were left in the reasons as "**\n**", "Relevance ", "My "."""
    end = start + len(body[start:end].rstrip())  # (the match may take the line's end)
    line_start = body.rfind("\n", 0, start) + 1
    line_end = body.find("\n", end)
    line_end = len(body) if line_end == -1 else line_end
    markup = " \t*#_>-:|"
    before, after = body[line_start:start].strip(markup), body[end:line_end].strip(markup)
    if not after and len(before) <= 30 and len(before.split()) <= 3 and \
            not any(c in before for c in ".,;!?"):
        return line_start, line_end
    return start, end


def _from_match(match: re.Match[str], raw: str, scale: float) -> float:
    number = _float(match.group(1))
    denominator = float(match.group(2)) if match.group(2) else scale
    return _normalize(number, denominator, raw, stated=not match.group(2),
                      decimal=not match.group(1).lstrip("+-").isdigit())


def parse_statement_scores(raw: str, count: int, scale: float = 10, *,
                           quoted: Sequence[str] = ()) -> list[ParsedScore]:
    """Read one score per statement (groundedness) from a JSON answer.

    Accepted shapes: ``{"statements": [{"statement": 1, "score": 7, "reason": ".."}, ..]}``,
    the same list at the top level, or a list of bare numbers. There must be exactly
    `count` verdicts, one per statement, in order (or numbered). `quoted`: the texts the
    judge was given to read (sources, statements), as :func:`parse_score` takes them.

    Raises:
        InvalidFeedbackValue: not that JSON, cut off, a verdict missing or out of range.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("the judge gave an empty answer", str(raw))
    body = _strip_fence(_final_answer(raw)).strip()
    if body.startswith(("{", "[")):
        data, end = _load_json(body, raw)
        prose = body[end:]
    else:
        # (a JSON object copied from a source is not the judge's)
        embedded = _embedded_json(body, raw, lambda d: _has_score(d) or any(
            k in d for k in _VERDICT_KEYS), quoted)
        if embedded is None:
            if count == 1:  # one statement: a plain score is unambiguous (not an echoed one)
                return [parse_score(raw, scale, quoted=quoted)]
            raise _invalid("the judge's answer is not JSON", raw)
        data, prose = embedded
    items: Any = data
    if isinstance(data, Mapping):
        items = next((data[k] for k in _VERDICT_KEYS if k in data), None)
        if items is None and count == 1 and any(k in data for k in _SCORE_KEYS):
            # one statement, one score: read as a plain score is, with the prose around
            # it ('{"score": 8}' then '{"score": 3}' is two scores)
            return [parse_score(raw, scale, quoted=quoted)]
    if not isinstance(items, list):
        raise _invalid("the judge's JSON has no list of statement verdicts", raw)
    if len(items) != count:
        raise _invalid(f"the judge gave {len(items)} verdict(s) for {count} statement(s)", raw)
    verdicts = [v for v in _verdicts(items, count, raw, scale) if v is not None]
    _no_other_verdicts(verdicts, prose, raw, scale, quoted)
    return verdicts


def _verdicts(items: list[Any], count: int, raw: str, scale: float,
              ) -> list[ParsedScore | None]:
    """The verdict of each statement in `items` (in order, or by number), None where
    `items` gives none."""
    verdicts: list[ParsedScore | None] = [None] * count
    for position, item in enumerate(items):
        index = position
        if isinstance(item, Mapping):
            number = item.get("statement", item.get("id"))
            if isinstance(number, str) and number.strip().isascii() and \
                    number.strip().isdigit():  # ("statement": "2", as judges write it too)
                number = int(number)
            if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= count:
                index = number - 1
            parsed = ParsedScore(_score_of(item, raw, scale), _reasons_of(item))
        else:
            parsed = ParsedScore(_number(item, raw, scale), "")
        if index >= count:
            raise _invalid(f"the judge gave {len(items)} verdict(s) for {count} "
                           "statement(s)", raw)
        if verdicts[index] is not None:
            raise _invalid(f"the judge gave two verdicts for statement {index + 1}", raw)
        verdicts[index] = parsed
    return verdicts


_VERDICT_KEYS = ("statements", "verdicts", "scores")
_MAX_JSON_TRIES = 32  # ('{' in prose that opens no JSON: each try reads up to the next error)


def _json_objects(text: str, raw: str) -> Iterator[tuple[Any, int, int]]:
    """The JSON objects in prose, in order, with where each starts and ends (an object
    inside another is part of it; a "{" that opens no JSON is passed over)."""
    at = 0
    for _ in range(_MAX_JSON_TRIES):
        start = text.find("{", at)
        if start == -1:
            return
        try:
            value, end = _decoded(text, raw, start)
        except ValueError:
            at = start + 1
            continue
        yield value, start, end
        at = end


def _no_other_verdicts(verdicts: list[ParsedScore], prose: str, raw: str, scale: float,
                       quoted: Sequence[str]) -> None:
    """Fail when the prose around the verdicts' JSON gives other verdicts ("On
    reflection: {...}"): which of them the judge meant is not for the parser to pick."""
    if not prose.strip():
        return
    count = len(verdicts)
    if count == 1:  # (one statement: any score in the prose, as for a plain score)
        _agreeing(verdicts[0].score, prose, raw, scale, quoted)
    for data, start, end in _json_objects(prose, raw):
        if _echoed(prose[start:end], quoted) or not isinstance(data, Mapping):
            continue
        items = next((data[k] for k in _VERDICT_KEYS if k in data), None)
        if not isinstance(items, list):
            continue
        try:
            others = _verdicts(items, count, raw, scale)
        except InvalidFeedbackValue:
            raise _invalid("the judge gave two different sets of statement verdicts",
                           raw) from None
        for number, (verdict, other) in enumerate(zip(verdicts, others, strict=True), 1):
            if other is not None and not math.isclose(verdict.score, other.score):
                raise _invalid(f"the judge gave two different verdicts for statement "
                               f"{number}", raw)
