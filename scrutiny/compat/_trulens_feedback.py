"""TruLens's `Feedback` and `Select` over Scrutiny's.

What TruLens code writes — ``Feedback(fn, agg=np.mean)``, ``.on_prompt()``,
``.on_default()``, ``Select.RecordInput`` — works; a lens into the app's call paths
(``Select.RecordCalls...``) has no equivalent, and using one raises
:class:`NoEquivalent` naming what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from scrutiny.core import ConfigurationError, Selector
from scrutiny.core import Feedback as _Feedback
from scrutiny.core import Select as _Select

__all__ = ["Feedback", "NoEquivalent", "Select", "source_nodes"]


class NoEquivalent(ConfigurationError, AttributeError):
    """A TruLens name that Scrutiny has no equivalent of; the message says what to use.

    Also an :class:`AttributeError`, so ``hasattr()`` and introspection see the name as
    missing rather than failing."""


_SPANS_INSTEAD = (
    "select what Scrutiny records instead: Select.contexts (the retrieved texts, what "
    "TruChain.select_context(app) gives), Select.spans(kind='retriever' | 'llm' | 'tool' | "
    "'chain', name=...).outputs or .inputs (the calls made), Select.metadata(key), or any "
    "callable(record) -> value")

_LLM_OPTIONS = {"examples": None, "criteria": None, "additional_instructions": None,
                "min_score_val": 0, "max_score_val": 3, "temperature": 0.0,
                "groundedness_configs": None, "enable_trace_compression": None}
"""TruLens's options of its own LLM providers' prompts, with their defaults."""


class Feedback(_Feedback):
    """A feedback function, built with TruLens's arguments.

    ``Feedback(imp, agg=None, name=..., higher_is_better=...)``: the second positional
    argument is the aggregate, as in TruLens (not the name, as in
    :class:`scrutiny.Feedback`). Scrutiny's own options (``timeout=``, ``retries=``,
    ``rate_limit=``...) are accepted by keyword.

    Raises:
        ConfigurationError: no function.
        NoEquivalent: an option of TruLens's LLM-provider prompts (``criteria=``,
            ``examples=``, ``min_score_val=``...), which Scrutiny's feedbacks do not have.
    """

    def __init__(self, imp: Callable[..., Any] | None = None,
                 agg: Callable[[list[float]], float] | None = None, *,
                 name: str | None = None, higher_is_better: bool | None = None,
                 implementation: Callable[..., Any] | None = None, **options: Any) -> None:
        if imp is not None and implementation is not None:
            raise ConfigurationError("give the feedback function once: imp= or "
                                     "implementation=")
        fn = imp if imp is not None else implementation
        if fn is None:
            raise ConfigurationError("Feedback needs its function: Feedback(fn)")
        llm = [k for k, default in _LLM_OPTIONS.items()
               if k in options and options.pop(k) != default]
        if llm:
            raise NoEquivalent(
                f"Feedback({', '.join(k + '=...' for k in llm)}): these shape the prompts of "
                "TruLens's own LLM providers, which Scrutiny does not have; use a "
                "scrutiny.providers.LLMJudge method as the function, or put the criterion "
                "in a rubric of your own: LLMJudge(model).rubric(name, instructions, "
                "fields=(...))")
        if agg is not None:
            if "aggregate" in options:
                raise ConfigurationError("give the aggregate once: agg= or aggregate=")
            if not callable(agg):
                raise ConfigurationError(
                    f"agg (Feedback's second argument, as in TruLens) is the function that "
                    f"combines the scores of several calls, e.g. np.mean; got {agg!r}. "
                    "The feedback's name is name=...")
            options["aggregate"] = agg
        super().__init__(fn, name, higher_is_better=higher_is_better, **options)

    @property
    def imp(self) -> Callable[..., Any]:
        """The feedback function (TruLens's name for it)."""
        return self.fn

    @property
    def agg(self) -> Callable[[list[float]], float]:
        """The aggregate (TruLens's name for it)."""
        return self.aggregator

    def on(self, *selectors: Selector | Callable[..., Any],
           **named: Selector | Callable[..., Any]) -> Feedback:
        """Wire the function's parameters to selectors, positionally and/or by name (or,
        as TruLens 2 does, by a dict of them: ``.on({"prompt": Select.RecordInput})``)."""
        if len(selectors) == 1 and isinstance(selectors[0], Mapping):
            named = {**selectors[0], **named}
            selectors = ()
        return cast(Feedback, super().on(*selectors, **named))  # (a copy of this class)

    def _one(self, arg: str | None, selector: Selector) -> Feedback:
        return self.on(selector) if arg is None else self.on(**{arg: selector})

    def on_input(self, arg: str | None = None) -> Feedback:
        """The main input, to parameter `arg` (default: the next one not wired)."""
        return self._one(arg, _Select.input)

    def on_output(self, arg: str | None = None) -> Feedback:
        """The main output, to parameter `arg` (default: the next one not wired)."""
        return self._one(arg, _Select.output)

    on_prompt = on_input
    on_response = on_output

    def on_input_output(self) -> Feedback:
        """The main input and the main output, to the first two parameters not wired."""
        return self.on(_Select.input, _Select.output)

    def aggregate(self, fn: Callable[[list[float]], float]) -> Feedback:
        """How the scores of a fanned-out selection combine (e.g. np.mean, max)."""
        return cast(Feedback, super().aggregate(fn))

    def on_context(self, arg: str | None = None, *, collect_list: bool) -> Feedback:
        """The retrieved contexts: each in its own call, or all in one list
        (`collect_list=True`)."""
        contexts = _Select.contexts
        return self._one(arg, contexts.collect() if collect_list else contexts)

    def on_default(self) -> Feedback:
        """A function of one parameter gets the main output; of two, the main input and
        the main output.

        Raises:
            ConfigurationError: the function has another number of parameters left."""
        free = [p for p in self._params.names if p not in self.bindings]
        if len(free) == 1:
            return self.on_output()
        if len(free) == 2:
            return self.on_input_output()
        raise ConfigurationError(
            f"feedback {self.name!r}: on_default() wires a function of one parameter (the "
            f"output) or two (input, output); {self.name}() has {free} left to wire: use "
            ".on(...) with a selector for each")


class _NoLens:
    """A TruLens lens with no Scrutiny equivalent: reading it raises NoEquivalent."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        raise NoEquivalent(f"Select.{self.name}: {self.what}; {_SPANS_INSTEAD}")


_CALL_PATHS = ("TruLens's lenses into the app's call paths have no equivalent: Scrutiny "
               "records the calls as spans through LangChain's and LlamaIndex's callbacks")


class Select(_Select):
    """The selectors, under Scrutiny's names and TruLens's (``Select.RecordInput``,
    ``Select.RecordOutput``, ``Select.context(app)``)."""

    RecordCalls = _NoLens(_CALL_PATHS)
    RecordCall = _NoLens(_CALL_PATHS)
    RecordArgs = _NoLens(_CALL_PATHS)
    RecordRets = _NoLens(_CALL_PATHS)
    Record = _NoLens("the record's fields are Select.input, Select.output, Select.contexts "
                     "and Select.record (the whole Record, for a callable)")
    App = _NoLens("Scrutiny stores no app definition to read (give a feedback the value "
                  "itself, e.g. with functools.partial, or put it in the recorder's "
                  "metadata={...} and use Select.metadata(key))")
    Tru = _NoLens(_CALL_PATHS)
    Query = _NoLens(_CALL_PATHS)
    Lens = _NoLens(_CALL_PATHS)

    @staticmethod
    def context(app: Any = None) -> Selector:
        """The retrieved contexts (each one; ``.collect()`` for the list)."""
        return _Select.contexts


class _SourceNodes(Selector):
    """``TruLlama.select_source_nodes()``: the retrieved nodes, which Scrutiny keeps as
    their texts; ``.node.text`` (TruLens's way to their texts) is the same selection."""

    __slots__ = ()

    @property
    def node(self) -> _NodeFields:
        return _NodeFields()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NoEquivalent(
            f"TruLlama.select_source_nodes().{name}: Scrutiny keeps each retrieved node "
            f"as its text (select_source_nodes() and .node.text are Select.contexts); "
            f"{_SPANS_INSTEAD}")


class _NodeFields:
    """``select_source_nodes().node``: only its text is kept."""

    @property
    def text(self) -> Selector:
        return _Select.contexts

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NoEquivalent(
            f"TruLlama.select_source_nodes().node.{name}: Scrutiny keeps each retrieved "
            f"node as its text (.node.text, i.e. Select.contexts); {_SPANS_INSTEAD}")


def source_nodes() -> Selector:
    """The selection ``TruLlama.select_source_nodes()`` gives."""
    contexts = _Select.contexts
    return _SourceNodes(contexts.label, contexts._get, fan_out=contexts.fan_out,
                        spec=contexts.spec)
