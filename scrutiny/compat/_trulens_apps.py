"""TruLens's recorders over Scrutiny's: `TruChain`, `TruLlama`, `TruBasicApp`, and the
records and recordings they hand back.

A record handed back (``recording.get()``, ``recording[i]``, ``with_record``) also answers
to TruLens's names (``record.main_input``, ``wait_for_feedback_results(feedback_timeout=)``);
a TruLens name with no equivalent raises an error that says what to use instead.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from scrutiny.compat._trulens_feedback import NoEquivalent, source_nodes
from scrutiny.core import (
    ConfigurationError,
    FeedbackResult,
    Record,
    RecorderSettings,
    Recording,
    RecordStatus,
    Select,
    Selector,
    Span,
    SpanKind,
)
from scrutiny.core._feedback import Feedback
from scrutiny.core._ids import new_hex_id
from scrutiny.core._records import ResultsCallback, app_id_for

__all__ = ["AzureOpenAI", "Bedrock", "Huggingface", "LiteLLM", "OpenAI", "TruApp",
           "TruBasicApp", "TruChain", "TruCustomApp", "TruLlama", "TruVirtual", "VirtualApp",
           "VirtualRecord", "instrument"]

DEFAULT_APP_VERSION = "base"
"""TruLens's version of an app given none (Scrutiny's own recorders say "v1")."""


# ---------------------------------------------------------------------- records
_RECORD_HINTS = {
    "cost": "Scrutiny counts tokens, not money: record.usage (prompt, completion and total "
            "tokens, None when the model sent none)",
    "perf": "record.start_datetime, record.end_datetime and record.latency (seconds)",
    "ts": "record.start_datetime (and record.end_datetime)",
    "calls": "record.spans (every chain, model, retriever and tool call, with inputs, "
             "outputs, errors and timing)",
    "layout_calls_as_app": "record.spans, walked with record.walk()",
    "feedback_and_future_results": "record.feedback_futures (feedback -> future of its "
                                   "result)",
}


class TruRecord(Record):
    """A :class:`~scrutiny.Record` that also answers to TruLens's names."""

    @property
    def main_input(self) -> Any:
        """The main input (``record.input``)."""
        return self.input

    @property
    def main_output(self) -> Any:
        """The main output (``record.output``)."""
        return self.output

    @property
    def main_error(self) -> str | None:
        """Why the call failed (``record.error``)."""
        return self.error

    @property
    def meta(self) -> dict[str, Any]:
        """The record's metadata (``record.metadata``)."""
        return self.metadata

    def wait_for_feedback_results(  # type: ignore[override]  # (TruLens's first name)
            self, feedback_timeout: float | None = None, *, timeout: float | None = None,
            callback: ResultsCallback | None = None) -> dict[Feedback, FeedbackResult]:
        """Wait for every feedback result of this record; `feedback_timeout` (TruLens's
        name) or `timeout` bounds the whole wait, in seconds."""
        if feedback_timeout is not None and timeout is not None:
            raise ConfigurationError("give the timeout once: feedback_timeout= or timeout=")
        return super().wait_for_feedback_results(
            timeout if feedback_timeout is None else feedback_timeout, callback=callback)

    @property
    def feedback_results_as_completed(self) -> Iterator[tuple[Feedback, FeedbackResult]]:
        """``(feedback, result)`` pairs, each as soon as its result is stored (TruLens's
        idiom: ``for feedback, result in record.feedback_results_as_completed``)."""
        by_future = {future: fb for fb, future in self.feedback_futures().items()}
        for future in concurrent.futures.as_completed(by_future):
            yield by_future[future], future.result()

    def __getattr__(self, name: str) -> Any:
        hint = _RECORD_HINTS.get(name)
        if hint is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise NoEquivalent(f"record.{name} (TruLens) has no equivalent; use {hint}")


