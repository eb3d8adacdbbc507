"""Text helpers shared by the providers: turning selections into text, splitting statements.

Selections are whatever the record holds: a string, a chain's input dict
(``{"question": ...}``), a list of messages or documents, a structured answer (a pydantic
model, a dataclass). Providers judge text, so they reduce each selection to the text a
person would read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["all_text", "as_text", "contexts_text", "normalize_answer", "split_statements"]

_QUESTION_KEYS = ("question", "query", "input", "query_str", "prompt", "text", "content")
# an answer's own fields first: {"input": q, "context": docs, "answer": a} (what
# create_retrieval_chain returns) was read as its question
_ANSWER_KEYS = ("answer", "output", "result", "response", "generation", "final_answer",
                "text", "content")
# after ". " before a capital or a digit; after an ideographic full stop or a full-width
# "!" or "?" (Chinese and Japanese write no space between sentences: a whole paragraph
# was one statement)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])"
                           r"|(?<=[\u3002\uff01\uff1f])[\u300d\u300f\uff09\"')\]]*\s*(?=\S)")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
# (titles and abbreviations that end in a dot but not a sentence)
_ABBREVIATION = re.compile(r"(?:^|[\s(])(?:Dr|Mr|Mrs|Ms|Prof|Sr|Jr|St|Mt|Fig|vs|e\.g|i\.e|"
                           r"cf|approx|E\.g|I\.e)\.$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _fields(value: Any) -> dict[str, Any] | None:
    """The fields of a structured value (a pydantic model, a dataclass), or None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        try:
            dumped = dump()
        except Exception:  # not a pydantic model after all
            return None
        return dumped if isinstance(dumped, dict) else None
    return None


def _own_text(value: Any) -> str | None:
    """The text of a message, a document or a node (content blocks joined), or None."""
    content = getattr(value, "content", None)
    if isinstance(content, list) and hasattr(value, "type"):  # a message's content blocks
        parts = [b if isinstance(b, str) else b.get("text", "") if isinstance(b, Mapping)
                 else "" for b in content]
        return "".join(p for p in parts if isinstance(p, str))
    for attr in ("content", "page_content", "text"):  # a message, a document, a node
        inner = getattr(value, attr, None)
        if isinstance(inner, str):
            return inner
    message = getattr(value, "message", None)  # a chat response (LlamaIndex's ChatResponse)
    if message is not None and not isinstance(message, str) and message is not value:
        return _own_text(message)
    return None


def _stored_text(value: Mapping[str, Any]) -> str | None:
    """The text of a document or a node in its stored (JSON) form, or None: what a worker
    or ``resume_pending`` is given for a context recorded as a LangChain ``Document``
    (``page_content``) or a LlamaIndex ``NodeWithScore`` (its ``node``'s text). Read as
    anything else, a Document was its JSON dump with id and metadata, and a node the
    literal "NodeWithScore": a deferred result judged other text than the same result
    in-process."""
    content = value.get("page_content")
    if isinstance(content, str):
        return content
    node = value.get("node")
    if isinstance(node, Mapping) and ("score" in value
                                      or value.get("class_name") == "NodeWithScore"):
        text = node.get("text")
        if isinstance(text, str):
            return text
    return None


def _json_default(value: Any) -> Any:
    fields = _fields(value)
    return fields if fields is not None else str(value)


