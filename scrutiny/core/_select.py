"""Selectors: what part of a record a feedback function receives.

A selector is a small callable object with a label (stored with the feedback definition so
the table can say what was judged). `Select.contexts` fans out: the feedback function is
called once per retrieved context and the scores are aggregated; `.collect()` passes the
whole list in one call instead. Any plain `callable(record) -> value` can be used where a
selector is expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrutiny.core._records import Record, Span

__all__ = ["EmptySelection", "Select", "Selector", "as_selector"]


class EmptySelection(LookupError):
    """The selector found nothing in the record (the result becomes `skipped`)."""


class Selector:
    """Pick a value out of a record.

    Args:
        label: how the selection is shown and stored, e.g. ``"Select.contexts"``.
        get: the function that reads the value from a :class:`Record`.
        fan_out: call the feedback once per element of the selected sequence.
    """

    __slots__ = ("_get", "fan_out", "label")

    def __init__(self, label: str, get: Callable[[Record], Any], *, fan_out: bool = False):
        self.label = label
        self._get = get
        self.fan_out = fan_out

    def __repr__(self) -> str:
        return self.label + (" (each)" if self.fan_out else "")

    def select(self, record: Record) -> Any:
        """The selected value; raises :class:`EmptySelection` when there is nothing."""
        value = self._get(record)
        if _is_empty(value):
            raise EmptySelection(f"{self.label} found nothing in record {record.record_id}")
        if self.fan_out and not isinstance(value, Sequence | set | frozenset):
            return [value]
        if self.fan_out and isinstance(value, str | bytes):
            return [value]
        return value

    def collect(self) -> Selector:
        """The same selection, passed as one list instead of element by element."""
        return Selector(self.label + ".collect()", self._get, fan_out=False)

    def each(self) -> Selector:
        """The same selection, one feedback call per element."""
        return Selector(self.label, self._get, fan_out=True)

    def map(self, fn: Callable[[Any], Any], label: str | None = None) -> Selector:
        """Apply `fn` to each element of a sequence selection (or to a single value)."""
        get = self._get

        def mapped(record: Record) -> Any:
            value = get(record)
            if isinstance(value, list | tuple):
                return [fn(v) for v in value]
            return fn(value)

        return Selector(label or f"{self.label}.map({_name(fn)})", mapped, fan_out=self.fan_out)

    @property
    def outputs(self) -> Selector:
        """For span selections: the spans' outputs."""
        return self.map(lambda s: s.outputs, f"{self.label}.outputs")

    @property
    def inputs(self) -> Selector:
        """For span selections: the spans' inputs."""
        return self.map(lambda s: s.inputs, f"{self.label}.inputs")


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, list | tuple | set | frozenset | dict):
        return len(value) == 0
    return False


def _spans(kind: str | None, name: str | None) -> Callable[[Record], list[Span]]:
    kind_value = None if kind is None else str(getattr(kind, "value", kind))

    def get(record: Record) -> list[Span]:
        return [
            s
            for s in record.spans
            if (kind_value is None or str(s.kind) == kind_value)
            and (name is None or s.name == name)
        ]

    return get


class Select:
    """The selectors a feedback can be wired to."""

    input = Selector("Select.input", lambda r: r.input)
    """The main input of the record (a question, a query)."""
    output = Selector("Select.output", lambda r: r.output)
    """The main output of the record (an answer)."""
    contexts = Selector("Select.contexts", lambda r: r.contexts, fan_out=True)
    """Each retrieved context (document text); `.collect()` for the whole list."""
    record = Selector("Select.record", lambda r: r)
    """The whole :class:`Record`."""

    # names TruLens users already know
    RecordInput = input
    RecordOutput = output
    RetrievedContexts = contexts

    @staticmethod
    def spans(kind: str | None = None, name: str | None = None) -> Selector:
        """The spans of a kind (``"llm"``, ``"retriever"``, ...) and/or with a name."""
        label = "Select.spans(" + ", ".join(
            f"{k}={v!r}" for k, v in (("kind", kind), ("name", name)) if v is not None
        ) + ")"
        return Selector(label, _spans(kind, name))

    @staticmethod
    def metadata(key: str) -> Selector:
        """A value of the record's metadata."""
        return Selector(f"Select.metadata({key!r})", lambda r: r.metadata.get(key))

    @staticmethod
    def custom(fn: Callable[[Record], Any], *, label: str | None = None,
               fan_out: bool = False) -> Selector:
        """Any function of the record."""
        return Selector(label or f"Select.custom({_name(fn)})", fn, fan_out=fan_out)


def as_selector(value: Selector | Callable[[Record], Any]) -> Selector:
    """Accept a selector or any `callable(record)`."""
    if isinstance(value, Selector):
        return value
    if callable(value):
        return Select.custom(value)
    raise TypeError(
        f"expected a Selector (e.g. Select.output) or a callable(record), got {value!r}"
    )
