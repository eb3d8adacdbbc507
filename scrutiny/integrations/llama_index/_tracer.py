"""Span bookkeeping: LlamaIndex span and event notices in, finished traces out.

One process-wide :class:`Tracer` receives every notice of the root dispatcher (through the
handlers in `_handlers`). It is inert unless a notice belongs to a span it already tracks or
a recorder is active in the current context (`active_scopes`, a context variable), so
calls outside a ``with recorder:`` block cost one dict lookup and one context-variable read.

A span starts a :class:`Trace` when its `instance` is the object of an active recorder and
none of its tracked ancestors belongs to that recorder already (the nearest watched
ancestor owns the record). Children join the traces of their parent. A trace ends when its
root span ends — or, for a streamed answer, when the stream ends — and is handed to its
recorder, which builds the record.

Every method here runs on the application's thread (or a thread LlamaIndex started for it)
and does O(1) work per notice, apart from the end of a trace (linear in its spans).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.chat_engine.types import StreamingAgentChatResponse
from llama_index.core.instrumentation.events.chat_engine import StreamChatDeltaReceivedEvent
from llama_index.core.instrumentation.events.embedding import EmbeddingStartEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)

from scrutiny.core import Span, SpanKind
from scrutiny.core import recording_suppressed as _suppressed
from scrutiny.core._courtesy import offer as _offer_gil
from scrutiny.integrations.llama_index._convert import (
    STREAM_WRITER_METHODS,
    SpanInputs,
    embedding_view,
    llm_text,
    name_and_kind,
    nodes_view,
    span_output,
    usage_of,
)
from scrutiny.integrations.llama_index._streams import traced_agen, traced_gen

_SpanCancelledEvent: type | None
try:  # (LlamaIndex's workflows package; older llama-index-core has none)
    from workflows.runtime.types.step_function import SpanCancelledEvent

    _SpanCancelledEvent = SpanCancelledEvent
except ImportError:  # pragma: no cover - depends on the installed llama-index-core
    _SpanCancelledEvent = None

if TYPE_CHECKING:
    from scrutiny.integrations.llama_index._recorder import LlamaIndexRecorder, Recording

__all__ = ["Scope", "Trace", "Tracer", "active_scopes", "describe_error"]

logger = logging.getLogger("scrutiny")

_RETRIEVER = SpanKind.RETRIEVER.value
_EMBEDDING = SpanKind.EMBEDDING.value

active_scopes: contextvars.ContextVar[tuple[Scope, ...]] = contextvars.ContextVar(
    "scrutiny_llama_index_scopes", default=())
"""The ``with recorder:`` blocks active in this context, innermost last."""


def describe_error(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Scope:
    """One active ``with recorder as recording:`` block."""

    __slots__ = ("app", "recorder", "recording")

    def __init__(self, recorder: LlamaIndexRecorder, recording: Recording) -> None:
        self.recorder = recorder
        self.recording = recording
        self.app = recorder.app


class Trace:
    """What is known about one recorded root call while it runs.

    A trace ends once: when its root span ends (or is dropped), unless the root returned a
    stream, in which case when that stream ends too.
    """

    __slots__ = ("_lock", "_root_ended", "_stream_ended", "_tracer", "contexts", "end_time",
                 "finished", "root", "root_error", "root_result", "scope", "source_contexts",
                 "spans", "stream_complete", "stream_error", "streamed", "tags", "tokens")

    def __init__(self, tracer: Tracer, scope: Scope, root: Span,
                 tags: Mapping[str, Any] | None) -> None:
        self._tracer = tracer
        self.scope = scope
        self.root = root
        self.spans: list[Span] = [root]
        self.contexts: list[str] = []
        self.source_contexts: list[str] | None = None
        """The texts of the nodes the answer was written from (the response's
        `source_nodes`, after postprocessors and rerankers), when the root returned them."""
        self.tokens: list[Any] = []
        self.tags = dict(tags) if tags else {}
        self.root_result: Any = None
        self.root_error: BaseException | None = None
        self.streamed = False
        self.stream_error: BaseException | None = None
        self.stream_complete = True
        self.end_time: float | None = None
        self.finished = False
        self._root_ended = False
        self._stream_ended = False
        # Reentrant: a stream's finalizer may run (from the garbage collector) anywhere.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ transitions
    def root_ended(self, result: Any, error: BaseException | None) -> None:
        """The root span ended; wrap a returned stream so the trace lasts until it ends."""
        with self._lock:
            if self._root_ended:
                return
            self._root_ended = True
            self.root_result = result
            self.root_error = error
            self.source_contexts = _source_texts(result)
            if error is None:
                self._follow_stream(result)
            if self.streamed:
                # Hold no reference to the stream: dropping it unconsumed must end the trace.
                self.root_result = None
            ready = not self.streamed or self._stream_ended
        if ready:
            self.finish()

    def _follow_stream(self, result: Any) -> None:
        root_id = self.root.span_id
        if isinstance(result, StreamingResponse) and result.response_gen is not None \
                and result.response_txt is None:
            self.streamed = True
            result.response_gen = traced_gen(result.response_gen, root_id, self.tokens,
                                             self.stream_ended)
        elif isinstance(result, AsyncStreamingResponse) and result.response_gen is not None \
                and result.response_txt is None:
            self.streamed = True
            result.response_gen = traced_agen(result.response_gen, root_id, self.tokens,
                                              self.stream_ended)
        elif isinstance(result, StreamingAgentChatResponse) and (
                result.write_response_to_history_thread is not None
                or result.awrite_response_to_history_task is not None):
            # Its (a)write_response_to_history span ends the stream (see Tracer.exit).
            self.streamed = True
            if not self._stream_ended:
                weakref.finalize(result, self.stream_ended, None, False).atexit = False

    def stream_ended(self, error: BaseException | None, complete: bool) -> None:
        """The stream of the root's answer ended (exhausted, failed, stopped or dropped)."""
        with self._lock:
            if self._stream_ended:
                return
            self._stream_ended = True
            self.stream_error = error
            self.stream_complete = complete
            self.end_time = time.time()
            ready = self._root_ended
        if ready:
            self.finish()

    def finish(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = True
        if self.end_time is None:
            self.end_time = self.root.end_time or time.time()
        self._tracer.forget(self)
        try:
            self.scope.recorder._trace_finished(self)
        except Exception:
            logger.exception("scrutiny: turning a LlamaIndex trace into a record failed; "
                             "the application is not affected")


Member = tuple[Span, Trace, bool]
"""A span in one trace, and whether it runs inside a retrieval of that trace."""


class Tracer:
    """Routes LlamaIndex span and event notices to the traces they belong to."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[Member, ...]] = {}
        self._lock = threading.Lock()
        self._events: dict[type, Callable[[tuple[Member, ...], Any], None]] = {
            LLMCompletionStartEvent: _on_model_start,
            LLMChatStartEvent: _on_model_start,
            EmbeddingStartEvent: _on_embedding_start,
            LLMCompletionEndEvent: _on_model_end,
            LLMChatEndEvent: _on_model_end,
            StreamChatDeltaReceivedEvent: _on_chat_delta,
        }
        if _SpanCancelledEvent is not None:
            self._events[_SpanCancelledEvent] = _on_span_cancelled

    # ------------------------------------------------------------------ spans
    def enter(self, id_: str, arguments: Mapping[str, Any], instance: Any,
              parent_id: str | None, tags: Mapping[str, Any] | None) -> None:
        parents = self.members.get(parent_id) if parent_id is not None else None
        scopes = active_scopes.get()
        owners = [s for s in scopes if s.app is instance] if scopes and instance is not None \
            else None
        if owners and len(owners) > 1:
            owners = _innermost_per_recorder(owners)
        if parents is None and not owners:
            return
        if _suppressed():
            return
        _offer_gil()  # to evaluations that are late (see scrutiny.core._courtesy)
        name, kind = name_and_kind(id_, instance)
        now = time.time()
        inputs = SpanInputs(arguments)
        if parents is not None and len(parents) == 1 and not owners:  # the common case
            parent, trace, in_retrieval = parents[0]
            if trace.finished:
                return
            span = Span(id_, parent_id, name, kind, now, inputs=inputs)
            trace.spans.append(span)
            self.members[id_] = ((span, trace, in_retrieval or parent.kind == _RETRIEVER),)
            if trace.finished:  # it ended while this span was being added
                self._prune(id_)
            return
        members: list[Member] = []
        if parents is not None:
            span = Span(id_, parent_id, name, kind, now, inputs=inputs)
            for parent, trace, in_retrieval in parents:
                if not trace.finished:
                    trace.spans.append(span)
                    members.append((span, trace, in_retrieval or parent.kind == _RETRIEVER))
        for scope in owners or ():
            if not any(m[1].scope is scope for m in members):
                root = Span(id_, None, name, kind, now, inputs=inputs)
                if parent_id is not None:
                    root.metadata["llama_index_parent_id"] = parent_id
                members.append((root, Trace(self, scope, root, tags), False))
                scope.recording._opened()
        if not members:
            return
        self.members[id_] = tuple(members)
        for member in members:
            if member[1].finished:  # a trace ended while this span was being added
                self._prune(id_)
                break

    def exit(self, id_: str, instance: Any, result: Any) -> None:
        members = self.members.get(id_)
        if members is None:
            return
        now = time.time()
        kind = members[0][0].kind
        output = span_output(result)
        if kind == _EMBEDDING:
            output = embedding_view(output)
        contexts = _texts(output) if kind == _RETRIEVER else None
        writer = isinstance(instance, StreamingAgentChatResponse)
        for span, trace, in_retrieval in members:
            span.end_time = now
            if output is not None:
                span.outputs = output
            if contexts is not None and not in_retrieval:
                trace.contexts.extend(contexts)
            if span is trace.root:
                trace.root_ended(result, None)
            elif writer and _ends_stream(span, trace):
                trace.stream_ended(None, True)

    def drop(self, id_: str, instance: Any, error: BaseException | None) -> None:
        members = self.members.get(id_)
        if members is None:
            return
        now = time.time()
        text = describe_error(error) if error is not None else "dropped"
        writer = isinstance(instance, StreamingAgentChatResponse)
        for span, trace, _ in members:
            span.end_time = now
            span.error = text
            if span is trace.root:
                trace.root_ended(None, error or RuntimeError("dropped"))
            elif writer and _ends_stream(span, trace):
                trace.stream_ended(error, False)

    # ------------------------------------------------------------------ events
    def event(self, event: Any) -> None:
        span_id = event.span_id
        if span_id is None:
            return
        members = self.members.get(span_id)
        if members is None:
            return
        action = self._events.get(type(event))
        if action is not None:
            action(members, event)

    # ------------------------------------------------------------------ cleanup
    def forget(self, trace: Trace) -> None:
        """Stop routing the spans of a finished trace."""
        with self._lock:
            for span in trace.spans:
                self._prune_locked(span.span_id)

    def _prune(self, span_id: str) -> None:
        with self._lock:
            self._prune_locked(span_id)

    def _prune_locked(self, span_id: str) -> None:
        members = self.members.get(span_id)
        if members is None:
            return
        if len(members) == 1:
            if members[0][1].finished:
                del self.members[span_id]
            return
        alive = tuple(m for m in members if not m[1].finished)
        if alive:
            self.members[span_id] = alive
        else:
            del self.members[span_id]

    def open_traces(self) -> int:
        """How many traces are still being recorded (for tests and diagnostics)."""
        return len({id(m[1]) for ms in list(self.members.values()) for m in ms})


def _innermost_per_recorder(owners: list[Scope]) -> list[Scope]:
    """Nested blocks of one recorder record a call once, in the innermost block (each made
    a record of it: the call was stored twice and judged twice); two recorders of one app
    each record it."""
    seen: set[int] = set()
    kept: list[Scope] = []
    for scope in reversed(owners):
        if id(scope.recorder) not in seen:
            seen.add(id(scope.recorder))
            kept.append(scope)
    kept.reverse()
    return kept


def _ends_stream(span: Span, trace: Trace) -> bool:
    """Is `span` (of a streaming chat response) the writer of `trace`'s streamed answer?"""
    return span.parent_id == trace.root.span_id and \
        span.name.rpartition(".")[2] in STREAM_WRITER_METHODS


def _source_texts(result: Any) -> list[str] | None:
    """The texts of a response's `source_nodes` (query and chat engines' responses), or
    None when the result has none to give."""
    try:
        nodes = getattr(result, "source_nodes", None)
        if not isinstance(nodes, list):
            return None
        return _texts(nodes_view(nodes))
    except Exception:  # a response we cannot read: the retrieved nodes stand in
        return None


def _texts(output: Any) -> list[str] | None:
    """The texts of retrieved nodes (as `nodes_view` gives them)."""
    if not isinstance(output, list):
        return None
    return [str(n.get("text", "")) if isinstance(n, dict) else str(n) for n in output]


def _on_model_start(members: tuple[Member, ...], event: Any) -> None:
    model_dict = event.model_dict
    model = model_dict.get("model") or model_dict.get("model_name")
    if model:
        for span, _, _ in members:
            span.model = str(model)


def _on_embedding_start(members: tuple[Member, ...], event: Any) -> None:
    model = event.model_dict.get("model_name")
    if model:
        for span, _, _ in members:
            span.model = str(model)


def _on_model_end(members: tuple[Member, ...], event: Any) -> None:
    response = event.response
    if response is None:
        return
    usage = usage_of(response)
    for span, _, _ in members:
        span.usage = usage
        if span.outputs is None:
            span.outputs = llm_text(response)
        if span.end_time is not None:  # a stream: its call returned before the tokens
            span.end_time = time.time()


def _on_span_cancelled(members: tuple[Member, ...], event: Any) -> None:
    """A workflow run cancelled by its handler (``handler.cancel_run()``) sends this, then
    ends its span normally with no result: it was recorded as an `ok` run."""
    reason = str(getattr(event, "reason", "") or "cancelled")
    for span, trace, _ in members:
        if span is trace.root:
            span.end_time = time.time()
            span.error = f"CancelledError: {reason}"
            trace.root_ended(None, asyncio.CancelledError(reason))


def _on_chat_delta(members: tuple[Member, ...], event: Any) -> None:
    for _, trace, _ in members:
        trace.tokens.append(event.delta)
