"""Selectors: what part of a record a feedback function receives.

A selector is a small callable object with a label (stored with the feedback definition so
the table can say what was judged) and, when it can be rebuilt in another process, a JSON
`spec` (workers of the deferred mode rebuild selectors from it). `Select.contexts` fans out:
the feedback function is called once per retrieved context and the scores are aggregated;
`.collect()` passes the whole list in one call instead. Any plain `callable(record) -> value`
can be used where a selector is expected.
"""

from __future__ import annotations

from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    ValuesView,
)
from typing import Any

from scrutiny.core._errors import ConfigurationError
from scrutiny.core._missing import is_missing
from scrutiny.core._records import Record, Span
from scrutiny.core._refs import NotReferenceable, reference, resolve
from scrutiny.core._usage import USAGE_REPEATS

__all__ = ["EmptySelection", "Select", "Selector", "as_selector", "selector_from_spec"]

Spec = dict[str, Any]


class EmptySelection(LookupError):
    """The selector found nothing in the record (the result becomes `skipped`)."""


class Selector:
    """Pick a value out of a record.

    Args:
        label: how the selection is shown and stored, e.g. ``"Select.contexts"``.
        get: the function that reads the value from a :class:`Record`.
        fan_out: call the feedback once per element of the selected sequence.
        spec: how to rebuild the selector in another process (None: it cannot be).
        why_not: when `spec` is None, the reason, for the error message.
        hint: says what the record has instead, when the selection finds nothing.
    """

    __slots__ = ("_get", "_hint", "fan_out", "label", "spec", "why_not")

    def __init__(self, label: str, get: Callable[[Record], Any], *, fan_out: bool = False,
                 spec: Spec | None = None, why_not: str | None = None,
                 hint: Callable[[Record], str] | None = None) -> None:
        self.label = label
        self._get = get
        self.fan_out = fan_out
        self.spec = spec
        self.why_not = why_not
        self._hint = hint

    def __repr__(self) -> str:
        return self.label + (" (each)" if self.fan_out else "")

    def select(self, record: Record) -> Any:
        """The selected value; raises :class:`EmptySelection` when there is nothing."""
        value = self._get(record)
        if self.fan_out:
            value = _elements(value)
        if is_missing(value) if self._whole_call() else _is_empty(value):
            hint = ""
            if self._hint is not None:
                try:
                    hint = self._hint(record)
                except Exception:  # (a hint must not turn a skip into a failure)
                    hint = ""
            raise EmptySelection(f"{self.label} found nothing in record {record.record_id}"
                                 + (f" ({hint})" if hint else ""))
        if self.fan_out and (isinstance(value, str | bytes) or not isinstance(
                value, Sequence | set | frozenset)):
            return [value]
        return value

    def _with(self, *, label: str | None = None, get: Callable[[Record], Any] | None = None,
              fan_out: bool | None = None, spec: Spec | None = None,
              why_not: str | None = None) -> Selector:
        return Selector(label or self.label, get or self._get,
                        fan_out=self.fan_out if fan_out is None else fan_out,
                        spec=spec, why_not=why_not or self.why_not, hint=self._hint)

    def _spec_with(self, **changes: Any) -> Spec | None:
        return None if self.spec is None else {**self.spec, **changes}

    def collect(self) -> Selector:
        """The same selection, passed as one list instead of element by element."""
        return self._with(label=self.label + ".collect()", fan_out=False,
                          spec=self._spec_with(fan_out=False))

    def each(self) -> Selector:
        """The same selection, one feedback call per element."""
        return self._with(fan_out=True, spec=self._spec_with(fan_out=True))

    def map(self, fn: Callable[[Any], Any], label: str | None = None) -> Selector:
        """Apply `fn` to each element of a sequence selection (or to a single value)."""
        try:
            spec = None if self.spec is None else {"map": reference(fn), "of": self.spec,
                                                   "fan_out": self.fan_out}
            why_not = self.why_not
        except NotReferenceable as exc:
            spec, why_not = None, str(exc)
        return self._with(label=label or f"{self.label}.map({_name(fn)})",
                          get=_mapped(self._get, fn), spec=spec, why_not=why_not)

    def __getitem__(self, key: str | int) -> Selector:
        """A field of the selected value (of each, for a sequence): ``Select.output["answer"]``
        for a dict or an object's attribute, ``[0]`` for a list. Where it is missing, the
        selection is empty: the result is `skipped`, saying so."""
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ConfigurationError(
                f"{self.label}[{key!r}]: a field is selected by its name (a str) or a "
                f"position (an int); for anything else use .map(fn) or Select.custom(fn)")
        spec = None if self.spec is None else {"item": key, "of": self.spec,
                                               "fan_out": self.fan_out}
        # (of each value, for a selection of several: spans' outputs, contexts; of the
        # value itself otherwise, a list included — Select.output["sources"][0])
        get = _mapped(self._get, lambda v: _item(v, key)) if self._several() else \
            _applied(self._get, lambda v: _item(v, key))
        return self._with(label=f"{self.label}[{key!r}]", get=get, spec=spec)

    def _whole_call(self) -> bool:
        """Whether this is the record's own input or output: an app that answered [] or {}
        (an extractor that found nothing) has answered, as one that answered "" has —
        skipped, those records were left out of every mean."""
        spec = self.spec
        return spec is not None and not self.fan_out and "of" not in spec and \
            spec.get("select") in ("input", "output")

    def _several(self) -> bool:
        """Whether this selects several values (each a span's, or each context)."""
        if self.fan_out:
            return True
        spec = self.spec
        while spec is not None and "of" in spec:
            spec = spec["of"]
        return spec is not None and spec.get("select") in ("spans", "contexts")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _NoSuchSelection(
            f"{self.label}.{name}: a selection has no attribute {name!r}; a field of the "
            f"selected value is {self.label}[{name!r}] (a dict's key or an object's "
            f"attribute), and a span selection's values are .outputs / .inputs")

    @property
    def outputs(self) -> Selector:
        """For span selections: the spans' outputs."""
        return self._attr("outputs")

    @property
    def inputs(self) -> Selector:
        """For span selections: the spans' inputs."""
        return self._attr("inputs")

    def _attr(self, name: str) -> Selector:
        if self.spec is not None and self.spec.get("select") in _NOT_SPANS:
            # (accepted when wired: every result then failed, "'str' object has no
            # attribute 'outputs'")
            raise ConfigurationError(
                f"{self.label}.{name}: .{name} is for span selections, e.g. "
                f"Select.spans(kind='retriever').{name}; {self.label} is the value itself")
        spec = None if self.spec is None else {"attr": name, "of": self.spec,
                                               "fan_out": self.fan_out}
        return self._with(label=f"{self.label}.{name}",
                          get=_mapped(self._get, lambda s: getattr(s, name)), spec=spec)


