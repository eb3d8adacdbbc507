"""The prompt budget of a judge: fit the judged texts into `max_prompt_tokens`, or skip.

A prompt is fixed instructions plus variable fields (the question, the answer, each
context). When it is over budget the judge either skips (the result is `skipped`, reason
"too large") or truncates the fields — the longest first, so short fields stay whole — and
says so in the explanation. It never scores a prompt it could not send.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from scrutiny.core import SkipFeedback

__all__ = ["Fitted", "OverBudget", "TokenCounter", "estimate_tokens", "fit_prompt"]

TokenCounter = Callable[[str], int]
"""Counts the tokens of a text (e.g. a tiktoken encoder's ``len(enc.encode(text))``)."""

OverBudget = Literal["truncate", "skip"]

_MARKER = "\n[... truncated by Scrutiny: {omitted} characters omitted ...]"
_MIN_FIELD_TOKENS = 16
_MARGIN_PER_FIELD = 4  # token boundaries at the cut points


# Scripts BPE tokenizers spend a token or more per character on: Chinese, Japanese, Korean,
# the Indic scripts, Thai, Myanmar, Ethiopic (and their full-width forms).
_WIDE = re.compile("[\u0900-\u0dff\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1200-\u139f"
                   "\u2e80-\ua4cf\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
                   "\U00020000-\U0003134f]")
_ASTRAL = re.compile("[\U00010000-\U0001ffff]")  # emoji and symbols: several tokens each


def estimate_tokens(text: str) -> int:
    """A cautious estimate of BPE tokens: four characters of ASCII text per token (the
    usual estimate for English), two characters per token for other alphabets (accented
    Latin, Cyrillic, Greek, Arabic, Hebrew), a token per character of Chinese, Japanese,
    Korean, Indic or Thai text, and two per emoji. (Four characters per token everywhere
    let a Chinese prompt run to four times its budget.)"""
    if text.isascii():
        return (len(text) + 3) // 4
    ascii_chars = len(text.encode("ascii", "ignore"))
    wide = len(text) - len(_WIDE.sub("", text))
    astral = len(text) - len(_ASTRAL.sub("", text))
    other = len(text) - ascii_chars - wide - astral
    return (ascii_chars + 3) // 4 + wide + 2 * astral + (other + 1) // 2


@dataclass(frozen=True, slots=True)
class Fitted:
    """The fields to render, and the notice to show when any of them was truncated.

    `kept` maps each truncated field to the number of its characters that were kept
    (the rendered field also ends with a truncation marker).
    """

    fields: dict[str, str]
    notice: str | None = None
    kept: dict[str, int] = field(default_factory=dict)


def _shares(sizes: Mapping[str, int], available: int) -> dict[str, int]:
    """Split `available` tokens over the fields: small ones whole, the rest evenly."""
    shares: dict[str, int] = {}
    remaining = available
    ordered = sorted(sizes.items(), key=lambda kv: kv[1])
    for position, (key, size) in enumerate(ordered):
        share = remaining // (len(ordered) - position)
        shares[key] = min(size, share)
        remaining -= shares[key]
    return shares


def _truncate(text: str, allowed: int, count: TokenCounter) -> tuple[str, int]:
    """The longest prefix of `text` that, with the marker, counts at most `allowed` tokens.

    Returns:
        The truncated text (prefix and marker) and the number of characters kept.
    """
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = text[:mid] + _MARKER.format(omitted=f"{len(text) - mid:,}")
        if count(candidate) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + _MARKER.format(omitted=f"{len(text) - lo:,}"), lo


def fit_prompt(
    fixed: str,
    fields: Mapping[str, str],
    *,
    max_tokens: int | None,
    on_over_budget: OverBudget,
    count: TokenCounter = estimate_tokens,
    labels: Mapping[str, str] | None = None,
) -> Fitted:
    """Fit `fields` into what `max_tokens` leaves after the `fixed` instructions.

    Args:
        fixed: the prompt without its fields (instructions, format).
        fields: field name -> text.
        max_tokens: the budget (None: no limit).
        on_over_budget: ``"truncate"`` the fields with a notice, or ``"skip"``.
        count: the token counter.
        labels: how each field is named in the notice (default: its key).

    Raises:
        SkipFeedback: over budget with ``"skip"``, or the texts do not fit even truncated
            (the instructions alone, or too many texts for each to keep its least).
    """
    if max_tokens is None:
        return Fitted(dict(fields))
    sizes = {key: count(text) for key, text in fields.items()}
    fixed_tokens = count(fixed)
    total = fixed_tokens + sum(sizes.values())
    if total <= max_tokens:
        return Fitted(dict(fields))
    over = (f"the judge prompt is too large: about {total:,} tokens, over "
            f"max_prompt_tokens={max_tokens:,}")
    if on_over_budget == "skip":
        raise SkipFeedback(f"{over} (on_over_budget='skip')")
    available = max_tokens - fixed_tokens - _MARGIN_PER_FIELD * len(fields)
    if available < _MIN_FIELD_TOKENS * len(fields):
        least = _MARGIN_PER_FIELD + _MIN_FIELD_TOKENS
        needed = f"raise max_prompt_tokens to at least {fixed_tokens + least * len(fields):,}"
        if fixed_tokens + least > max_tokens:
            raise SkipFeedback(f"{over}, and its instructions alone (about {fixed_tokens:,} "
                               f"tokens) leave no room to truncate into: {needed}")
        # (many short texts: groundedness over 60 contexts was said to have no room for
        # its instructions, which took a sixth of the budget)
        raise SkipFeedback(
            f"{over}, and its {len(fields)} texts do not fit beside its instructions (about "
            f"{fixed_tokens:,} tokens) even cut to the least a text keeps "
            f"({_MIN_FIELD_TOKENS} tokens each): {needed}, or judge fewer texts at once")
    shares = _shares(sizes, available)
    fitted: dict[str, str] = {}
    cut: list[str] = []
    kept_chars: dict[str, int] = {}
    for key, text in fields.items():
        if sizes[key] <= shares[key]:
            fitted[key] = text
            continue
        fitted[key], kept = _truncate(text, shares[key], count)
        kept_chars[key] = kept
        name = (labels or {}).get(key, key)
        cut.append(f"{name} {len(text):,} -> {kept:,} chars")
    notice = (f"[NOTICE: {over}; truncated before judging: {', '.join(cut)}. The score "
              "judges the truncated text.]")
    return Fitted(fitted, notice, kept_chars)