def as_tru_record(record: Record) -> Record:
    """`record`, answering to TruLens's names too (the same object)."""
    if type(record) is Record:
        record.__class__ = TruRecord
    return record


class TruRecording(Recording):
    """A :class:`~scrutiny.core.Recording` whose records answer to TruLens's names."""

    @property
    def records(self) -> list[Record]:
        """Every record made in the block, in the order the calls ended."""
        return [as_tru_record(r) for r in super().records]


def _tru_recording(recording: Recording) -> Recording:
    if type(recording) is Recording:
        recording.__class__ = TruRecording
    return recording


# ---------------------------------------------------------------------- recorders
_APP_HINTS = {
    "wait_for_feedback_results": "wait on a record (recording.get()"
                                 ".wait_for_feedback_results()) or on every result so far "
                                 "(session.wait_for_feedback(timeout))",
    "retrieve_feedback_results": "session.get_records_and_feedback(app_ids=[tru.app_id], "
                                 "wait=True)",
    "main_call": "call the app itself inside `with tru:`, or tru.with_record(app.invoke, "
                 "question)",
    "main_acall": "await the app itself inside `async with tru:`, or await "
                  "tru.awith_record(app.ainvoke, question)",
    "print_instrumented": "Scrutiny instruments nothing: every call of the app made in the "
                          "`with` block is recorded through the framework's callbacks",
    "connector": "tru.session (where its records go)",
}
_APP_HINTS["print_instrumented_methods"] = _APP_HINTS["print_instrumented"]
_APP_HINTS["print_instrumented_components"] = _APP_HINTS["print_instrumented"]
_APP_HINTS["db"] = _APP_HINTS["tru"] = _APP_HINTS["connector"]


def _no_record_metadata() -> ConfigurationError:
    return NoEquivalent(
        "with_record(record_metadata=...) is not supported: the record is stored as the call "
        "ends, before it could be added. Give the recorder metadata={...} (every record), "
        "or a LangChain call config={'metadata': {...}} (that record)")


class _WithRecord:
    """TruLens's ``with_record`` / ``awith_record``, and its names that have no
    equivalent, on a recorder."""

    def with_record(self, func: Callable[..., Any], *args: Any,
                    record_metadata: dict[str, Any] | None = None,
                    **kwargs: Any) -> tuple[Any, Record]:
        """Call ``func(*args, **kwargs)`` recorded; ``(its result, the record)``."""
        if record_metadata:
            raise _no_record_metadata()
        with self as recording:  # type: ignore[attr-defined]
            result = func(*args, **kwargs)
        return result, recording.get()

    async def awith_record(self, func: Callable[..., Awaitable[Any]], *args: Any,
                           record_metadata: dict[str, Any] | None = None,
                           **kwargs: Any) -> tuple[Any, Record]:
        """The async form of :meth:`with_record`."""
        if record_metadata:
            raise _no_record_metadata()
        async with self as recording:  # type: ignore[attr-defined]
            result = await func(*args, **kwargs)
        return result, recording.get()

    def __getattr__(self, name: str) -> Any:
        hint = _APP_HINTS.get(name)
        if hint is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name.startswith("print_instrumented"):
            # (informational: a quickstart that prints what is instrumented ran no further)
            return lambda *args, **kwargs: print(f"tru.{name}: {hint}")
        raise NoEquivalent(f"tru.{name} (TruLens) has no equivalent; use {hint}")


class _TruBlocks(_WithRecord):
    """``with tru as recording:`` hands back a recording of TruLens-named records."""

    def __enter__(self) -> Recording:
        return _tru_recording(super().__enter__())  # type: ignore[misc]

    async def __aenter__(self) -> Recording:
        return _tru_recording(await super().__aenter__())  # type: ignore[misc]


_DROPPED = ("selector_check_warning", "selector_nocheck", "main_method", "record_ingest_mode")
"""TruLens options about its instrumentation and its own buffering: nothing to do here
(every call in the block is recorded; records are always handed to a background writer)."""