_NOT_SPANS = frozenset(("input", "output", "contexts", "metadata", "record"))


class _NoSuchSelection(ConfigurationError, AttributeError):
    """An attribute a selection does not have (TruLens's ``Select.RecordInput.question``)."""


def _item(value: Any, key: str | int) -> Any:
    """`value[key]` for a mapping or a list, `value.key` for an object; None if missing."""
    if isinstance(value, Mapping):
        return value.get(key)
    if isinstance(key, int):
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            return value[key] if -len(value) <= key < len(value) else None
        return None
    return getattr(value, key, None)


def _applied(get: Callable[[Record], Any],
             fn: Callable[[Any], Any]) -> Callable[[Record], Any]:
    def applied(record: Record) -> Any:
        value = get(record)
        return value if _is_empty(value) else fn(value)
    return applied


def _mapped(get: Callable[[Record], Any], fn: Callable[[Any], Any]) -> Callable[[Record], Any]:
    def mapped(record: Record) -> Any:
        value = get(record)
        if _is_empty(value):  # (skipped as the selection it maps: `fn` is not given None)
            return value
        if isinstance(value, list | tuple):
            return [fn(v) for v in value]
        return fn(value)

    return mapped


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _is_empty(value: Any) -> bool:
    """Nothing to evaluate: no value (a call that failed before it answered) or an empty
    collection (no retrieved contexts). An empty *text* is something: an app that answered
    "" is what an answer check is for, and skipping it left those records out of every
    mean (each evaluator decides what an empty text scores)."""
    if is_missing(value):  # (None; a table's missing cell: NaN, pandas' NA or NaT)
        return True
    if isinstance(value, list | tuple | set | frozenset | dict):
        return len(value) == 0
    return False


