"""Span bookkeeping: LlamaIndex span and event notices in, finished traces out.

One process-wide :class:`Tracer` receives every notice of the root dispatcher (through the
handlers in `_handlers`). It is inert unless a notice belongs to a span it already tracks or
a recorder is active in the current context (`active_scopes`, a context variable), so
calls outside a ``with recorder:`` block cost one dict lookup and one context-variable read.

A span starts a :class:`Trace` when its `instance` is the object of an active recorder and
none of its tracked ancestors belongs to that recorder already (the nearest watched
ancestor owns the record). Children join the traces of their parent. A trace ends when its
root span ends — or, for a streamed answer (also a workflow's stop event's stream), when
the stream ends — and is handed to its recorder, which builds the record.

An agent run by an `AgentWorkflow` has no span of its own: an :class:`AgentRun` watches
each run of a workflow with a recorded agent, and starts a trace (with a root span of its
own) for each turn such an agent takes, which that turn's steps join.

Every method here runs on the application's thread (or a thread LlamaIndex started for it)
and does O(1) work per notice, apart from the end of a trace (linear in its spans).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from types import AsyncGeneratorType, FrameType, GeneratorType
from typing import TYPE_CHECKING, Any

from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.chat_engine.types import StreamingAgentChatResponse
from llama_index.core.instrumentation.events.chat_engine import StreamChatDeltaReceivedEvent
from llama_index.core.instrumentation.events.embedding import EmbeddingStartEvent
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
)

from scrutiny.core import Span, SpanKind
from scrutiny.core import recording_suppressed as _suppressed
from scrutiny.core._courtesy import offer as _offer_gil
from scrutiny.core._evaluate import describe_error
from scrutiny.core._runtime import end_when_dropped, exit_stage
from scrutiny.core._usage import USAGE_REPEATS
from scrutiny.integrations.llama_index._convert import (
    SpanInputs,
    answer_of,
    embedding_view,
    event_text,
    is_event,
    kind_of,
    llm_text,
    main_input,
    main_output,
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

__all__ = ["USAGE_REPEATS", "Scope", "Trace", "Tracer", "active_scopes"]

logger = logging.getLogger("scrutiny")

_RETRIEVER = SpanKind.RETRIEVER.value
_EMBEDDING = SpanKind.EMBEDDING.value
_LLM = SpanKind.LLM.value
_CHAT_MODEL = SpanKind.CHAT_MODEL.value
_MODEL_STREAMS = frozenset(("stream_complete", "stream_chat", "astream_complete",
                            "astream_chat"))
"""A model's streaming methods: LlamaIndex's model wrappers (`llm_completion_callback`,
`llm_chat_callback`) report their chunks and end as events of their own span."""
_STRUCTURED_STREAMS = frozenset(("stream_structured_predict", "astream_structured_predict"))
"""A model's streams of partial structured answers: their generator is the call's body,
which calls the model as it is read and reports each partial answer and the end as events
(of no span of its own)."""

_HOUSEKEEPING = frozenset(("reset",))
"""Public methods that answer nothing (a chat engine's `reset`)."""


def _answers(name: str) -> bool:
    """Whether a call of the span's method (``"Class.method"``) on a recorded object is a
    call to record. LlamaIndex makes a span of every implementation of an abstract
    method, so the object's helpers have spans too: its private methods
    (`_prepare_chat_with_tools`, `_get_prompts`, `_update_prompts`, ...) and
    housekeeping (`reset`) are parts of a record at most, never records."""
    method = name.rpartition(".")[2]
    return not (method[:1] == "_" and method[:2] != "__") and method not in _HOUSEKEEPING



active_scopes: contextvars.ContextVar[tuple[Scope, ...]] = contextvars.ContextVar(
    "scrutiny_llama_index_scopes", default=())
"""The ``with recorder:`` blocks active in this context, innermost last."""



_WAITING = "WaitingForEvent"
"""What the workflows runtime raises in a step that waits (`ctx.wait_for_event`)."""

_FOLLOWED = (StreamingResponse, AsyncStreamingResponse, StreamingAgentChatResponse)
"""Responses whose stream is followed (see Trace._follow_stream)."""

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

    __slots__ = ("_awaited", "_following", "_lock", "_root_ended", "_stream_ended", "_tracer",
                 "_usage_reports", "_writers", "asked", "contexts", "end_time", "finished",
                 "model_stream", "resumed", "resumed_with", "root", "root_error",
                 "root_result", "scope", "source_contexts", "spans", "stream_complete",
                 "stream_error", "stream_span", "stream_unread_at_exit", "streamed",
                 "structured", "tags", "tokens")

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
        self.stream_unread_at_exit = False
        """The process exited with the stream still unread (see end_when_dropped)."""
        self.end_time: float | None = None
        self.finished = False
        self._root_ended = False
        self._stream_ended = False
        self._writers: dict[str, _Writer] = {}
        """The streaming chat responses written in this trace, by their writer's span id."""
        self._following: _Writer | None = None
        """The writer of the streaming chat response the root answered with."""
        self._awaited: weakref.ref[Any] | None = None
        """That response, while its writer has not started."""
        self.model_stream: weakref.ref[Any] | None = None
        """The stream a model recorded alone returned (see `_follow_stream`)."""
        self.stream_span: str | None = None
        """The model call whose events carry that stream's chunks and end."""
        self.structured = False
        """That stream gives partial structured answers (`stream_structured_predict`): its
        tokens are those answers, the last one the output."""
        self._usage_reports: dict[int, tuple[Any, str]] | None = None
        inputs = root.inputs
        self.resumed = isinstance(inputs, Mapping) and "init_state" in inputs and \
            "start_event" in inputs and inputs["start_event"] is None
        """A workflow run resumed from a saved context (no start event of its own)."""
        self.resumed_with: tuple[int, Any] | None = None
        """Such a run's input, with its rank (see `step_started`)."""
        self.asked: Any = None
        """The request for input (an `InputRequiredEvent`) the run's steps last made and
        no step has answered yet."""
        """The model responses that reported usage in this trace (kept alive, by id), each
        with the span it was first reported to."""
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
            self.source_contexts = _source_texts(answer_of(result))
            if error is None and not self.streamed:  # (else followed since its step ended)
                self._follow_stream(result)
            if self.streamed:
                # Hold no reference to the stream: dropping it unconsumed must end the trace.
                self.root_result = None
            ready = not self.streamed or self._stream_ended or error is not None
        if ready:
            self.finish()

    def step_returned(self, result: Any) -> None:
        """A direct step of the root returned `result`, with no output of its own to show
        (a stream, say). A workflow run's step that returns a stop event carrying a stream
        hands it to `handler.stream_events()` readers before the run ends: it is followed
        now, so that they read the stream whose tokens are collected."""
        if not is_event(result, "StopEvent"):
            return
        with self._lock:
            if not self._root_ended and not self.streamed:
                self._follow_stream(result)

    def _follow_stream(self, result: Any) -> None:
        root_id = self.root.span_id
        if isinstance(result, GeneratorType | AsyncGeneratorType) and self.root.kind in (
                _LLM, _CHAT_MODEL):
            # A model recorded alone, streaming. LlamaIndex's model wrapper returns the very
            # generator the caller gets (it cannot be replaced here) and reports each
            # chunk, the end, a failure or an early stop as events of its span: this one
            # (`stream_complete`, `astream_chat`, ...), or the streaming call this one's
            # token stream reads (`llm.stream(prompt)` reads `stream_complete`).
            method = self.root.name.rpartition(".")[2]
            if method in _MODEL_STREAMS:
                self.stream_span = root_id
            elif method in _STRUCTURED_STREAMS:
                # Its partial answers come as events from its generator's frame (see
                # Tracer._structured); the model streams it reads are not the answer.
                self.structured = True
                self.stream_span = root_id
            if self.stream_span is not None:
                self.streamed = True
                self.model_stream = weakref.ref(result)
                self._tracer.model_streams.append(self)
                end_when_dropped(result, self.stream_ended, None, False)
            return
        if is_event(result, "StopEvent"):
            # A workflow's answer is its stop event's result: the stream the caller gets
            # (read from the event itself: a typed stop event's answer is its values, a
            # stream among them).
            inner = getattr(result, "_result", None)
            # (a token generator is replaced where the caller will get it from)
            if isinstance(inner, GeneratorType):
                self.streamed = True
                result._result = traced_gen(inner, root_id, self.tokens, self.stream_ended)
                return
            if isinstance(inner, AsyncGeneratorType):
                self.streamed = True
                result._result = traced_agen(inner, root_id, self.tokens, self.stream_ended)
                return
            result = inner if isinstance(inner, _FOLLOWED) else answer_of(result)
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
            # Its (a)write_response_to_history span ends the stream (see writer_ended).
            self.streamed = True
            writer = next((w for w in self._writers.values() if w.response() is result),
                          None)
            if writer is not None:
                self._follow(writer)
            else:  # its writer has not started yet (see writer_started)
                self._awaited = weakref.ref(result)
            if not self._stream_ended:
                end_when_dropped(result, self.stream_ended, None, False)

    def _follow(self, writer: _Writer) -> None:
        self._following = writer
        self._awaited = None
        self.tokens = writer.tokens
        if writer.ended is not None:
            self._end_stream(*writer.ended)

    def writer_started(self, span_id: str, response: StreamingAgentChatResponse) -> None:
        """A streaming chat response started writing its stream (a span of this trace)."""
        with self._lock:
            writer = _Writer(response)
            self._writers[span_id] = writer
            awaited = self._awaited
            if awaited is not None and awaited() is response:
                self._follow(writer)

    def writer_delta(self, span_id: str, delta: Any) -> None:
        writer = self._writers.get(span_id)
        if writer is not None:
            writer.tokens.append(delta)

    def writer_ended(self, span_id: str, error: BaseException | None,
                     complete: bool) -> None:
        """A streaming chat response of this trace is written (or failed writing)."""
        with self._lock:
            writer = self._writers.get(span_id)
            if writer is None:
                return
            writer.ended = (error, complete)
            ready = writer is self._following and self._end_stream(error, complete) \
                and self._root_ended
        if ready:
            self.finish()

    def stream_ended(self, error: BaseException | None, complete: bool) -> None:
        """The stream of the root's answer ended (exhausted, failed, stopped or dropped)."""
        with self._lock:
            ready = self._end_stream(error, complete) and self._root_ended
        if ready:
            self.finish()

    def _end_stream(self, error: BaseException | None, complete: bool) -> bool:
        """Note the end of the answer's stream; False if it had ended already."""
        if self._stream_ended:
            return False
        self._stream_ended = True
        self.stream_error = error
        self.stream_complete = complete
        self.stream_unread_at_exit = not complete and error is None and exit_stage() == 1
        self.end_time = time.time()
        return True

    def step_started(self, event: Any) -> None:
        """A step of the root (a workflow run) started with `event`. A run resumed from a
        saved context has no start event: its input is the human's response it was
        resumed with (a `HumanResponseEvent` step), else the start event a step runs
        again with (the question of a step that waited with `ctx.wait_for_event`)."""
        if event is None:
            return
        self.asked = None  # (a step runs: the run goes on, answered or not)
        if not self.resumed:
            return
        rank = 2 if is_event(event, "HumanResponseEvent") else \
            1 if is_event(event, "StartEvent") else 0
        if rank and (self.resumed_with is None or rank > self.resumed_with[0]):
            self.resumed_with = (rank, event_text(event))

    def step_asked(self, event: Any) -> None:
        """A step of the root asked for input (returned or waits for an
        `InputRequiredEvent`)."""
        if is_event(event, "InputRequiredEvent"):
            self.asked = event

    def response_reported(self, span: Span, response: Any) -> None:
        """A model call's span got `response`. A call that hands on the very response of
        a call it made (a `CustomLLM`'s async stream reads its sync stream, and both
        report at the end, in sibling spans) repeats that report: it is marked so that
        the record counts the tokens once, and a selection of model calls selects the
        call once (see `USAGE_REPEATS`)."""
        reports = self._usage_reports
        if reports is None:
            reports = self._usage_reports = {}
        first = reports.setdefault(id(response), (response, span.span_id))
        if first[1] != span.span_id:
            span.metadata[USAGE_REPEATS] = first[1]

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


_STRUCTURED_EVENTS = frozenset((LLMStructuredPredictInProgressEvent,
                                LLMStructuredPredictEndEvent))


class _Writer:
    """A streaming chat response being written inside a trace: its deltas and its end."""

    __slots__ = ("ended", "response", "tokens")

    def __init__(self, response: StreamingAgentChatResponse) -> None:
        self.response = weakref.ref(response)
        self.tokens: list[Any] = []
        self.ended: tuple[BaseException | None, bool] | None = None


Member = tuple[Span, Trace, bool]
"""A span in one trace, and whether it runs inside a retrieval of that trace."""


class Tracer:
    """Routes LlamaIndex span and event notices to the traces they belong to."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[Member, ...]] = {}
        self.runs: dict[str, AgentRun] = {}
        """Multi-agent runs (`AgentWorkflow`) with a recorded agent, by run span id."""
        self.steps: dict[str, AgentRun] = {}
        """The steps of those runs that are part of a recorded agent's turn."""
        self.model_streams: list[Trace] = []
        """Traces of a model's own streaming call whose stream is still open."""
        self._lock = threading.Lock()
        self._events: dict[type, Callable[[tuple[Member, ...], Any], None]] = {
            LLMCompletionStartEvent: _on_model_start,
            LLMChatStartEvent: _on_model_start,
            EmbeddingStartEvent: _on_embedding_start,
            LLMCompletionEndEvent: _on_model_end,
            LLMChatEndEvent: _on_model_end,
            LLMCompletionInProgressEvent: _on_model_chunk,
            LLMChatInProgressEvent: _on_model_chunk,
            ExceptionEvent: _on_exception,
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
        # a step of a multi-agent run in which a recorded agent may take a turn
        run = self.runs.get(parent_id) if self.runs and parent_id is not None else None
        # a multi-agent run with a recorded agent among its agents
        agents = _agent_scopes(instance, scopes) if scopes else None
        if parents is None and not owners and run is None and not agents:
            return
        if _suppressed():
            return
        if parents is None and owners and self.model_streams:
            host = self._streaming(owners)
            if host is not None:  # a call the model's stream makes while it is read
                parents, parent_id = ((host.root, host, False),), host.root.span_id
        name, kind = name_and_kind(id_, instance)
        if owners and not _answers(name):  # (a helper: `_get_prompts`, `reset`)
            owners = None
            if parents is None and run is None and not agents:
                return
        _offer_gil()  # to evaluations that are late (see scrutiny.core._courtesy)
        now = time.time()
        inputs = SpanInputs(arguments)
        if parents is not None and len(parents) == 1 and not owners and run is None \
                and not agents:  # the common case
            parent, trace, in_retrieval = parents[0]
            if trace.finished:
                return
            span = Span(id_, parent_id, name, kind, now, inputs=inputs)
            trace.spans.append(span)
            self.members[id_] = ((span, trace, in_retrieval or parent.kind == _RETRIEVER),)
            if isinstance(instance, StreamingAgentChatResponse):
                trace.writer_started(id_, instance)
            elif parent is trace.root and "ev" in arguments:  # a workflow's step
                trace.step_started(arguments["ev"])
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
                    if parent is trace.root and "ev" in arguments:  # a workflow's step
                        trace.step_started(arguments["ev"])
        for scope in owners or ():
            if not any(m[1].scope is scope for m in members):
                root = Span(id_, None, name, kind, now, inputs=inputs.as_given())
                if parent_id is not None:
                    root.metadata["llama_index_parent_id"] = parent_id
                members.append((root, Trace(self, scope, root, tags), False))
                scope.recording._opened()
        if agents and name.rpartition(".")[2] == "run":
            self.runs[id_] = AgentRun(self, id_, instance, agents)
        if run is not None:
            members.extend(run.step_entered(id_, name, kind, now, inputs, arguments, tags,
                                            parents or ()))
        if not members:
            return
        self.members[id_] = tuple(members)
        if isinstance(instance, StreamingAgentChatResponse):
            for member in members:
                member[1].writer_started(id_, instance)
        for member in members:
            if member[1].finished:  # a trace ended while this span was being added
                self._prune(id_)
                break

    def exit(self, id_: str, instance: Any, result: Any) -> None:
        members = self.members.get(id_)
        if members is not None:
            self._exited(members, id_, instance, result)
        if self.runs:
            self._agent_span_ended(id_, result, None)

    def _exited(self, members: tuple[Member, ...], id_: str, instance: Any,
                result: Any) -> None:
        now = time.time()
        kind = members[0][0].kind
        output = span_output(result)
        if kind == _EMBEDDING:
            output = embedding_view(output)
        contexts = _texts(output) if kind == _RETRIEVER else None
        writer = isinstance(instance, StreamingAgentChatResponse)
        streams = isinstance(result, GeneratorType | AsyncGeneratorType) and kind in (
            _LLM, _CHAT_MODEL) and members[0][0].name.rpartition(".")[2] in _MODEL_STREAMS
        for span, trace, in_retrieval in members:
            span.end_time = now
            if output is not None:
                span.outputs = output
            if contexts is not None and not in_retrieval:
                trace.contexts.extend(contexts)
            if streams and trace.stream_span is None:
                trace.stream_span = id_  # (the root may hand its stream on: `llm.stream`)
            if span is trace.root:
                trace.root_ended(result, None)
            elif writer:
                trace.writer_ended(id_, None, True)
            elif output is None and result is not None \
                    and span.parent_id == trace.root.span_id:
                trace.step_returned(result)
            elif result is not None and span.parent_id == trace.root.span_id:
                trace.step_asked(result)

    def drop(self, id_: str, instance: Any, error: BaseException | None) -> None:
        members = self.members.get(id_)
        if members is not None:
            self._dropped(members, id_, instance, error)
        if self.runs:
            self._agent_span_ended(id_, None, error or RuntimeError("dropped"))

    def _dropped(self, members: tuple[Member, ...], id_: str, instance: Any,
                 error: BaseException | None) -> None:
        now = time.time()
        text = describe_error(error) if error is not None else "dropped"
        writer = isinstance(instance, StreamingAgentChatResponse)
        waiting = type(error).__name__ == _WAITING
        for span, trace, _ in members:
            span.end_time = now
            if waiting and span is not trace.root:
                # `ctx.wait_for_event`: the workflow runtime's signal that the step waits
                # (it runs again once the event comes), not a failure
                asked = getattr(getattr(error, "add", None), "waiter_event", None)
                span.metadata["waiting_for"] = str(getattr(
                    getattr(getattr(error, "add", None), "event_type", None), "__name__", ""))
                trace.step_asked(asked)
                continue
            span.error = text
            if span is trace.root:
                trace.root_ended(None, error or RuntimeError("dropped"))
            elif writer:
                trace.writer_ended(id_, error, False)

    # ------------------------------------------------------------------ events
    def event(self, event: Any) -> None:
        if self.model_streams and type(event) in _STRUCTURED_EVENTS:
            self._structured(event)
            return
        span_id = event.span_id
        if span_id is None:
            return
        if self.runs and type(event) is _SpanCancelledEvent:
            run = self.runs.get(span_id)
            if run is not None:  # (the run's span then ends normally, with no result)
                run.cancelled = str(getattr(event, "reason", "") or "cancelled")
        members = self.members.get(span_id)
        if members is None:
            return
        action = self._events.get(type(event))
        if action is not None:
            action(members, event)

    def _agent_span_ended(self, id_: str, result: Any, error: BaseException | None) -> None:
        """A multi-agent run with a recorded agent, or one of its steps in a turn, ended."""
        run = self.steps.pop(id_, None)
        if run is not None:
            if error is None:  # (a failed step may be retried: the run's end tells)
                run.step_ended(result)
            return
        run = self.runs.pop(id_, None)
        if run is not None:
            run.ended(result, error)

    def _structured(self, event: Any) -> None:
        """A partial answer or the end of a stream of structured answers, sent from its
        generator's frame, with the span of whoever reads it (none of the stream's)."""
        host = self._streaming(None)
        if host is None or not host.structured:
            return
        if type(event) is LLMStructuredPredictInProgressEvent:
            host.tokens.append(event.output)
        else:
            host.stream_ended(None, True)

    def _streaming(self, owners: list[Scope] | None) -> Trace | None:
        """The trace of a model's stream that is making the current call: one of these
        recorders' streams (any, for None) whose generator is running on this very stack
        (the innermost one). Its model's calls run in the reader's context, with no span
        active: `MockLLM.astream_complete`'s stream reads `stream_complete`, and that call
        was a record of its own. A generator counts as running as long as it waits (on a
        socket, in another thread; on an await, in another task): a call of another
        request made meanwhile is no call of its stream."""
        frames: dict[Any, Trace] = {}
        for trace in self.model_streams:
            stream = trace.model_stream() if trace.model_stream is not None else None
            if stream is None or trace.finished or (
                    owners is not None and trace.scope not in owners):
                continue
            if getattr(stream, "gi_running", False):
                frames[stream.gi_frame] = trace
            elif getattr(stream, "ag_running", False):
                frames[stream.ag_frame] = trace
        if not frames:
            return None
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            host = frames.get(frame)
            if host is not None:
                return host
            frame = frame.f_back
        return None

    # ------------------------------------------------------------------ cleanup
    def forget(self, trace: Trace) -> None:
        """Stop routing the spans of a finished trace."""
        with self._lock:
            for span in trace.spans:
                self._prune_locked(span.span_id)
            if trace.model_stream is not None:
                try:
                    self.model_streams.remove(trace)
                except ValueError:
                    pass

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
        """How many traces are still being recorded, and multi-agent runs watched for a
        recorded agent (for tests and diagnostics)."""
        traces = {id(m[1]) for ms in list(self.members.values()) for m in ms}
        traces.update(id(t) for t in list(self.model_streams))
        return len(traces) + len(self.runs)


_MULTI_AGENT_MODULE = "llama_index.core.agent.workflow.multi_agent_workflow"
_multi_agent_types: dict[type, bool] = {}


def _agent_scopes(instance: Any, scopes: tuple[Scope, ...]) -> list[Scope] | None:
    """The active blocks recording one of the agents of `instance`, when it is a
    multi-agent workflow (an `AgentWorkflow`); None for anything else."""
    if instance is None:
        return None
    cls = type(instance)
    multi = _multi_agent_types.get(cls)
    if multi is None:  # (not imported: no AgentWorkflow can exist, none is imported here)
        base = getattr(sys.modules.get(_MULTI_AGENT_MODULE), "AgentWorkflow", None)
        multi = isinstance(base, type) and issubclass(cls, base)
        if len(_multi_agent_types) < 1_000:
            _multi_agent_types[cls] = multi
    if not multi:
        return None
    agents = getattr(instance, "agents", None)
    if not isinstance(agents, Mapping):
        return None
    found = [s for s in scopes if any(s.app is a for a in agents.values())]
    return _innermost_per_recorder(found) if len(found) > 1 else found


class AgentRun:
    """One run of a multi-agent workflow (an `AgentWorkflow`) with a recorded agent.

    The agents of such a run make no calls of their own: the workflow's steps run them,
    each step naming the agent whose turn it is. A *turn* of an agent lasts from the step
    that hands it the conversation (an event naming it the current agent) to the step
    that ends the run (a stop event) or hands the conversation to another agent; the
    steps in between (tool calls, the model's calls) belong to it. Each turn of a recorded
    agent is one record of its recorder, under a root span ``<AgentClass>.turn``: input
    the last user message the agent was given, output its answer (or, for a turn that
    ends with a hand-off, the tool call it ended with). The run ending — failed or
    cancelled — ends an open turn with it.
    """

    __slots__ = ("agent", "cancelled", "last_output", "run_id", "scopes", "steps", "tracer",
                 "turns", "workflow")

    def __init__(self, tracer: Tracer, run_id: str, workflow: Any,
                 scopes: list[Scope]) -> None:
        self.tracer = tracer
        self.run_id = run_id
        self.workflow = workflow
        self.scopes = scopes
        self.agent: Any = None
        """The agent whose turn it is (recorded or not)."""
        self.turns: list[Trace] = []
        """Its turn's traces, one per recorder of that agent."""
        self.last_output: Any = None
        """Its last output (an `AgentOutput`) in this turn."""
        self.cancelled: str | None = None
        self.steps: set[str] = set()

    def _agent_named(self, name: Any) -> Any:
        agents = getattr(self.workflow, "agents", None)
        return agents.get(name) if isinstance(agents, Mapping) else None

    def step_entered(self, id_: str, name: str, kind: str, now: float, inputs: SpanInputs,
                     arguments: Mapping[str, Any], tags: Mapping[str, Any] | None,
                     run_members: tuple[Member, ...]) -> list[Member]:
        """A step of the run starts: it may start a turn; it joins the turn going on."""
        event = arguments.get("ev")
        agent_name = getattr(event, "current_agent_name", None) if event is not None \
            else None
        if isinstance(agent_name, str):
            agent = self._agent_named(agent_name)
            if agent is not self.agent:
                self._end_turn(self.last_output, None)
                self.agent = agent
                self._start_turn(agent, agent_name, event, now, tags, run_members)
        members: list[Member] = []
        for trace in self.turns:
            if not trace.finished:
                span = Span(id_, trace.root.span_id, name, kind, now, inputs=inputs)
                trace.spans.append(span)
                members.append((span, trace, False))
        if members:
            self.steps.add(id_)
            self.tracer.steps[id_] = self
        return members

    def _start_turn(self, agent: Any, agent_name: str, event: Any, now: float,
                    tags: Mapping[str, Any] | None, run_members: tuple[Member, ...]) -> None:
        self.last_output = None
        # (a run already inside a record of a recorder stays in that record)
        owners = [s for s in self.scopes if s.app is agent
                  and not any(m[1].scope is s for m in run_members)]
        if not owners:
            return
        cls = type(agent).__name__
        question = main_input({"messages": getattr(event, "input", None)})
        inputs = SpanInputs({"message": question, "agent": agent_name})
        for scope in owners:
            root = Span(f"{cls}.turn-{uuid.uuid4()}", None, f"{cls}.turn",
                        kind_of(agent, "turn"), now, inputs=inputs)
            root.metadata["llama_index_parent_id"] = self.run_id
            root.metadata["agent_name"] = agent_name
            self.turns.append(Trace(self.tracer, scope, root, tags))
            scope.recording._opened()

    def step_ended(self, result: Any) -> None:
        """A step of a turn returned `result` (the event it sends on)."""
        if is_event(result, "AgentOutput"):
            self.last_output = result
        elif is_event(result, "StopEvent"):  # the run's answer
            self._end_turn(result, None)
        elif is_event(result, "AgentInput") and \
                self._agent_named(getattr(result, "current_agent_name", None)) \
                is not self.agent:  # a hand-off
            self._end_turn(self.last_output, None)

    def ended(self, result: Any, error: BaseException | None) -> None:
        """The run's span ended (with its stop event) or was dropped."""
        for id_ in self.steps:
            self.tracer.steps.pop(id_, None)
        if error is None and self.cancelled is not None:
            error = asyncio.CancelledError(self.cancelled)
        self._end_turn(self.last_output if result is None else result, error)

    def _end_turn(self, result: Any, error: BaseException | None) -> None:
        turns, self.turns = self.turns, []
        if not turns:
            return
        now = time.time()
        output = main_output(result) if error is None else None
        for trace in turns:
            trace.root.end_time = now
            if error is not None:
                trace.root.error = describe_error(error)
            elif output is not None:
                trace.root.outputs = output
            trace.root_ended(result if error is None else None, error)


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


def _source_texts(result: Any) -> list[str] | None:
    """The texts of a response's `source_nodes` (query and chat engines' responses), or
    None when the result has none to give."""
    try:
        nodes = getattr(result, "source_nodes", None)
        if not isinstance(nodes, list):
            return None
        if not nodes:
            nodes = _sources_nodes(result)
        return _texts(nodes_view(nodes))
    except Exception:  # a response we cannot read: the retrieved nodes stand in
        return None


def _sources_nodes(result: Any) -> list[Any]:
    """The source nodes of the query responses a chat response was made from (its
    `sources`' raw outputs). LlamaIndex fills a chat response's empty `source_nodes` from
    them itself, but not from an async stream (``condense_question``'s `astream_chat`)."""
    found: list[Any] = []
    for source in getattr(result, "sources", None) or ():
        nodes = getattr(getattr(source, "raw_output", None), "source_nodes", None)
        if isinstance(nodes, list):
            found.extend(nodes)
    return found


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
    for span, trace, _ in members:
        span.usage = usage
        trace.response_reported(span, response)
        if span.outputs is None:
            span.outputs = llm_text(response)
        if span.end_time is not None:  # a stream: its call returned before the tokens
            span.end_time = time.time()
        if trace.model_stream is not None and span.span_id == trace.stream_span:
            trace.stream_ended(None, True)


def _on_model_chunk(members: tuple[Member, ...], event: Any) -> None:
    """A chunk of a model's own stream, sent just before the caller gets it."""
    for span, trace, _ in members:
        if trace.model_stream is not None and span.span_id == trace.stream_span:
            trace.tokens.append(event.response)


def _on_exception(members: tuple[Member, ...], event: Any) -> None:
    """A model's own stream failed, or its reader stopped it (GeneratorExit); or a model
    stream that a stream of structured answers reads, failing it or stopped with it."""
    for span, trace, _ in members:
        if trace.model_stream is not None and (span.span_id == trace.stream_span or (
                trace.structured and span.kind in (_LLM, _CHAT_MODEL))):
            error = event.exception
            if isinstance(error, GeneratorExit):
                trace.stream_ended(None, False)
            else:
                span.error = describe_error(error)
                trace.stream_ended(error, False)


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
    for span, trace, _ in members:  # (sent inside the writer's span)
        trace.writer_delta(span.span_id, event.delta)