def recorder_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """TruLens's recorder arguments as Scrutiny's."""
    kwargs = dict(kwargs)
    app_id = kwargs.pop("app_id", None)
    if app_id and kwargs.get("app_name") is None:
        kwargs["app_name"] = app_id
    if kwargs.get("app_version") is None:
        kwargs["app_version"] = DEFAULT_APP_VERSION
    tags = kwargs.get("tags")
    if isinstance(tags, str):  # (TruLens's tags are one string: it was split into letters)
        kwargs["tags"] = [tags]
    elif tags is None:
        kwargs.pop("tags", None)
    for dropped in _DROPPED:
        kwargs.pop(dropped, None)
    if kwargs.pop("connector", None) is not None:
        raise ConfigurationError("connector=: give the recorder session=TruSession(...) (or "
                                 "none: it uses the session created last)")
    if kwargs.pop("app_extra_json", None):
        raise ConfigurationError("app_extra_json=: Scrutiny stores no app definition; give "
                                 "the recorder metadata={...}, stored with every record")
    return kwargs


class _Factory(abc.ABC):
    """``TruChain(app, app_name=..., app_version=..., feedbacks=[...])``: a recorder of
    Scrutiny's, with TruLens's extras."""

    _name = ""

    def __init__(self) -> None:
        self._class: type | None = None

    @abc.abstractmethod
    def _recorder_class(self) -> type:
        """The integration's recorder class (imported when first used)."""

    def __call__(self, app: Any, **kwargs: Any) -> Any:
        if self._class is None:
            self._class = type(self._name, (_TruBlocks, self._recorder_class()),
                               {"__module__": "scrutiny.compat.trulens"})
        return self._class(app, **recorder_kwargs(kwargs))

    @staticmethod
    def select_context(app: Any = None) -> Selector:
        """The retrieved contexts (each one; ``.collect()`` for the list)."""
        return Select.contexts


class _TruChainFactory(_Factory):
    """``TruChain(chain, app_name=..., app_version=..., feedbacks=[...])``: a
    :class:`~scrutiny.integrations.langchain.ChainRecorder`."""

    _name = "TruChain"

    def _recorder_class(self) -> type:
        from scrutiny.integrations.langchain import ChainRecorder

        return ChainRecorder


class _TruLlamaFactory(_Factory):
    """``TruLlama(engine, app_name=..., app_version=..., feedbacks=[...])``: a
    :class:`~scrutiny.integrations.llama_index.LlamaIndexRecorder`."""

    _name = "TruLlama"

    def _recorder_class(self) -> type:
        from scrutiny.integrations.llama_index import LlamaIndexRecorder

        return LlamaIndexRecorder

    @staticmethod
    def select_source_nodes() -> Selector:
        """The retrieved nodes, as their texts (``.node.text`` is the same selection)."""
        return source_nodes()


TruChain = _TruChainFactory()
TruLlama = _TruLlamaFactory()


# ---------------------------------------------------------------------- TruBasicApp
_basic_blocks: contextvars.ContextVar[tuple[tuple[TruBasicApp, Recording], ...]] = \
    contextvars.ContextVar("scrutiny_tru_basic_blocks", default=())
_basic_running: contextvars.ContextVar[TruBasicApp | None] = \
    contextvars.ContextVar("scrutiny_tru_basic_running", default=None)


class _Wrapped:
    """``tru.app``: the wrapped function; a call of it inside ``with tru:`` is a record."""

    def __init__(self, recorder: TruBasicApp, fn: Callable[..., Any]) -> None:
        self._recorder = recorder
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorder._call(self._fn, args, kwargs)

    _call = __call__


def _main_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) + len(kwargs) == 1:
        return args[0] if args else next(iter(kwargs.values()))
    return {"args": list(args), "kwargs": kwargs}


