"""A session's `mask`: the user's function applied to every text of a record it keeps.

Records hold what an app's users typed and what the app answered: card numbers, e-mail
addresses, names. ``Session(mask=fn)`` hands every text of a record — its input, output,
contexts, error, tags and metadata, and each span's name, inputs, outputs, error, tags and
metadata — to ``fn(text) -> text`` before the record is stored *or judged*: a judge is
often a model of another company, and a score must be reproducible from what was stored.
The texts of its results (explanations, errors) are masked before they are stored, told
or logged, and so are the expected answers of a :class:`GroundTruth` a feedback reads
while it evaluates (see :func:`current_mask`).

Values are walked: dicts (keys kept), lists and tuples item by item; numbers, booleans
and None stay; bytes are taken as the text they hold (stored, they were a hex preview the
mask could not read but anyone could decode); any other object (a message, a document, a
pydantic model) is first taken in its JSON form — the form it is stored in — so that the
texts inside it are masked too. A record is masked once: given again (to be evaluated
with more feedbacks), it is not masked a second time.
A mask that raises, or returns something other than a text, loses the text, never the
record: the text becomes :data:`MASK_FAILED` and the failure is logged once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scrutiny.core._serialize import to_jsonable

if TYPE_CHECKING:
    from scrutiny.core._records import Record
    from scrutiny.core._results import FeedbackResult

__all__ = ["MASK_FAILED", "Mask", "current_mask", "mask_record", "mask_result", "mask_text",
           "set_current_mask"]

logger = logging.getLogger("scrutiny")

Mask = Callable[[str], str]
MASK_FAILED = "<not kept: the session's mask failed on this text>"
_MAX_DEPTH = 64
_warned: set[int] = set()
_masked: weakref.WeakKeyDictionary[Record, Mask] = weakref.WeakKeyDictionary()
_current: contextvars.ContextVar[Mask | None] = contextvars.ContextVar(
    "scrutiny_mask", default=None)


def current_mask() -> Mask | None:
    """The mask of the session whose evaluation is running here (None: no mask, or not in
    an evaluation). A feedback holding texts of its own that it compares with or sends
    beside the record's — a ground-truth set's expected answers — masks them with it."""
    return _current.get()


def set_current_mask(mask: Mask | None) -> contextvars.Token[Mask | None]:
    return _current.set(mask)


def mask_text(text: str | None, mask: Mask | None) -> str | None:
    """`text` masked (None and an absent mask leave it as it is)."""
    if text is None or mask is None:
        return text
    return _Walker(mask)._text(text)


def mask_result(result: FeedbackResult, mask: Mask) -> FeedbackResult:
    """`result` with its texts masked: explanation, error, and each call's (its arguments
    come from the masked record; its metadata may hold what the feedback returned or
    fetched itself)."""
    walk = _Walker(mask)
    calls = [dataclasses.replace(
        call, explanation=walk(call.explanation), error=walk(call.error),
        metadata=walk(call.metadata) if call.metadata else call.metadata)
        for call in result.calls]
    return result.evolve(explanation=walk(result.explanation), error=walk(result.error),
                         calls=calls)


def mask_record(record: Record, mask: Mask) -> None:
    """Mask `record`'s texts in place (its own values: see Record._hold_values), once."""
    if _masked.get(record) is mask:
        return
    walk = _Walker(mask)
    record.input = walk(record.input)
    record.output = walk(record.output)
    if isinstance(record.contexts, list):
        record.contexts = [walk(c) for c in record.contexts]
    if record.error is not None:
        record.error = walk(record.error)
    if record.tags:
        record.tags = walk(record.tags)
    if record.metadata:
        record.metadata = walk(record.metadata)
    for span in record.spans or ():
        span.name = walk(span.name)  # (a run_name can hold a user's id)
        span.inputs = walk(span.inputs)
        span.outputs = walk(span.outputs)
        if span.error is not None:
            span.error = walk(span.error)
        if span.tags:
            span.tags = walk(span.tags)
        if span.metadata:
            span.metadata = walk(span.metadata)
    _masked[record] = mask


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
        if isinstance(value, bytes | bytearray | memoryview):
            return self._text(bytes(value).decode("utf-8", "replace"))
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
