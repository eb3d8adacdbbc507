"""`GroundTruth`: agreement with expected answers, looked up by the record's input.

A question that is not in the set gives a `skipped` result with the reason, never a score.
Questions are matched after normalization (Unicode forms, curly quotes, case, spacing,
trailing punctuation), and a chain input such as ``{"question": "..."}`` is matched by its
question. A question may have several acceptable answers (a list): the answer scores its
best agreement with any of them, as SQuAD scores it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from scrutiny.core import (
    ConfigurationError,
    InvalidFeedbackValue,
    SkipFeedback,
    feedback_defaults,
)
from scrutiny.core._mask import Mask, current_mask, mask_text
from scrutiny.core._missing import is_missing
from scrutiny.providers._lexical import token_f1
from scrutiny.providers._text import as_text

__all__ = ["GroundTruth"]

Metric = Callable[[Any, Any], Any]
"""``metric(answer, expected)`` -> a score, ``(score, explanation)`` or a mapping; may be
async (e.g. ``judge.correctness``)."""

_OPTION_KEYS = ("retry", "rate_limit", "timeout")


_SAME_MARKS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _key(question: Any) -> str:
    """The question as it is matched: Unicode-normalized (a full-width question mark is '?'), curly
    quotes straight, case, spacing and the closing punctuation ignored."""
    text = unicodedata.normalize("NFKC", as_text(question)).translate(_SAME_MARKS)
    return " ".join(text.casefold().split()).rstrip(" ?!.\u3002")


class GroundTruth:
    """Expected answers by question, and a feedback that scores agreement with them.

    Args:
        data: ``{question: expected}``, or rows ``{"question": .., "expected": ..}``
            (``"answer"`` / ``"expected_response"`` also accepted), or ``(question,
            expected)`` pairs. `expected` may be a list of acceptable answers.
        metric: ``metric(answer, expected)`` -> a score in [0, 1] (or ``(score,
            explanation)``, or a mapping with ``"score"``); default :func:`token_f1`. An
            LLM judge's ``judge.correctness`` works too (its retry policy and rate limit
            carry over). A score outside [0, 1] fails the result.
        name: the feedback name (default ``"ground_truth_agreement"``).

    Wire it with ``Feedback(gt.agreement).on_input_output()``.

    Raises:
        ConfigurationError: a row without a question or an expected answer (or with an
            empty one), or the same question twice with different answers.
    """

    def __init__(self, data: Mapping[str, Any] | Iterable[Any], *,
                 metric: Metric = token_f1, name: str = "ground_truth_agreement") -> None:
        if not callable(metric):
            raise ConfigurationError(f"GroundTruth metric must be callable, got {metric!r}")
        self.metric = metric
        self.name = name
        self._expected: dict[str, tuple[str, ...]] = {}
        self._questions: dict[str, str] = {}  # (as given: a session's mask reads these)
        self._masked: tuple[Mask, dict[str, tuple[str, ...]]] | None = None
        rows = data.items() if isinstance(data, Mapping) else data
        for row in rows:
            question, expected = _row(row)
            key = _key(question)
            if key in self._expected and self._expected[key] != expected:
                raise ConfigurationError(f"GroundTruth: question {question!r} has two "
                                         "different expected answers")
            self._expected[key] = expected
            self._questions[key] = as_text(question)
        if not self._expected:
            raise ConfigurationError("GroundTruth needs at least one question")

    def __len__(self) -> int:
        return len(self._expected)

    def __repr__(self) -> str:
        return f"GroundTruth({len(self)} questions, metric={_metric_name(self.metric)})"

    def expected_for(self, question: Any) -> str | list[str] | None:
        """The expected answer of `question` (a list when it has several), or None when it
        is not in the set."""
        found = self._expected.get(_key(question))
        if found is None:
            return None
        return found[0] if len(found) == 1 else list(found)

    def scrutiny_feedback_defaults(self, method: Any) -> dict[str, Any]:
        """Its name, plus the metric's retry policy, rate limit and timeout, if any."""
        if getattr(method, "__name__", None) != "agreement":
            return {}
        inherited = feedback_defaults(self.metric)
        defaults = {k: inherited[k] for k in _OPTION_KEYS if inherited.get(k) is not None}
        defaults["name"] = self.name
        defaults["higher_is_better"] = True
        return defaults

    def _answers(self) -> dict[str, tuple[str, ...]]:
        """The expected answers by question, masked by the mask of the session evaluating
        (its records' questions and answers are masked: an unmasked set never matched a
        question holding a card number, scored a right answer 0.29, and sent the customer's
        data to the judge and into the explanation)."""
        mask = current_mask()
        if mask is None:
            return self._expected
        cached = self._masked
        if cached is not None and cached[0] is mask:
            return cached[1]
        masked = {_key(mask_text(self._questions[key], mask)):
                  tuple(mask_text(e, mask) or "" for e in expected)
                  for key, expected in self._expected.items()}
        self._masked = (mask, masked)
        return masked

    async def agreement(self, question: Any, answer: Any) -> tuple[float, str]:
        """How well `answer` agrees with the expected answer of `question`."""
        references = self._answers().get(_key(question))
        if references is None:
            raise SkipFeedback("the question is not in the ground-truth set")
        best: tuple[float, str, str] | None = None
        for expected in references:
            score, explanation = _score_of(await self._measure(answer, expected))
            if best is None or score > best[0]:
                best = (score, explanation, expected)
            if score >= 1.0:
                break
        assert best is not None
        score, explanation, expected = best
        summary = f"expected {_short(expected)}"
        if len(references) > 1:
            summary += f" (the closest of {len(references)} acceptable answers)"
        summary += f"; {_metric_name(self.metric)}"
        return score, f"{summary}: {explanation}" if explanation else summary

    async def _measure(self, answer: Any, expected: str) -> Any:
        if inspect.iscoroutinefunction(self.metric):
            return await self.metric(answer, expected)
        # a plain metric may be slow (embeddings): keep it off the event loop
        value = await asyncio.to_thread(self.metric, answer, expected)
        if inspect.isawaitable(value):
            value = await value
        return value


