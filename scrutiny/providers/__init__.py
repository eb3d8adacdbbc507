"""Feedback providers: LLM judges over any LangChain or LlamaIndex model, and offline
evaluators (embedding similarity, lexical metrics, sentiment, PII, ground truth).

Importing this package imports neither LangChain nor LlamaIndex nor any optional
dependency; each is imported when first used, and a missing one raises an error that
names the extra to install (``pip install 'scrutiny[embeddings]'``, ``[lexical]``,
``[sentiment]``).
"""

from __future__ import annotations

from scrutiny.providers._embeddings import Embeddings
from scrutiny.providers._errors import TransientJudgeError
from scrutiny.providers._ground_truth import GroundTruth
from scrutiny.providers._judge import LLMJudge
from scrutiny.providers._lexical import (
    Contains,
    LengthBounds,
    Regex,
    Rouge,
    bleu,
    exact_match,
    token_f1,
)
from scrutiny.providers._pii import PIIDetector, PIIMatch
from scrutiny.providers._presets import RagTriad, rag_triad
from scrutiny.providers._sentiment import sentiment

__all__ = [
    "Contains",
    "Embeddings",
    "GroundTruth",
    "LLMJudge",
    "LengthBounds",
    "PIIDetector",
    "PIIMatch",
    "RagTriad",
    "Regex",
    "Rouge",
    "TransientJudgeError",
    "bleu",
    "exact_match",
    "rag_triad",
    "sentiment",
    "token_f1",
]
