"""Offline sentiment with VADER (``pip install 'scrutiny[sentiment]'`` for vaderSentiment).

VADER is a lexicon and a handful of rules: no model, no download, fast enough to run for
every record. Its analyzer is built once per process, on first use.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

from scrutiny.core import SkipFeedback
from scrutiny.providers._errors import missing_extra
from scrutiny.providers._text import as_text

__all__ = ["sentiment"]

_lock = threading.Lock()
_analyzer: Any = None


def _get_analyzer() -> Any:
    global _analyzer
    if _analyzer is None:
        with _lock:
            if _analyzer is None:
                if importlib.util.find_spec("vaderSentiment") is None:
                    raise missing_extra("scrutiny.providers.sentiment", "sentiment",
                                        "vaderSentiment")
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def sentiment(text: Any) -> tuple[float, str]:
    """How positive the text is: VADER's compound score mapped from [-1, 1] to [0, 1].

    0.5 is neutral; above about 0.53 VADER calls a text positive, below 0.47 negative.

    Raises:
        ModuleNotFoundError: vaderSentiment is missing (``pip install 'scrutiny[sentiment]'``).
    """
    body = as_text(text)
    if not body.strip():
        raise SkipFeedback("nothing to rate: the text is empty")
    scores = _get_analyzer().polarity_scores(body)
    compound = float(scores["compound"])
    label = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
    return (compound + 1.0) / 2.0, (
        f"{label} (VADER compound {compound:+.3f}; positive {scores['pos']:.2f}, "
        f"neutral {scores['neu']:.2f}, negative {scores['neg']:.2f})")