def _kinds(kind: str | None) -> frozenset[str] | None:
    """The span kinds `kind` selects: "llm" is any language-model call (completion LLMs and
    chat models alike); an unknown kind is an error, not a selector that finds nothing."""
    from scrutiny.core._errors import ConfigurationError
    from scrutiny.core._records import SpanKind

    if kind is None:
        return None
    known = [k.value for k in SpanKind]
    if kind not in known:
        raise ConfigurationError(
            f"Select.spans(kind={kind!r}): no span has that kind; use one of "
            f"{', '.join(repr(k) for k in known)}")
    if kind == SpanKind.LLM.value:
        return frozenset((SpanKind.LLM.value, SpanKind.CHAT_MODEL.value))
    return frozenset((kind,))


_MODEL_KINDS = frozenset(("llm", "chat_model"))  # (SpanKind.LLM, CHAT_MODEL)


def _spans(kinds: frozenset[str] | None, name: str | None) -> Callable[[Record], list[Span]]:
    calls = kinds is not None and name is None and kinds <= _MODEL_KINDS

    def get(record: Record) -> list[Span]:
        found = [
            s
            for s in record.spans
            if (kinds is None or str(getattr(s.kind, "value", s.kind)) in kinds)
            and (name is None or s.name == name)
        ]
        return _innermost(found, record.spans) if calls and len(found) > 1 else found

    return get


def _innermost(found: list[Span], spans: list[Span]) -> list[Span]:
    """Model calls, each once: a model span that wraps another one found (LlamaIndex's
    `llm.predict` calling `complete`, `astream_chat` reading `stream_chat`) is the same
    call, and the inner one is what reached the model (the prompt sent, the response); so
    is one marked as repeating another's response (`USAGE_REPEATS`)."""
    by_id = {s.span_id: s for s in spans}
    found_ids = {s.span_id for s in found}
    wrapping: set[str] = set()
    for span in found:
        seen = {span.span_id}
        parent = by_id.get(span.parent_id) if span.parent_id is not None else None
        while parent is not None and parent.span_id not in seen:  # (a cycle ends the walk)
            seen.add(parent.span_id)
            if parent.span_id in found_ids:
                wrapping.add(parent.span_id)
            parent = by_id.get(parent.parent_id) if parent.parent_id is not None else None
    # (then a call whose span hands on another's response, not wrapping it: LlamaIndex's
    # `CustomLLM.astream_complete` reading `stream_complete` after its own span ended)
    return [s for s in found if s.span_id not in wrapping
            and not (s.metadata and USAGE_REPEATS in s.metadata)]


_HINTED = 12
"""The most span names / metadata keys an empty selection's reason lists."""


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_HINTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _HINTED else "")


def _spans_hint(record: Record) -> str:
    """What spans the record has: a misspelt span name found nothing on every record, and
    the skipped reason did not say that the spans were there under another name."""
    seen: dict[str, None] = {}
    for s in record.spans:
        seen[f"{s.name!r} ({getattr(s.kind, 'value', s.kind)})"] = None
    if not seen:
        return "the record has no spans"
    return "its spans: " + _listed(list(seen))


def _metadata_hint(key: str) -> Callable[[Record], str]:
    def hint(record: Record) -> str:
        if key in record.metadata:
            return f"its metadata has {key!r} set to {record.metadata[key]!r}"
        keys = [repr(k) for k in record.metadata]
        return "its metadata keys: " + _listed(keys) if keys else "the record has no metadata"

    return hint


def _field(name: str) -> Callable[[Record], Any]:
    return lambda r: getattr(r, name)