class TruBasicApp(_WithRecord):
    """A plain function as an app: ``TruBasicApp(text_to_text, app_name=..., feedbacks=[...])``.

    Each call of ``tru.app(...)`` made inside ``with tru as recording:`` is one record,
    its input the argument and its output what the function returned (or its error); a
    call outside a block is not recorded, as in TruLens.
    """

    def __init__(self, text_to_text: Callable[..., Any] | None = None, app: Any = None, *,
                 app_name: str | None = None, app_version: str | None = None,
                 feedbacks: Sequence[Feedback] = (), session: Any = None,
                 feedback_mode: Any = None, tags: Sequence[str] | str | None = None,
                 metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        fn = text_to_text if text_to_text is not None else getattr(app, "_fn", app)
        if not callable(fn):
            raise ConfigurationError("TruBasicApp needs the function to record: "
                                     "TruBasicApp(text_to_text, app_name=...)")
        options = recorder_kwargs({"app_name": app_name, "app_version": app_version,
                                   "tags": tags, **kwargs})
        if set(options) - {"app_name", "app_version", "tags"}:
            unknown = sorted(set(options) - {"app_name", "app_version", "tags"})
            raise ConfigurationError(f"TruBasicApp does not take {unknown}")
        self.settings = RecorderSettings(
            options["app_name"] or getattr(fn, "__name__", None) or type(fn).__name__,
            options["app_version"], feedbacks=feedbacks, session=session,
            feedback_mode=feedback_mode, tags=options.get("tags", ()), metadata=metadata)
        self.app = _Wrapped(self, fn)
        self.app_name = self.settings.app_name
        self.app_version = self.settings.app_version
        self.app_id = app_id_for(self.app_name, self.app_version)
        self.feedbacks = self.settings.feedbacks
        self.feedback_mode = self.settings.feedback_mode

    @property
    def session(self) -> Any:
        """Where records go: the session given, else the session created last."""
        return self.settings.session

    def __enter__(self) -> Recording:
        recording = TruRecording(self.feedback_mode, empty_hint=(
            "call tru.app(...) inside the `with` block (the function itself is not "
            "recorded)"))
        _basic_blocks.set((*_basic_blocks.get(), (self, recording)))
        return recording

    def _leave(self) -> Recording | None:
        blocks = _basic_blocks.get()
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i][0] is self:
                _basic_blocks.set(blocks[:i] + blocks[i + 1:])
                return blocks[i][1]
        return None

    def __exit__(self, *exc: object) -> None:
        recording = self._leave()
        if recording is not None:
            recording.finish(self.settings.mode(recording))

    async def __aenter__(self) -> Recording:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        # (awaited: with_app mode waits for the results without blocking the event loop)
        recording = self._leave()
        if recording is not None:
            await recording.afinish(self.settings.mode(recording))

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        recording = next((rec for owner, rec in reversed(_basic_blocks.get())
                          if owner is self), None)
        if recording is None or _basic_running.get() is self:  # (a call inside the call)
            return fn(*args, **kwargs)
        recording._opened()
        token = _basic_running.set(self)
        start = time.time()
        try:
            output = fn(*args, **kwargs)
        except BaseException as exc:
            self._store(recording, fn, _main_input(args, kwargs), start, None, exc)
            raise
        finally:
            _basic_running.reset(token)
        if inspect.isawaitable(output):  # an async function: its answer comes when awaited
            return self._answer(recording, fn, _main_input(args, kwargs), start, output)
        self._store(recording, fn, _main_input(args, kwargs), start, output, None)
        return output

    async def _answer(self, recording: Recording, fn: Callable[..., Any], main_input: Any,
                      start: float, pending: Awaitable[Any]) -> Any:
        """Await an async function's call, then record it (it recorded the coroutine
        object as its output, with no time taken)."""
        token = _basic_running.set(self)
        try:
            output = await pending
        except BaseException as exc:
            self._store(recording, fn, main_input, start, None, exc)
            raise
        finally:
            _basic_running.reset(token)
        self._store(recording, fn, main_input, start, output, None)
        return output

    def _store(self, recording: Recording, fn: Callable[..., Any], main_input: Any,
               start: float, output: Any, exc: BaseException | None) -> None:
        end = time.time()
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        status = (RecordStatus.OK if exc is None else RecordStatus.ERROR
                  if isinstance(exc, Exception) else RecordStatus.CANCELLED)
        name = getattr(fn, "__name__", None) or type(fn).__name__
        span = Span(span_id=new_hex_id(), parent_id=None, name=name, kind=SpanKind.CHAIN.value,
                    start_time=start, end_time=end, inputs=main_input, outputs=output,
                    error=error)
        record = Record(app_name=self.app_name, app_version=self.app_version,
                        input=main_input, output=output, status=status, error=error,
                        start_time=start, end_time=end, spans=[span],
                        tags=list(self.settings.tags), metadata=dict(self.settings.metadata),
                        framework="python")
        recording._add(record)
        self.settings.ingest(record, recording)


