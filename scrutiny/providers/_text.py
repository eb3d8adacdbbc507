"""Text helpers shared by the providers: turning selections into text, splitting statements.

Selections are whatever the record holds: a string, a chain's input dict
(``{"question": ...}``), a list of messages or documents. Providers judge text, so they
reduce each selection to the text a person would read.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["as_text", "contexts_text", "normalize_answer", "split_statements"]

_QUESTION_KEYS = ("question", "query", "input", "query_str", "prompt", "text", "content")
# after ". " before a capital or a digit; after an ideographic full stop or a full-width
# "!" or "?" (Chinese and Japanese write no space between sentences: a whole paragraph
# was one statement)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])"
                           r"|(?<=[\u3002\uff01\uff1f])[\u300d\u300f\uff09\"')\]]*\s*(?=\S)")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def as_text(value: Any) -> str:
    """The readable text of a selected value."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        for key in _QUESTION_KEYS:
            if isinstance(value.get(key), str):
                return str(value[key])
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
        return json.dumps(value, ensure_ascii=False, default=str)
    for attr in ("content", "page_content", "text"):  # a message, a document, a node
        inner = getattr(value, attr, None)
        if isinstance(inner, str):
            return inner
    if isinstance(value, Sequence):
        return "\n".join(as_text(v) for v in value)
    return str(value)


def contexts_text(contexts: Any) -> list[str]:
    """A list of context texts from one context or a list of them (empty ones dropped)."""
    if isinstance(contexts, str | bytes | Mapping) or not isinstance(contexts, Sequence):
        items = [contexts]
    else:
        items = list(contexts)
    texts = [as_text(c).strip() for c in items]
    return [t for t in texts if t]


def split_statements(text: str) -> list[str]:
    """The statements of an answer: its lines, bullets and sentences, in order."""
    statements: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        if not line:
            continue
        for part in _SENTENCE_END.split(line):
            part = part.strip()
            if any(ch.isalnum() for ch in part):
                statements.append(part)
    return statements


# Scripts written without spaces between words: each character counts as a word (as
# MLQA and CMRC score Chinese), or a whole sentence was one token and a one-character
# difference scored 0.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORDS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def words(text: str) -> list[str]:
    """The words of `text`: runs of letters and digits in any script, each character of
    Chinese and Japanese text on its own."""
    return _WORDS.findall(text)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalization)."""
    lowered = text.casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", lowered).split())