def _row(row: Any) -> tuple[str, tuple[str, ...]]:
    if isinstance(row, Mapping):
        question = next((row[k] for k in ("question", "query", "input") if k in row), None)
        expected = next((row[k] for k in ("expected", "answer", "expected_response",
                                          "ground_truth") if k in row), None)
    elif isinstance(row, tuple | list) and len(row) == 2:
        question, expected = row
    else:
        raise ConfigurationError(f"GroundTruth rows are (question, expected) pairs or "
                                 f"mappings; got {row!r}")
    if is_missing(question) or is_missing(expected) or not as_text(question).strip():
        raise ConfigurationError(f"GroundTruth row without a question or expected answer: "
                                 f"{row!r}")
    if isinstance(expected, list | tuple | set | frozenset):
        # several acceptable answers (they were joined into one text, which none matched)
        references = tuple(dict.fromkeys(as_text(e, answer=True) for e in expected))
        if not references:
            raise ConfigurationError(f"GroundTruth row with an empty list of expected "
                                     f"answers: {row!r}")
    else:
        references = (as_text(expected, answer=True),)
    if not all(r.strip() for r in references):
        # (every answer then scored 0 against it, as if wrong, or 1 when just as empty)
        raise ConfigurationError(f"GroundTruth row with an empty expected answer: {row!r}; "
                                 "give the answer expected, or leave the question out")
    return as_text(question), references


def _score_of(value: Any) -> tuple[float, str]:
    explanation: Any = ""
    if isinstance(value, tuple) and len(value) == 2:
        value, explanation = value
    elif isinstance(value, Mapping):
        explanation = value.get("explanation") or value.get("reasons") or ""
        value = value.get("score")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFeedbackValue(f"the ground-truth metric returned {value!r}, not a score",
                                   value=value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        # a metric on another scale (0-10, a percentage) was stored as it was: a 7 beside
        # token F1's 0.7
        raise InvalidFeedbackValue(f"the ground-truth metric returned {value!r}, outside "
                                   "[0, 1]", value=value)
    return float(value), str(explanation or "")


def _metric_name(metric: Any) -> str:
    return str(getattr(metric, "__name__", None) or type(metric).__name__)


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")
