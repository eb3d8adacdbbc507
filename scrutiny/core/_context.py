"""Context variables shared by the core and the integrations.

`recording_suppressed()` is true inside feedback evaluation: integrations check it and do
not record the evaluators' own framework calls as application records.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["add_evaluation_cost", "rate_limit_held", "recording_suppressed",
           "suppress_recording"]

_suppressed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scrutiny_recording_suppressed", default=False
)
_cost: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "scrutiny_evaluation_cost", default=None
)

_held_limits: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "scrutiny_held_rate_limits", default=frozenset()
)


def rate_limit_held(group: str | None) -> bool:
    """True while the call running in this context holds a permit of the rate-limit
    `group`: a session evaluating a feedback with that :class:`RateLimit` took it for the
    call. (An evaluator that limits itself when called directly need not again.)"""
    return group is not None and group in _held_limits.get()


def recording_suppressed() -> bool:
    """True while Scrutiny evaluates feedback in this context."""
    return _suppressed.get()


@contextlib.contextmanager
def suppress_recording() -> Iterator[None]:
    """Do not record framework calls made inside this block."""
    token = _suppressed.set(True)
    try:
        yield
    finally:
        _suppressed.reset(token)


def add_evaluation_cost(**amounts: Any) -> None:
    """Report the cost of an evaluator's own calls (tokens, dollars, ...) for its result.

    Providers call this, e.g. ``add_evaluation_cost(prompt_tokens=120, completion_tokens=8)``;
    outside an evaluation it does nothing.
    """
    bucket = _cost.get()
    if bucket is None:
        return
    # Counts given without a total add to the total too: after a judge's call reported
    # one, a feedback's own call reported without it left the total short (110 of 152).
    if amounts.get("total_tokens") is None:
        parts = [amounts.get(k) for k in ("prompt_tokens", "completion_tokens")]
        if all(isinstance(p, int | float) for p in parts):
            amounts = {**amounts, "total_tokens": sum(parts)}
    for key, value in amounts.items():
        if value is not None:
            bucket[key] = bucket.get(key, 0) + value