# ---------------------------------------------------------------------- no equivalent
class _Refused:
    """A TruLens name with no equivalent: calling it (or ``.method(...)``) raises."""

    def __init__(self, name: str, what: str, instead: str) -> None:
        self.__name__ = self.__qualname__ = name
        self._message = f"{name} (TruLens) has no equivalent: {what}. {instead}"

    def __repr__(self) -> str:
        return f"<{self.__name__}: no equivalent in Scrutiny>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NoEquivalent(self._message)

    def method(self, *args: Any, **kwargs: Any) -> Any:
        raise NoEquivalent(self._message)


_NO_INSTRUMENTATION = "Scrutiny does not instrument the methods of your classes"
_RECORD_INSTEAD = (
    "Record a plain function with TruBasicApp(fn, app_name=...); an app built on LangChain "
    "or LlamaIndex with TruChain / TruLlama (every call made in the `with` block is "
    "recorded, no @instrument needed); wrap any function in LangChain's RunnableLambda(fn) "
    "for TruChain; or build a scrutiny.Record yourself and session.ingest(record, "
    "feedbacks)")
TruApp = _Refused("TruApp", _NO_INSTRUMENTATION, _RECORD_INSTEAD)
TruCustomApp = _Refused("TruCustomApp", _NO_INSTRUMENTATION, _RECORD_INSTEAD)
TruVirtual = _Refused("TruVirtual", "there are no virtual apps", _RECORD_INSTEAD)
_DATASET_INSTEAD = (
    "Build a scrutiny.Record of each row (app_name=, app_version=, input=, output=, "
    "contexts=, metadata=, start_time=) and session.ingest(record, feedbacks)")
VirtualApp = _Refused("VirtualApp", "there are no virtual apps", _DATASET_INSTEAD)
VirtualRecord = _Refused("VirtualRecord", "records of virtual apps are plain Records",
                         _DATASET_INSTEAD)
instrument = _Refused("instrument", _NO_INSTRUMENTATION, _RECORD_INSTEAD)


def _provider(name: str, model: str) -> _Refused:
    return _Refused(name, "Scrutiny's judges call a model through LangChain or LlamaIndex",
                    f"Use TruLens's LangChain provider, Langchain(chain={model}), which has "
                    "TruLens's method names (relevance, context_relevance_with_cot_reasons, "
                    "groundedness_measure_with_cot_reasons, ...), or "
                    f"scrutiny.providers.LLMJudge({model})")


OpenAI = _provider("OpenAI", "ChatOpenAI(model=...)")
AzureOpenAI = _provider("AzureOpenAI", "AzureChatOpenAI(...)")
LiteLLM = _provider("LiteLLM", "ChatLiteLLM(model=...)")
Bedrock = _provider("Bedrock", "ChatBedrock(model_id=...)")
Huggingface = _provider("Huggingface", "a LangChain model")