def as_text(value: Any, *, answer: bool = False) -> str:
    """The readable text of a selected value.

    A mapping (or a pydantic model, a dataclass) gives its question field
    (``question``, ``query``, ``input``, ...) or, with `answer`, its answer field
    (``answer``, ``output``, ``result``, ...); else its last message (``messages``); else
    its only string; else the whole of it as JSON.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    own = _own_text(value)
    if own is not None:
        return own
    fields = _fields(value)
    if fields is not None:
        value = fields
    if isinstance(value, Mapping):
        stored = _stored_text(value)
        if stored is not None:
            return stored
        for key in _ANSWER_KEYS if answer else _QUESTION_KEYS:
            if isinstance(value.get(key), str):
                return str(value[key])
        messages = value.get("messages")
        if isinstance(messages, Sequence) and not isinstance(messages, str) and messages:
            return as_text(messages[-1], answer=answer)  # a chat's input or a graph's state
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    if isinstance(value, Sequence):
        return "\n".join(as_text(v, answer=answer) for v in value)
    return str(value)


def all_text(value: Any) -> str:
    """Every piece of text in a selected value, one per line: all the strings (and whole
    numbers) of a mapping, a list, a pydantic model or a dataclass, however nested."""
    return "\n".join(_strings(value, 0))


def _strings(value: Any, depth: int) -> Iterator[str]:
    if value is None or isinstance(value, bool | float) or depth > 50:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, int):
        yield str(value)
    elif isinstance(value, bytes | bytearray):
        yield bytes(value).decode("utf-8", errors="replace")
    elif isinstance(value, Mapping):
        stored = _stored_text(value)
        if stored is not None:  # (a document's text, as in-process: not its id, metadata)
            yield stored
            return
        for inner in value.values():
            yield from _strings(inner, depth + 1)
    elif (own := _own_text(value)) is not None:
        yield own
        for call in getattr(value, "tool_calls", None) or ():  # a message's tool arguments
            yield from _strings(call.get("args") if isinstance(call, Mapping) else call,
                                depth + 1)
    elif (fields := _fields(value)) is not None:
        yield from _strings(fields, depth + 1)
    elif isinstance(value, Sequence | set | frozenset):
        for inner in value:
            yield from _strings(inner, depth + 1)
    else:
        yield str(value)


def contexts_text(contexts: Any) -> list[str]:
    """A list of context texts from one context or a list of them (empty ones dropped)."""
    if isinstance(contexts, str | bytes | Mapping) or not isinstance(contexts, Sequence):
        items = [contexts]
    else:
        items = list(contexts)
    texts = [as_text(c).strip() for c in items]
    return [t for t in texts if t]


def split_statements(text: str) -> list[str]:
    """The statements of an answer: its lines, bullets and sentences, in order (a title
    or abbreviation such as "Dr." or "e.g." does not end one: "Dr." was judged alone)."""
    statements: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        if not line:
            continue
        parts: list[str] = []
        for part in _SENTENCE_END.split(line):
            part = part.strip()
            if parts and _ABBREVIATION.search(parts[-1]):
                parts[-1] = f"{parts[-1]} {part}"
            else:
                parts.append(part)
        statements.extend(p for p in parts if any(ch.isalnum() for ch in p))
    return statements


# Scripts written without spaces between words: each character counts as a word (as
# MLQA and CMRC score Chinese), or a whole sentence was one token and a one-character
# difference scored 0. (Thai, Lao, Khmer and Myanmar too: no spaces between words.)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_UNSPACED = _CJK + "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"


@functools.cache
def _unicode_classes() -> tuple[str, dict[int, None]]:
    """The combining marks, as a character class body, and a table deleting punctuation
    (ASCII's and every Unicode P* character). Built once, on first use (about 30 ms)."""
    ranges: list[str] = []
    punctuation: dict[int, None] = dict.fromkeys(map(ord, string.punctuation))
    start = -1
    for cp in [*range(0x20000), *range(0xE0100, 0xE01F0), 0x10FFFF]:
        category = unicodedata.category(chr(cp))
        if category[0] == "P":
            punctuation[cp] = None
        if category[0] == "M" and cp != 0x10FFFF:
            if start < 0:
                start = end = cp
            elif cp == end + 1:
                end = cp
            else:
                ranges.append(f"\\U{start:08x}-\\U{end:08x}")
                start = end = cp
    if start >= 0:
        ranges.append(f"\\U{start:08x}-\\U{end:08x}")
    return "".join(ranges), punctuation


@functools.cache
def _words_pattern() -> re.Pattern[str]:
    # a word keeps its combining marks: Hindi "नमस्ते" was two words ("नमस", "त"), and a
    # decomposed "café" lost its accent
    marks = _unicode_classes()[0]
    return re.compile(rf"[{_UNSPACED}]|(?:[^\W{_UNSPACED}]|[{marks}])+")


def words(text: str) -> list[str]:
    """The words of `text` (NFKC-normalized): runs of letters, digits and combining marks
    in any script; each character of Chinese, Japanese, Thai, Lao, Khmer or Myanmar text
    on its own."""
    return _words_pattern().findall(unicodedata.normalize("NFKC", text))


def normalize_answer(text: str) -> str:
    """Unicode-normalized (NFKC), lower case, no punctuation of any script, no articles,
    single spaces (SQuAD's normalization; MLQA's for the punctuation)."""
    lowered = unicodedata.normalize("NFKC", text).casefold().translate(_unicode_classes()[1])
    return " ".join(_ARTICLES.sub(" ", lowered).split())