class Select:
    """The selectors a feedback can be wired to."""

    input = Selector("Select.input", _field("input"), spec={"select": "input"})
    """The main input of the record (a question, a query)."""
    output = Selector("Select.output", _field("output"), spec={"select": "output"})
    """The main output of the record (an answer)."""
    contexts = Selector("Select.contexts", _field("contexts"), fan_out=True,
                        spec={"select": "contexts", "fan_out": True})
    """Each retrieved context (document text); `.collect()` for the whole list."""
    record = Selector("Select.record", lambda r: r, spec={"select": "record"})
    """The whole :class:`Record`."""

    # names TruLens users already know
    RecordInput = input
    RecordOutput = output
    RetrievedContexts = contexts

    @staticmethod
    def spans(kind: str | None = None, name: str | None = None) -> Selector:
        """The spans of a kind and/or with a name. Kinds are :class:`SpanKind` values:
        ``"llm"`` (any model call: completion LLMs and chat models), ``"chat_model"``,
        ``"retriever"``, ``"tool"``, ``"chain"``, ...

        Raises:
            ConfigurationError: `kind` is not a span kind.
        """
        kind = None if kind is None else str(getattr(kind, "value", kind))
        kinds = _kinds(kind)
        label = "Select.spans(" + ", ".join(
            f"{k}={v!r}" for k, v in (("kind", kind), ("name", name)) if v is not None
        ) + ")"
        return Selector(label, _spans(kinds, name),
                        spec={"select": "spans", "kind": kind, "name": name},
                        hint=_spans_hint)

    @staticmethod
    def metadata(key: str) -> Selector:
        """A value of the record's metadata."""
        return Selector(f"Select.metadata({key!r})", lambda r: r.metadata.get(key),
                        spec={"select": "metadata", "key": key}, hint=_metadata_hint(key))

    @staticmethod
    def custom(fn: Callable[[Record], Any], *, label: str | None = None,
               fan_out: bool = False) -> Selector:
        """Any function of the record."""
        try:
            spec: Spec | None = {"custom": reference(fn), "fan_out": fan_out}
            why_not = None
        except NotReferenceable as exc:
            spec, why_not = None, str(exc)
        return Selector(label or f"Select.custom({_name(fn)})", fn, fan_out=fan_out,
                        spec=spec, why_not=why_not)


def as_selector(value: Selector | Callable[[Record], Any]) -> Selector:
    """Accept a selector or any `callable(record)`."""
    if isinstance(value, Selector):
        return value
    if callable(value):
        return Select.custom(value)
    hint = ""
    if isinstance(value, str):  # (.on("output"): a name, not the selector)
        word = value.strip().lower()
        hint = (f": did you mean Select.{word}?" if isinstance(getattr(Select, word, None),
                                                              Selector)
                else ": a name is not a selection")
    raise ConfigurationError(
        f"expected a Selector (e.g. Select.output) or a callable(record), got {value!r}"
        f"{hint}")


def selector_from_spec(spec: Spec) -> Selector:
    """Rebuild a selector from its `spec` (in a worker)."""
    fan_out = bool(spec.get("fan_out", False))
    if "of" in spec:
        inner = selector_from_spec(spec["of"])
        built = inner._attr(spec["attr"]) if "attr" in spec else inner[spec["item"]] \
            if "item" in spec else inner.map(resolve(spec["map"]))
        return built.each() if fan_out else built.collect() if built.fan_out else built
    if "custom" in spec:
        return Select.custom(resolve(spec["custom"]), fan_out=fan_out)
    kind = spec.get("select")
    base: Selector
    if kind in ("input", "output", "contexts", "record"):
        base = getattr(Select, kind)
    elif kind == "spans":
        base = Select.spans(spec.get("kind"), spec.get("name"))
    elif kind == "metadata":
        base = Select.metadata(spec["key"])
    else:
        raise ValueError(f"unknown selector spec {spec!r}")
    if fan_out != base.fan_out:
        return base.each() if fan_out else base.collect()
    return base


def _elements(value: Any) -> Any:
    """A fanned-out selection's elements as a list, when it is a collection that is not a
    sequence: a generator, a dict's ``.values()``, a numpy array or a pandas Series (the
    feedback was called once, with the whole object, and scored it 0)."""
    if isinstance(value, Iterator | KeysView | ValuesView | ItemsView):
        return list(value)
    if getattr(value, "ndim", 0) == 1 and callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value
