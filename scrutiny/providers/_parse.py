"""Reading a score out of a judge model's answer, strictly.

A judge is asked for JSON (``{"score": <0-10>, "reasons": "..."}``) on a stated scale. Its
answer is accepted when it is that JSON, a bare number on the scale (``"7"``, ``"7/10"``),
or plain text with exactly one ``Score: 7`` line. Everything else — no number, invalid or
cut-off JSON, a number outside the scale, two different scores — raises
:class:`InvalidFeedbackValue` with the raw answer kept, so the result ends `failed` with the
text that caused it: never 0, never -1, never a number picked out of an echoed prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scrutiny.core import InvalidFeedbackValue

__all__ = ["ParsedScore", "parse_score", "parse_statement_scores"]

_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_BARE = re.compile(rf"^\s*\**\s*({_NUMBER})\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?\s*\**\s*\.?\s*$",
                   re.IGNORECASE)
_LABELLED = re.compile(
    rf"(?<![\w\"'])(?:final\s+)?(?:score|rating|grade)\s*\**\s*[:=]\s*\**\s*({_NUMBER})"
    rf"\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)
_REASON_KEYS = ("reasons", "reason", "explanation", "rationale", "justification")
_SCORE_KEYS = ("score", "rating", "grade")
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
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _embedded_json(body: str) -> Any:
    """A JSON object inside a prose answer ("Here is my verdict: {...}"), or None."""
    start = body.find("{")
    end = body.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        return json.loads(body[start:end + 1])
    except ValueError:
        return None


def _load_json(candidate: str, raw: str) -> Any:
    try:
        return json.loads(candidate)
    except ValueError:
        pass
    try:  # the object, then prose after it ("{...}\n\nLet me know if ...")
        value, _end = json.JSONDecoder().raw_decode(candidate)
        return value
    except ValueError:
        opened = candidate.count("{") + candidate.count("[")
        closed = candidate.count("}") + candidate.count("]")
        hint = "cut off" if opened > closed else "not valid JSON"
        raise _invalid(f"the judge's JSON answer is {hint}", raw) from None


def _number(value: Any, raw: str, scale: float) -> float:
    """A number on the judge's scale, from a JSON value (number, or "7" / "7/10")."""
    denominator = scale
    if isinstance(value, bool) or value is None:
        raise _invalid(f"the score is {value!r}, not a number", raw)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        match = _BARE.match(value)
        if not match:
            raise _invalid(f"the score {value!r} is not a number", raw)
        number = float(match.group(1))
        if match.group(2):
            denominator = float(match.group(2))
    else:
        raise _invalid(f"the score is a {type(value).__name__}, not a number", raw)
    return _normalize(number, denominator, raw)


def _normalize(number: float, denominator: float, raw: str) -> float:
    """`number` out of `denominator` as a fraction; a fraction states its own scale."""
    if not math.isfinite(number):
        raise _invalid(f"the score {number} is not a finite number", raw)
    if denominator <= 0:
        raise _invalid(f"the score is out of {denominator:g}", raw)
    if number < 0 or number > denominator:
        raise _invalid(f"the score {number:g} is outside the scale 0-{denominator:g}", raw)
    return number / denominator


def _reasons_of(obj: Mapping[str, Any]) -> str:
    lowered = {str(k).lower(): v for k, v in obj.items()}  # ("Reasons", as "Score" is read)
    for key in _REASON_KEYS:
        value = lowered.get(key)
        if value:
            if isinstance(value, list):
                return "; ".join(str(v) for v in value)
            return str(value)
    return ""


def _score_of(obj: Mapping[str, Any], raw: str, scale: float) -> float:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in _SCORE_KEYS:
        if key in lowered:
            return _number(lowered[key], raw, scale)
    raise _invalid("the judge's JSON has no 'score'", raw)


def _echoed(text: str, quoted: Sequence[str]) -> bool:
    """Whether `text` (a line of the answer, a JSON object in it) is copied from what the
    judge was asked to read: a model that echoes its prompt (LlamaIndex's MockLLM) or
    quotes a context holding "Guest rating: 4/5" has not given a score."""
    piece = text.strip()
    return bool(piece) and any(piece in q for q in quoted)


def _line_of(body: str, match: re.Match[str]) -> str:
    start = body.rfind("\n", 0, match.start()) + 1
    end = body.find("\n", match.end())
    return body[start:] if end == -1 else body[start:end]


