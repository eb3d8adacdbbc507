"""Offline sentiment with VADER (``pip install 'scrutiny[sentiment]'`` for vaderSentiment).

VADER is a lexicon and a handful of rules: no model, no download, fast enough to run for
every record. Its analyzer is built once per process, on first use.

VADER reads English only. A text written mostly in another script (Chinese, Cyrillic,
Greek, Arabic, ...) is `skipped` with the reason: it was rated a flat "neutral" 0.5, which
pulled means toward neutral. When no word of a text carries sentiment for VADER, the
explanation says so.
"""

from __future__ import annotations

import importlib.util
import threading
import unicodedata
from typing import Any

from scrutiny.core import SkipFeedback
from scrutiny.core._feedback import DEFAULTS_ATTRIBUTE
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import as_text

__all__ = ["sentiment"]

_lock = threading.Lock()
_analyzer: Any = None


def _require_vader() -> None:
    if importlib.util.find_spec("vaderSentiment") is None:
        raise missing_extra("scrutiny.providers.sentiment", "sentiment", "vaderSentiment")


def _get_analyzer() -> Any:
    global _analyzer
    if _analyzer is None:
        with _lock:
            if _analyzer is None:
                _require_vader()
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def _latin_share(text: str) -> float | None:
    """The share of the text's letters that are Latin (None: no letters at all)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    latin = sum(1 for c in letters if c.isascii() or "LATIN" in unicodedata.name(c, ""))
    return latin / len(letters)


def sentiment(text: Any) -> tuple[float, str]:
    """How positive the text is: VADER's compound score mapped from [-1, 1] to [0, 1].

    0.5 is neutral; above about 0.53 VADER calls a text positive, below 0.47 negative.
    A text mostly in a non-Latin script is `skipped` (VADER reads English only).

    Raises:
        ModuleNotFoundError: vaderSentiment is missing (``pip install 'scrutiny[sentiment]'``).
    """
    body = as_text(text, answer=True)
    if not body.strip():
        raise SkipFeedback("nothing to rate: the text is empty")
    share = _latin_share(body)
    if share is not None and share < 0.5:
        raise SkipFeedback(f"VADER rates English only, and {1 - share:.0%} of the text's "
                           "letters are in another script")
    scores = _get_analyzer().polarity_scores(body)
    compound = float(scores["compound"])
    label = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
    note = ("; no word of the text carries sentiment in VADER's English lexicon"
            if not scores["pos"] and not scores["neg"] else "")
    return (compound + 1.0) / 2.0, (
        f"{label} (VADER compound {compound:+.3f}; positive {scores['pos']:.2f}, "
        f"neutral {scores['neu']:.2f}, negative {scores['neg']:.2f}{note})")


# (checked when the feedback is made, as Rouge() and Embeddings() are: without the extra,
# every result of a whole run ended `failed` before the user heard of it)
setattr(sentiment, DEFAULTS_ATTRIBUTE, {"check": _require_vader})
