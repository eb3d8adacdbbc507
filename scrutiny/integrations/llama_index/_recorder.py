"""`LlamaIndexRecorder`: record the calls of one LlamaIndex object made inside a `with` block.

Inside the block, every root call of the recorded object (a query engine, a chat engine, a
retriever, a workflow or agent run) becomes one record with its span tree — and each turn
a recorded agent takes in a run of an `AgentWorkflow` — built from LlamaIndex's own
instrumentation: Scrutiny's span and event handlers on the root dispatcher (added on first
use) route each notice through a context variable to the active recorders. Nothing is
patched; calls outside the block, or of other objects, are not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llama_index.core.prompts import BasePromptTemplate

from scrutiny.core import (
    ConfigurationError,
    Feedback,
    FeedbackMode,
    Record,
    RecorderSettings,
    Recording,
    RecordStatus,
    Session,
    Span,
    SpanKind,
    TokenUsage,
)
from scrutiny.core._evaluate import describe_error
from scrutiny.core._recording import block_mode, left_elsewhere
from scrutiny.core._records import app_id_for
from scrutiny.integrations.llama_index._convert import (
    event_text,
    main_input,
    main_output,
    token_text,
)
from scrutiny.integrations.llama_index._events import FeedbackEventBridge
from scrutiny.integrations.llama_index._handlers import ensure_installed
from scrutiny.integrations.llama_index._tracer import (
    USAGE_REPEATS,
    Scope,
    Trace,
    active_scopes,
)

__all__ = ["LlamaIndexRecorder", "Recording"]


def _contexts(trace: Trace) -> list[str]:
    """What the answer was written from: the response's source nodes; else every node a
    retriever returned. A response with no source nodes counts only when a synthesizer
    wrote it or a postprocessor ran (one that dropped every node: nothing to judge): a
    `CustomQueryEngine` that returns a string wraps it in a response without any, and its
    record had no contexts though its retriever returned nodes."""
    sources = trace.source_contexts
    if sources is None:
        return list(trace.contexts)
    if not sources and trace.contexts and not any(
            s.kind == SpanKind.SYNTHESIZE.value or "postprocess" in s.name.lower()
            for s in trace.spans):
        return list(trace.contexts)
    return list(sources)

_MODEL_KINDS = frozenset((SpanKind.LLM.value, SpanKind.CHAT_MODEL.value))
_CANCELLED = ("CancelledError", "GeneratorExit", "KeyboardInterrupt")
_OPEN_HINT = ("a streamed answer is recorded when its stream has been consumed, closed or "
              "released")
_EMPTY_HINT = ("call the recorded object itself inside the `with` block (threads started "
               "by hand do not inherit the block: run them with "
               "contextvars.copy_context().run), and consume a streamed answer to the end")


class LlamaIndexRecorder:
    """Records a LlamaIndex query engine, chat engine, retriever, workflow or agent.

    Args:
        app: the object whose calls are recorded (calls of other objects are not, even
            inside the block); its class name is the default app name.
        app_name, app_version: what the records belong to.
        feedbacks: evaluated on every record.
        session: where records go (default: the session created last).
        feedback_mode: overrides the session's mode for this recorder.
        tags, metadata: added to every record.

    Raises:
        ConfigurationError: no app, or a feedback that is not wired.

    Use ``with recorder as recording:`` (or ``async with``); each root call of `app` in the
    block gives exactly one record, also under threads (run with the block's context) and
    concurrent asyncio tasks.

    What a record is:

    * A call of `app`, with everything it called. A call of `app` made inside another
      call of `app` belongs to the outer call's record; one made inside a call of another
      object (a retriever inside a query engine) is a record of its own — of that call
      only.
    * A streamed answer — a streaming query or chat, or a workflow run whose stop event's
      result is a stream (a query or chat engine's streaming response, a generator of
      tokens) — is recorded when its stream ends, with the full text: once the caller has
      read it to the end (a chat engine's stream, once written). A stream stopped early
      gives a `cancelled` record with the partial text; one dropped unread, a `cancelled`
      record with what is known, when it is released (by the garbage collector, for a
      workflow's result: its handler holds it in a reference cycle).
    * An agent (`FunctionAgent`, `ReActAgent`, ...) run by an `AgentWorkflow` makes no
      calls of its own: the workflow's steps run it. As for any object called inside
      another one, only its part is recorded: each *turn* it takes in a run — from the
      step that hands it the conversation to the step that answers (ends the run) or
      hands the conversation to another agent — is one record, with root span
      ``<AgentClass>.turn``, the steps of the turn (the model's calls, the tool calls) as
      its spans, the last user message it was given as input and its answer as output (a
      turn that ends by handing off has the call it ended with as output, e.g.
      ``[tool call] handoff({"to_agent": "calc", ...})``). An agent that takes two turns
      in a run gives two records, one that takes none gives none; a run that fails or is
      cancelled during a turn ends that turn's record as `error` or `cancelled`. To record
      whole runs (the user's question, the final answer), record the `AgentWorkflow`.
    """

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(app_name={self.app_name!r}, "
                f"app_version={self.app_version!r}, "
                f"feedbacks={[fb.name for fb in self.feedbacks]!r})")

    def __init__(
        self,
        app: Any,
        *,
        app_name: str | None = None,
        app_version: str = "v1",
        feedbacks: Sequence[Feedback] = (),
        session: Session | None = None,
        feedback_mode: FeedbackMode | str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if app is None:
            raise ConfigurationError("LlamaIndexRecorder needs the object to record "
                                     "(a query engine, chat engine or retriever)")
        self.app = app
        self.settings = RecorderSettings(
            app_name or type(app).__name__, app_version, feedbacks=feedbacks,
            session=session, feedback_mode=feedback_mode, tags=tags, metadata=metadata)
        self.app_name = self.settings.app_name
        self.app_version = self.settings.app_version
        self.app_id = app_id_for(self.app_name, self.app_version)
        """``"app_name:app_version"``, the id its records are stored and filtered under."""
        self.feedbacks = self.settings.feedbacks
        self.feedback_mode = self.settings.feedback_mode
        self.tags = self.settings.tags
        self.metadata = self.settings.metadata

    @property
    def session(self) -> Session:
        """Where records go: the session given (kept even once closed), else the session
        created last."""
        return self.settings.session

    def _mode(self) -> FeedbackMode:
        return self.settings.mode()

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> Recording:
        ensure_installed()
        if not self.settings.prepared:  # (the session's threads, before exit)
            self.settings.prepare()
        recording = Recording(self.feedback_mode, open_hint=_OPEN_HINT,
                              empty_hint=_EMPTY_HINT)
        active_scopes.set((*active_scopes.get(), Scope(self, recording)))
        return recording

    def _leave(self) -> Recording | None:
        """Close the innermost block of this recorder open in this context; None (logged)
        when none is (see scrutiny.core._recording.left_elsewhere)."""
        scopes = active_scopes.get()
        for i in range(len(scopes) - 1, -1, -1):
            if scopes[i].recorder is self:
                active_scopes.set(scopes[:i] + scopes[i + 1:])
                return scopes[i].recording
        left_elsewhere("LlamaIndexRecorder")
        return None

    def __exit__(self, *exc: object) -> None:
        recording = self._leave()
        mode = None if recording is None else block_mode(recording, self.settings)
        if recording is not None and mode is not None:
            recording.finish(mode)

    async def __aenter__(self) -> Recording:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        recording = self._leave()
        mode = None if recording is None else block_mode(recording, self.settings)
        if recording is not None and mode is not None:
            await recording.afinish(mode)

    # ------------------------------------------------------------------ records
    def _trace_finished(self, trace: Trace) -> None:
        """Build the record of a finished trace and hand it to the session (on the thread
        that ended the call or its stream)."""
        record = self._build(trace)
        trace.scope.recording._add(record)
        bridge = FeedbackEventBridge(trace.root.span_id, trace.tags)
        self.settings.ingest(record, trace.scope.recording, [bridge])

    def _build(self, trace: Trace) -> Record:
        root = trace.root
        error = trace.root_error or trace.stream_error
        if trace.streamed:
            if trace.structured:  # partial structured answers: the last one is the answer
                output: Any = trace.tokens[-1] if trace.tokens else None
            else:
                output = "".join(token_text(t) for t in trace.tokens)
            root.outputs = output
        else:
            output = main_output(trace.root_result)
        partial: Any = None
        if error is not None:
            cancelled = type(error).__name__ in _CANCELLED
            status = RecordStatus.CANCELLED if cancelled else RecordStatus.ERROR
            error_text: str | None = describe_error(error)
            if not cancelled:
                # A failed call has no answer: what it streamed before failing is kept to
                # be seen, not as the output feedbacks judge (they end `skipped`).
                partial, output = output, None
        elif not trace.stream_complete:
            status = RecordStatus.CANCELLED
            error_text = ("the process exited before the stream was read to its end"
                          if trace.stream_unread_at_exit
                          else "the consumer stopped the stream before its end")
        else:
            status, error_text = RecordStatus.OK, None
        metadata = dict(self.metadata)
        if trace.tags:
            metadata["instrument_tags"] = dict(trace.tags)
        if partial is not None:
            metadata["partial_output"] = partial
        question = main_input(root.inputs or {})
        if trace.resumed and trace.resumed_with is not None:
            question = trace.resumed_with[1]
        tags = list(self.tags)
        if status is RecordStatus.CANCELLED and trace.asked is not None:
            # a run stopped while it waited for a human (human-in-the-loop across
            # requests: `cancel_run()` once its context is saved), as LangGraph's
            # interrupted runs are
            tags.append("interrupted")
            metadata["interrupt"] = event_text(trace.asked)
        if isinstance(question, BasePromptTemplate):  # `llm.predict(template, **values)`
            question = _prompt_sent(trace.spans[1:], question)
        return Record(
            app_name=self.app_name,
            app_version=self.app_version,
            input=question,
            output=output,
            status=status,
            error=error_text,
            start_time=root.start_time,
            end_time=trace.end_time or time.time(),
            spans=trace.spans,
            contexts=_contexts(trace),
            usage=_usage(trace.spans),
            tags=tags,
            metadata=metadata,
            framework="llama_index",
            root_run_id=root.span_id,
        )


def _prompt_sent(spans: list[Span], template: BasePromptTemplate) -> Any:
    """The prompt a model was sent from `template` (the first model call's input), else
    the template's text."""
    for span in spans:
        if span.kind in _MODEL_KINDS:
            sent = main_input(span.inputs or {})
            if isinstance(sent, str):
                return sent
    try:
        return template.get_template()
    except Exception:  # (a template of the user's own kind)
        return repr(template)


def _usage(spans: list[Span]) -> TokenUsage | None:
    """Total usage of the innermost model calls that reported it (a call that wraps another
    call, like `acomplete` around `complete`, reports the same tokens again; so does one
    that hands on another call's response, see `Trace.response_reported`)."""
    reporting = [s for s in spans if s.usage is not None and USAGE_REPEATS not in s.metadata]
    if not reporting:
        return None
    by_id = {s.span_id: s for s in spans}
    covered: set[str] = set()
    for s in reporting:
        parent = by_id.get(s.parent_id) if s.parent_id is not None else None
        while parent is not None and parent.span_id not in covered:
            covered.add(parent.span_id)
            parent = by_id.get(parent.parent_id) if parent.parent_id is not None else None
    return TokenUsage.total([s.usage for s in reporting if s.span_id not in covered])
