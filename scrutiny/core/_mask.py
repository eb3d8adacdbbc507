"""A session's `mask`: the user's function applied to every text of a record it keeps.

Records hold what an app's users typed and what the app answered: card numbers, e-mail
addresses, names. ``Session(mask=fn)`` hands every text of a record — its input, output,
contexts, error and metadata, and each span's inputs, outputs, error and metadata — to
``fn(text) -> text`` before the record is stored *or judged*: a judge is often a model
of another company, and a score must be reproducible from what was stored.

Values are walked: dicts (keys kept), lists and tuples item by item; numbers, booleans
and None stay; any other object (a message, a document, a pydantic model) is first taken
in its JSON form — the form it is stored in — so that the texts inside it are masked too.
A mask that raises, or returns something other than a text, loses the text, never the
record: the text becomes :data:`MASK_FAILED` and the failure is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scrutiny.core._serialize import to_jsonable

if TYPE_CHECKING:
    from scrutiny.core._records import Record

__all__ = ["MASK_FAILED", "Mask", "mask_record"]

logger = logging.getLogger("scrutiny")

Mask = Callable[[str], str]
MASK_FAILED = "<not kept: the session's mask failed on this text>"
_MAX_DEPTH = 64
_warned: set[int] = set()


def mask_record(record: Record, mask: Mask) -> None:
    """Mask `record`'s texts in place (its own values: see Record._hold_values)."""
    walk = _Walker(mask)
    record.input = walk(record.input)
    record.output = walk(record.output)
    if isinstance(record.contexts, list):
        record.contexts = [walk(c) for c in record.contexts]
    if record.error is not None:
        record.error = walk(record.error)
    if record.metadata:
        record.metadata = walk(record.metadata)
    for span in record.spans or ():
        span.inputs = walk(span.inputs)
        span.outputs = walk(span.outputs)
        if span.error is not None:
            span.error = walk(span.error)
        if span.metadata:
            span.metadata = walk(span.metadata)


class _Walker:
    __slots__ = ("mask",)

    def __init__(self, mask: Mask) -> None:
        self.mask = mask

    def __call__(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= _MAX_DEPTH:
            return MASK_FAILED  # (deeper than any record's data: not kept unmasked)
        if isinstance(value, dict):
            return {key: self(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self(item, depth + 1) for item in value]
        jsonable = to_jsonable(value)
        if isinstance(jsonable, str | dict | list):
            return self(jsonable, depth + 1)
        return jsonable

    def _text(self, text: str) -> str:
        try:
            masked = self.mask(text)
        except Exception as exc:
            _warn_once(self.mask, f"raised {type(exc).__name__}")
            return MASK_FAILED
        if not isinstance(masked, str):
            _warn_once(self.mask, f"returned {type(masked).__name__}, not a text")
            return MASK_FAILED
        return masked


def _warn_once(mask: Mask, what: str) -> None:
    if id(mask) in _warned:
        return
    _warned.add(id(mask))
    logger.error("scrutiny: the session's mask %s %s; the texts it failed on are stored and "
                 "judged as %r (the records themselves are kept). Fix the mask: it takes "
                 "a text and returns a text", getattr(mask, "__qualname__", repr(mask)),
                 what, MASK_FAILED)