def parse_score(raw: str, scale: float = 10, *, quoted: Sequence[str] = ()) -> ParsedScore:
    """Read one score on ``0..scale`` from a judge's answer and normalize it to [0, 1].

    Args:
        raw: the model's answer, as text.
        scale: the top of the scale the prompt stated.
        quoted: the texts the judge was given to read (question, answer, contexts): a
            "score: n" line or JSON object copied from them is not the judge's score.

    Raises:
        InvalidFeedbackValue: no score, an invalid or cut-off JSON answer, a score outside
            the scale, or several different scores; `.value` is the raw answer.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("the judge gave an empty answer", str(raw))
    body = _strip_fence(raw).strip()
    if body.startswith(("{", "[")):
        data = _load_json(body, raw)
        if isinstance(data, Mapping):
            return ParsedScore(_score_of(data, raw, scale), _reasons_of(data))
        raise _invalid("the judge's JSON is not an object with a 'score'", raw)
    bare = _BARE.match(body)
    if bare:
        return ParsedScore(_from_match(bare, raw, scale), "")
    embedded = _embedded_json(body)
    if isinstance(embedded, Mapping) and any(str(k).lower() in _SCORE_KEYS for k in embedded) \
            and not _echoed(body[body.find("{"):body.rfind("}") + 1], quoted):
        return ParsedScore(_score_of(embedded, raw, scale), _reasons_of(embedded))
    found = [m for m in _LABELLED.finditer(body) if not _echoed(_line_of(body, m), quoted)]
    values = {(m.group(1), m.group(2)) for m in found}
    if len(values) > 1:
        raise _invalid("the judge gave several different scores", raw)
    if not found:
        raise _invalid(f"no score on the scale 0-{scale:g} found", raw)
    match = found[0]
    reasons = (body[:match.start()] + body[match.end():]).strip(" \n\t-*:#")
    reasons = re.sub(r"^(?:reasons?|explanation)\s*[:=]\s*", "", reasons, flags=re.IGNORECASE)
    return ParsedScore(_from_match(match, raw, scale), reasons.strip())


def _from_match(match: re.Match[str], raw: str, scale: float) -> float:
    number = float(match.group(1))
    denominator = float(match.group(2)) if match.group(2) else scale
    return _normalize(number, denominator, raw)


def parse_statement_scores(raw: str, count: int, scale: float = 10) -> list[ParsedScore]:
    """Read one score per statement (groundedness) from a JSON answer.

    Accepted shapes: ``{"statements": [{"statement": 1, "score": 7, "reason": ".."}, ..]}``,
    the same list at the top level, or a list of bare numbers. There must be exactly
    `count` verdicts, one per statement, in order (or numbered).

    Raises:
        InvalidFeedbackValue: not that JSON, cut off, a verdict missing or out of range.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid("the judge gave an empty answer", str(raw))
    body = _strip_fence(raw).strip()
    if body.startswith(("{", "[")):
        data = _load_json(body, raw)
    else:
        data = _embedded_json(body)
        if data is None:
            if count == 1:  # one statement: a plain score is unambiguous
                return [parse_score(raw, scale)]
            raise _invalid("the judge's answer is not JSON", raw)
    items: Any = data
    if isinstance(data, Mapping):
        items = next((data[k] for k in ("statements", "verdicts", "scores") if k in data), None)
        if items is None and count == 1 and any(k in data for k in _SCORE_KEYS):
            items = [data]
    if not isinstance(items, list):
        raise _invalid("the judge's JSON has no list of statement verdicts", raw)
    if len(items) != count:
        raise _invalid(f"the judge gave {len(items)} verdict(s) for {count} statement(s)", raw)
    verdicts: list[ParsedScore | None] = [None] * count
    for position, item in enumerate(items):
        index = position
        if isinstance(item, Mapping):
            number = item.get("statement", item.get("id"))
            if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= count:
                index = number - 1
            parsed = ParsedScore(_score_of(item, raw, scale), _reasons_of(item))
        else:
            parsed = ParsedScore(_number(item, raw, scale), "")
        if verdicts[index] is not None:
            raise _invalid(f"the judge gave two verdicts for statement {index + 1}", raw)
        verdicts[index] = parsed
    return [v for v in verdicts if v is not None]
