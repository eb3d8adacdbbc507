"""Reading token usage the way providers report it: one reading for recordings and judges.

Providers spell usage differently, and some leave billed tokens out of the count that
looks like the prompt's or the answer's:

- OpenAI and most others: ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens``.
- Anthropic: ``input_tokens`` counts only the prompt tokens *not* read from or written to
  the prompt cache; ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` are the
  rest of the prompt (langchain-anthropic adds them in too). It sends no total.
- Gemini: ``prompt_token_count`` / ``candidates_token_count`` / ``total_token_count``, the
  model's thinking (``thoughts_token_count``, billed as output) outside the candidates'.
- Bedrock Converse: ``inputTokens`` / ``outputTokens`` / ``totalTokens``, with
  ``cacheReadInputTokens`` / ``cacheWriteInputTokens`` outside ``inputTokens``.

A LangChain message's ``usage_metadata`` (``input_tokens`` with the cache already in it,
its details nested in ``input_token_details``) reads as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scrutiny.core._records import TokenUsage

__all__ = ["USAGE_REPEATS", "first_usage", "read_usage"]

USAGE_REPEATS = "usage_repeats"
"""Span metadata an integration sets on a model span that hands on the very response of
another model span of the record (LlamaIndex's `CustomLLM.astream_complete` reads its
`stream_complete`, a sibling span): the id of that span. It is one model call: the
record's usage counts it once, and ``Select.spans(kind="llm")`` selects it once."""

# (key, the keys of the tokens it leaves out that count with it), the first present wins
_PROMPT = (("prompt_tokens", ()),
           ("input_tokens", ("cache_read_input_tokens", "cache_creation_input_tokens")),
           ("prompt_token_count", ()),
           ("inputTokens", ("cacheReadInputTokens", "cacheWriteInputTokens")))
_COMPLETION = (("completion_tokens", ()),
               ("output_tokens", ()),
               ("candidates_token_count", ("thoughts_token_count",)),
               ("outputTokens", ()))
_TOTAL = (("total_tokens", ()), ("total_token_count", ()), ("totalTokens", ()))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _get(usage: Any, key: str) -> int | None:
    return _int(usage.get(key) if isinstance(usage, Mapping) else getattr(usage, key, None))


def _count(usage: Any, keys: tuple[tuple[str, tuple[str, ...]], ...]) -> int | None:
    for key, also in keys:
        value = _get(usage, key)
        if value is not None:
            return value + sum(_get(usage, k) or 0 for k in also)
    return None


def read_usage(usage: Any) -> TokenUsage | None:
    """The token counts of a usage mapping or object (a provider SDK's usage model), in any
    of the spellings above; None when it holds none (a count it lacks stays None; a total
    it lacks is the sum of the other two)."""
    if usage is None or isinstance(usage, str | bytes | int | float):
        return None
    try:
        prompt = _count(usage, _PROMPT)
        completion = _count(usage, _COMPLETION)
        total = _count(usage, _TOTAL)
    except Exception:  # (an object whose attributes cannot be read: no usage)
        return None
    if prompt is None and completion is None and total is None:
        return None
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return TokenUsage(prompt, completion, total)


def first_usage(*candidates: Any) -> TokenUsage | None:
    """The usage of the first candidate that holds any (a response's ``usage``, then its
    ``usage_metadata``, then its extra fields, ...): one in a spelling not read is skipped,
    not taken for "reported none"."""
    for candidate in candidates:
        usage = read_usage(candidate)
        if usage is not None:
            return usage
    return None
