"""The LangChain callback handler: run events in, records out.

Every callback here runs on the application's thread (`run_inline = True`, so LangChain
calls it directly, in order, also under asyncio). Each one does O(1) work on in-memory
objects — a dict lookup, a span append — and never raises: a failure inside Scrutiny is
logged and the application's call goes on untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    BaseCallbackManager,
)
from langchain_core.callbacks.manager import ahandle_event, handle_event
from langchain_core.documents import Document
from langchain_core.messages import BaseMessageChunk, ToolMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables import Runnable, RunnableGenerator
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.tools import BaseTool

from scrutiny.core import (
    Feedback,
    FeedbackMode,
    FeedbackResult,
    LazyRecord,
    Record,
    RecorderSettings,
    RecordStatus,
    Session,
    Span,
    SpanKind,
    TokenUsage,
)
from scrutiny.core._context import _suppressed
from scrutiny.core._courtesy import offer as _offer_gil
from scrutiny.core._evaluate import describe_error
from scrutiny.core._records import materialized
from scrutiny.core._runtime import at_exit, open_call_counters
from scrutiny.core._snapshot import snapshot as _snapshot  # (inputs and outputs as they were)
from scrutiny.integrations.langchain._convert import (
    asks_for_tools,
    content_text,
    document_text,
    llm_output,
    main_input,
    main_output,
    usage_of,
)

if TYPE_CHECKING:
    from scrutiny.integrations.langchain._recorder import Recording

__all__ = ["FEEDBACK_EVENT", "ScrutinyCallbackHandler"]

logger = logging.getLogger("scrutiny")

FEEDBACK_EVENT = "scrutiny.feedback_result"
"""The name of the LangChain custom event that carries a stored feedback result.

Each handler of the recorded root run that overrides ``on_custom_event`` receives it once
per end state (``done``, ``failed`` or ``skipped``), after it is stored, on a Scrutiny
thread, as ``on_custom_event(FEEDBACK_EVENT, data, run_id=<the root run's id>, tags=...,
metadata=...)``. `data` is a plain dict: ``record_id``, ``feedback_name``, ``status``
(``"done"``, ``"failed"`` or ``"skipped"``), ``score`` (a float only when ``done``, else
None; ``result`` holds the same value), ``explanation``, ``error`` (the reason of a
``failed`` or ``skipped`` result), ``app_name``, ``app_version``, ``result_id``,
``feedback_id``, ``attempts``, ``created_at`` / ``started_at`` / ``ended_at`` (ISO 8601),
``cost`` and ``calls``.
"""

_F = TypeVar("_F", bound=Callable[..., None])

_STOPPED_EARLY = "cancelled: the consumer stopped the stream early"
_CANCELLED_ERROR = "CancelledError"  # (how _describe writes a bare asyncio cancellation)
_CANCELLED_TEXT = ("cancelled: the call's asyncio task was cancelled before it finished "
                   "(a timeout or a client going away, for example)")
_MODEL_KINDS = frozenset((SpanKind.CHAT_MODEL.value, SpanKind.LLM.value))
_MAX_OUTLIVED = 10_000
_OUTLIVED = ("unfinished when the call ended: it was still running when another step "
             "failed (what it did afterwards is not recorded)")
_IN_BACKGROUND = ("unfinished when the call returned: a step started it in the background "
                  "without waiting for it (what it did afterwards is not recorded)")
_EXITED = ("cancelled: the process exited before the call ended (a stream never read to "
           "its end, or a call still running on another thread)")
_RETRIEVER = SpanKind.RETRIEVER.value
_TOOL = SpanKind.TOOL.value
_CHAIN = SpanKind.CHAIN.value


_DISPATCH_CODES = {handle_event.__code__, ahandle_event.__code__}
_NO_INPUTS: Any = object()  # on_chain_end without the streamed run's inputs

OPEN_BLOCKS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "scrutiny_lc_open_blocks", default=())
"""The ``with recorder:`` blocks open in this context, innermost last (any recorder)."""


class _Root:
    """What is known about one root run while it is open."""

    __slots__ = ("fallbacks", "graph", "graph_stream", "handlers", "inner_fallbacks",
                 "metadata", "received", "recording", "run_ids", "spans", "stream", "tags",
                 "tokens")
    handlers: list[BaseCallbackHandler]  # (set by _run_handlers)
    fallbacks: bool
    inner_fallbacks: set[int]  # (set once a step is a `with_fallbacks` run: see _enclosing)
    stream: FrameType | None  # (set for streamed runs only: unset, it reads as None)
    graph: FrameType | None  # (set for LangGraph runs only: see _mark_breakpoint)
    graph_stream: bool  # (set for LangGraph runs the app reads as a stream: _graph_received)
    received: Any  # (a streamed run that failed or was stopped: unset, reads _NOT_STREAMED)

    def __init__(self, recording: Recording | None, default: BaseCallbackHandler,
                 tags: list[str] | None, metadata: dict[str, Any] | None) -> None:
        self.recording = recording
        # the handlers of the run; whether it is a `with_fallbacks` run (see _enclosing);
        # for a streamed run, its stream loop's frame (`stream`: see _received)
        _run_handlers(self, default)
        self.spans: list[Span] = []
        self.run_ids: list[int] = []
        self.tags = list(tags or [])
        self.metadata = dict(metadata or {})
        self.tokens: list[str] = []


def _run_handlers(root: _Root, default: BaseCallbackHandler) -> None:
    """Sets on `root` the handlers LangChain is dispatching the current event to (those of
    the run), whether a `with_fallbacks` runnable is starting the run, and for a run
    LangChain streams, the frame of its stream loop (`stream`: see _received).

    LangChain does not pass them to handlers, so we read them from its dispatch frame;
    if that ever fails, the result goes to this handler alone.
    """
    frame: FrameType | None = sys._getframe(4)  # on_*_start <- _start <- _Root <- us
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code in _DISPATCH_CODES:
            handlers = frame.f_locals.get("handlers")
            if isinstance(handlers, list):
                # <- the callback manager's on_chain_start <- the runnable's method
                caller = frame.f_back
                # (an async model's start is dispatched to each handler, or to the inline
                # ones, by itself: the manager holds them all)
                manager = None if caller is None else caller.f_locals.get("self")
                if isinstance(manager, BaseCallbackManager) and \
                        isinstance(manager.handlers, list):
                    handlers = manager.handlers
                root.handlers = list(handlers)
                caller = None if caller is None else caller.f_back
                if caller is not None and caller.f_code in _CALLER_CODES:
                    root.fallbacks = caller.f_code in _FALLBACK_CODES
                    if not root.fallbacks:  # a stream (not one an invoke reads itself)
                        reader = caller.f_back
                        if reader is None or reader.f_code not in _SELF_READERS:
                            root.stream = caller
                else:
                    root.fallbacks = False
                    if caller is not None and _PREGEL in sys.modules and \
                            caller.f_code in _pregel_codes():
                        root.graph = caller  # a LangGraph run's loop (see _mark_breakpoint)
                        reader = caller.f_back  # (its own invoke, or the app's code)
                        if reader is None or reader.f_code not in _pregel_methods(
                                "invoke", "ainvoke"):
                            root.graph_stream = True
                return
            break
        frame = frame.f_back
    root.handlers, root.fallbacks = [default], False


def _started_by_fallbacks(frame: FrameType | None) -> bool:
    """Whether the chain run starting now is a `with_fallbacks` run: read, as in
    _run_handlers, from the frame above LangChain's dispatch (`frame`: the handler's
    caller, which is that dispatch or just below it)."""
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code in _DISPATCH_CODES:
            caller = frame.f_back  # the callback manager's on_chain_start
            caller = None if caller is None else caller.f_back
            return caller is not None and caller.f_code in _FALLBACK_CODES
        frame = frame.f_back
    return False


_FALLBACK_CODES = frozenset(
    code for name in ("invoke", "ainvoke", "stream", "astream")
    if (code := getattr(getattr(RunnableWithFallbacks, name, None), "__code__", None)))
"""The methods of `with_fallbacks` that give their runnables their own config."""

_STREAM_CODES = frozenset(
    code for name in ("_transform_stream_with_config", "_atransform_stream_with_config")
    if (code := getattr(getattr(Runnable, name, None), "__code__", None)))
"""The loops of LangChain's streamed runs (`stream`, `astream`, `transform` of chains)."""

_CALLER_CODES = _FALLBACK_CODES | _STREAM_CODES

_SELF_READERS = frozenset(
    code for name in ("invoke", "ainvoke")
    if (code := getattr(getattr(RunnableGenerator, name, None), "__code__", None)))
"""`RunnableGenerator.invoke` reads its own stream: its caller receives no chunks."""


_NOT_STREAMED: Any = object()


def _received(stream: FrameType, at_yield: bool = False) -> Any:
    """What the caller of a streamed run received before the run failed (or, `at_yield`,
    was stopped where it yields a chunk): the chunks it yielded, added up as LangChain adds
    them (read in on_chain_error from `stream`, the frame of LangChain's stream loop, kept
    from the run's start; let go when it ends).

    LangChain ends a failed stream with the run's inputs, not with the chunks it yielded:
    only its stream loop holds them (``final_output``). A step after the model that failed
    after passing on part of the model's text (a generator step that yields two chunks,
    then raises) left the caller with those two chunks, not with the model's tokens. The
    frame is kept from the start because an async run manager ends a run on a task of its
    own (shielded from cancellation), where the stream loop is not on the stack.
    """
    try:
        local = stream.f_locals
        chunks = local.get("final_output")
        read = getattr(chunks, "value_for_error", None)  # (a _ChunkAccumulator, since 1.x)
        value = read() if callable(read) else chunks
        if at_yield and "chunk" in local:
            # The loop adds a chunk to its output once the caller asks for the next one:
            # stopped at its yield, the chunk the caller holds last is not in it yet.
            value = _plus(value, local["chunk"])
        return _snapshot(value)
    except Exception:  # (the record keeps the model's tokens, as before)
        logger.exception("scrutiny: reading what a stream yielded failed")
        return _NOT_STREAMED


def _was_streamed(root: _Root) -> bool:
    """Whether the root run was streamed to its caller (`stream`, `astream`): its `stream`
    slot was set at its start (to its stream loop's frame, let go of — set to None — when
    it ended); a run that is no stream never sets it."""
    try:
        root.stream  # noqa: B018
    except AttributeError:
        return False
    return True


def _stopped_at_yield(stream: FrameType) -> Any:
    """(The root run of a sync stream ended without an error.) What its caller received,
    when the caller stopped it: LangChain swallows the GeneratorExit and ends the run
    with the chunks it added up, one short. `_NOT_STREAMED` when it ran to its end (its
    inner generator is exhausted) or that cannot be told (an iterator of another kind)."""
    try:
        iterator = stream.f_locals.get("iterator")
    except Exception:
        return _NOT_STREAMED
    if not inspect.isgenerator(iterator) or iterator.gi_frame is None:
        return _NOT_STREAMED
    return _received(stream, at_yield=True)


def _plus(value: Any, chunk: Any) -> Any:
    """`chunk` added to `value` as LangChain adds stream chunks (one it cannot add
    replaces the value)."""
    if value is None:
        return chunk
    try:
        return value + chunk
    except TypeError:
        return chunk


_CLAIM_FRAMES = 200


def _claim(mine: Any, blocks: tuple[Any, ...], inside_foreign: bool) -> bool | None:
    """Whether the run starting now is a call of this block's app, while other recorders'
    blocks are open too: True when the innermost app of an open block found on the stack
    is ours (or, for a run not inside another app's call, when no other open block has
    another app), False when it is another block's app, None when none of them is on the
    stack (a chain no recorder was given).

    Only runs when several recorders' blocks are open, or inside another app's call
    (LangChain does not say which runnable starts a run: the frame of the app's method
    tells).
    """
    app = None if mine is None else mine.app
    if app is None and mine is not None:  # a recorder given no app records every call
        return None
    apps = {id(b.app): b.app for b in blocks if b.app is not None}
    if app is not None and len(apps) == 1 and not inside_foreign:
        return True
    if not apps:
        return None
    budget = [_CLAIM_FRAMES]
    owner = _app_on(_stack(sys._getframe(2), budget), apps, budget)
    if owner is None:  # a task started for the call (abatch gathers one per input)
        owner = _app_of_awaiters(apps, budget)
    return None if owner is None else (app is not None and owner is app)


def _stack(frame: FrameType | None, budget: list[int]) -> Any:
    while frame is not None and budget[0] > 0:
        yield frame
        frame = frame.f_back


def _app_on(frames: Any, apps: dict[int, Any], budget: list[int]) -> Any:
    """The innermost of `apps` running a method in `frames` (innermost first)."""
    for frame in frames:
        budget[0] -= 1
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if id(owner) in apps and apps[id(owner)] is owner:
                return owner
    return None


_AWAITER_HOPS = 8


def _app_of_awaiters(apps: dict[int, Any], budget: list[int]) -> Any:
    """The app running a method in a task that waits for this one (found on no stack of
    this task): LangChain's `abatch` of a sequence starts each input's run in a task of
    its own (``asyncio.gather``), whose stack begins at the callback manager; the app's
    method is in the task that gathers them. Followed through what asyncio links a task
    to its waiters by: the wakeup of a task awaiting it, `gather`'s outer future, a
    TaskGroup's parent task."""
    try:
        task: Any = asyncio.current_task()
    except RuntimeError:  # (no running loop in this thread)
        return None
    seen: set[int] = set()
    futures = [] if task is None else [task]
    for _ in range(_AWAITER_HOPS):
        waiting: list[Any] = []
        for future in futures:
            if id(future) in seen:
                continue
            seen.add(id(future))
            for callback, _context in getattr(future, "_callbacks", None) or ():
                for waiter in _waiters_in(callback, future):
                    if callable(getattr(waiter, "get_coro", None)):  # a task
                        owner = _app_on(_task_frames(waiter), apps, budget)
                        if owner is not None:
                            return owner
                    waiting.append(waiter)
        if not waiting or budget[0] <= 0:
            return None
        futures = waiting
    return None


def _waiters_in(callback: Any, future: Any) -> list[Any]:
    # (asyncio.isfuture, not isinstance: a task of the pure-Python implementation, which
    # some runners and tools install, is no subclass of the C Future)
    owner = getattr(callback, "__self__", None)
    if asyncio.isfuture(owner):  # the wakeup of a task awaiting it
        return [owner]
    parent = getattr(owner, "_parent_task", None)  # a TaskGroup's done callback
    if asyncio.isfuture(parent):
        return [parent]
    found = []
    for cell in getattr(callback, "__closure__", None) or ():  # gather's outer future
        try:
            value = cell.cell_contents
        except ValueError:  # (an empty cell)
            continue
        if asyncio.isfuture(value) and value is not future:
            found.append(value)
    return found


def _task_frames(task: Any) -> list[FrameType]:
    """A suspended task's frames, innermost first (its coroutines' chain of awaits)."""
    frames: list[FrameType] = []
    coro = task.get_coro()
    while coro is not None and len(frames) < _CLAIM_FRAMES:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    frames.reverse()
    return frames


def _log_failure(callback: str) -> None:
    """A failure of ours inside a LangChain callback: logged, never raised into the app."""
    logger.exception("scrutiny: handling %s failed; the application is not affected",
                     callback)


class ScrutinyCallbackHandler(BaseCallbackHandler):
    """Turns LangChain run events into Scrutiny records.

    Pass it per call (``chain.invoke(x, config={"callbacks": [handler]})``), at
    construction, or let a :class:`ChainRecorder` attach it inside ``with recorder:``.
    Each root run becomes exactly one record, stored in the session and evaluated with the
    feedbacks.

    Args:
        app_name, app_version: what the records belong to.
        feedbacks: the feedbacks to evaluate on each record.
        session: where records go (default: the session created last).
        feedback_mode: overrides the session's :class:`FeedbackMode`.
        tags, metadata: added to every record.
        keep_records: how many of its latest records the handler keeps in `records`
            (they hold inputs and outputs: keep it small in a long-running app).
    """

    run_inline = True
    raise_error = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(app_name={self.app_name!r}, "
                f"app_version={self.app_version!r}, "
                f"feedbacks={[fb.name for fb in self.feedbacks]!r})")

    def __init__(
        self,
        app_name: str = "app",
        app_version: str = "v1",
        *,
        feedbacks: Sequence[Feedback] = (),
        session: Session | None = None,
        feedback_mode: FeedbackMode | str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        keep_records: int = 100,
    ) -> None:
        super().__init__()
        self.settings = RecorderSettings(
            app_name, app_version, feedbacks=feedbacks, session=session,
            feedback_mode=feedback_mode, tags=tags, metadata=metadata)
        self._records: deque[Record | LazyRecord] = deque(maxlen=keep_records)
        # Keyed by `run_id.int`: a UUID hashes in Python code, an int in C, and a run is
        # looked up a few times per event (about 25 hashes per call of a 3-step chain).
        self._runs: dict[int, tuple[Span, _Root]] = {}
        self._roots: dict[int, _Root] = {}
        self._outlived: dict[int, None] = {}
        """Runs still going when their root's record was made (a branch that outlived a
        failed sibling), and their children: not new records (bounded, oldest dropped)."""
        self._foreign: dict[int, None] = {}
        self._not_calls: dict[int, None] = {}
        """Open runs that are no call of the app (LangGraph's ``update_state``) and their
        steps: not recorded (each let go of when it ends)."""
        """Open runs of another recorder's app (and their steps), seen while several
        recorders' blocks were open: not this handler's records."""
        self._lock = threading.Lock()
        _handlers.add(self)
        at_exit(_end_open_calls)

    @property
    def records(self) -> list[Record]:
        """The latest records this handler made (at most `keep_records`), oldest first."""
        return [materialized(r) for r in list(self._records)]

    # what the records belong to and where they go (see RecorderSettings)
    @property
    def session(self) -> Session:
        """Where records go: the session given (kept even once closed), else the session
        created last."""
        return self.settings.session

    @property
    def app_name(self) -> str:
        return self.settings.app_name

    @property
    def app_version(self) -> str:
        return self.settings.app_version

    @property
    def feedbacks(self) -> list[Feedback]:
        return self.settings.feedbacks

    @feedbacks.setter
    def feedbacks(self, feedbacks: Sequence[Feedback]) -> None:
        """Replace the feedbacks (checked like those given at construction)."""
        self.settings.set_feedbacks(feedbacks)

    @property
    def feedback_mode(self) -> FeedbackMode | None:
        return self.settings.feedback_mode

    @property
    def tags(self) -> list[str]:
        return self.settings.tags

    @property
    def metadata(self) -> dict[str, Any]:
        return self.settings.metadata

    # ------------------------------------------------------------------ span bookkeeping
    def _start(self, run_id: UUID, parent_run_id: UUID | None, name: str, kind: str,
               inputs: Any, tags: list[str] | None, metadata: dict[str, Any] | None,
               model: _ModelHint | None = None) -> None:
        try:
            if _suppressed.get():
                return
            key = run_id.int
            parent = None if parent_run_id is None else self._runs.get(parent_run_id.int)
            if parent is None and parent_run_id is None and self._roots:
                parent = self._enclosing()
            foreign_parent = False
            if parent is None and parent_run_id is not None:
                if self._outlived and parent_run_id.int in self._outlived:
                    self._outlive(key)  # a late step of a call already recorded
                    return
                if self._not_calls and parent_run_id.int in self._not_calls:
                    self._not_calls[key] = None
                    return
                foreign_parent = bool(self._foreign) and parent_run_id.int in self._foreign
            if parent is None:
                if parent_run_id is None and name.endswith(_UPDATE_STATE) and \
                        _updating_graph_state(sys._getframe(1)):
                    self._not_calls[key] = None  # (an edit of a graph's state: no call)
                    return
                blocks = OPEN_BLOCKS.get()
                mine = None
                for block in reversed(blocks):  # the innermost block of ours
                    if block.handler is self:
                        mine = block
                        break
                if foreign_parent or (mine is not None and len(blocks) > 1):
                    # Several recorders' blocks are open: a call is recorded by the
                    # recorder of the app making it (not by every open recorder).
                    claim = _claim(mine, blocks, foreign_parent)
                    if claim is False or (foreign_parent and claim is not True):
                        self._mark_foreign(key)
                        return
                _offer_gil()  # to late evaluations, once a call (see scrutiny.core._courtesy)
                if not self.settings.prepared:  # (the session's threads, before exit)
                    self.settings.prepare()
                recording = None if mine is None else mine.recording
                root = _Root(recording, self, tags, metadata)
                if root.recording is not None:
                    root.recording._opened()
                self._roots[key] = root
                parent_id = None
                inputs = _snapshot(inputs)  # the record's input: as it was at the call
            else:
                root = parent[1]
                parent_id = parent[0].span_id
                inputs = _snapshot(inputs)  # (as it was when this step began)
                if kind is _CHAIN and _started_by_fallbacks(sys._getframe(2)):
                    # (its runnables start without a parent too: see _enclosing)
                    inner = getattr(root, "inner_fallbacks", None)
                    if inner is None:
                        inner = root.inner_fallbacks = set()
                    inner.add(key)
                if kind in _MODEL_KINDS and root.tokens:
                    # A later model's stream is what reaches the consumer: an earlier one's
                    # tokens (a question rewritten first) were glued to its partial answer.
                    root.tokens = []
            # Ids stay UUIDs and the model a hint until the record is built (str() of a
            # UUID costs more than the rest of this): see _build_record.
            span = Span(run_id, parent_id, name, kind, time.time(), None,  # type: ignore[arg-type]
                        inputs, None, None, None, model, tags or [], {})  # type: ignore[arg-type]
            root.spans.append(span)
            root.run_ids.append(key)
            self._runs[key] = (span, root)
        except Exception:  # never let our failure reach the app
            logger.exception("scrutiny: recording the start of a run failed")

    def _end(self, run_id: UUID, outputs: Any = None, error: BaseException | None = None,
             usage: TokenUsage | None = None, inputs: Any = _NO_INPUTS,
             handled: str | None = None) -> None:
        """A run ended: with its outputs, or with `error`. `handled` is the error of a
        run that caught it itself and returned `outputs` (a tool's handled error)."""
        entry: tuple[Span, _Root] | None = None
        try:
            key = run_id.int
            entry = self._runs.get(key)
            if entry is None:
                if self._foreign:
                    self._foreign.pop(key, None)
                if self._not_calls:
                    self._not_calls.pop(key, None)
                if self._outlived:  # (it ended: no step of it starts any more)
                    self._outlived.pop(key, None)
                return
            span = entry[0]
            span.end_time = time.time()
            root = key in self._roots
            if inputs is not _NO_INPUTS:  # a streamed run's input is only known at its end
                span.inputs = _snapshot(inputs)
            if error is None:
                span.outputs = _snapshot(outputs)
                span.error = handled
            elif not root and type(error).__name__ in _BUBBLE_UPS:
                _bubbled_up(span, error)
            else:
                span.error = describe_error(error)
            if usage is not None:
                span.usage = usage
            if root:
                graph = getattr(entry[1], "graph", None)
                if graph is not None:
                    entry[1].graph = None  # (the record keeps the root: not the frame)
                    if error is None:
                        _mark_breakpoint(span, graph)
                self._finish_root(run_id, span, error)
        except Exception:
            logger.exception("scrutiny: recording the end of a run failed")
            if entry is not None and entry[1].spans and entry[1].spans[0] is entry[0]:
                self._forget(run_id.int, entry[1])

    def _forget(self, key: int, root: _Root) -> None:
        """(Ending root run `key` failed inside Scrutiny.) Let go of the call, so that it is
        not held open for good (its spans and the objects they hold); when it made no
        record, its recording says why."""
        self._roots.pop(key, None)
        for rid in root.run_ids:
            self._runs.pop(rid, None)
        if root.recording is not None:  # (None once its record was handed over)
            root.recording._lost()

    def _enclosing(self) -> tuple[Span, _Root] | None:
        """The open run of ours this run is a step of, when LangChain gave it no parent.

        `with_fallbacks` runs its runnables with the config it was called with, not its
        child's: called with ``config={"callbacks": [...]}`` its steps had no parent, and
        a failed primary and the fallback that answered were two more records of the
        call. LangChain's context still names the run they are steps of.
        """
        config = var_child_runnable_config.get()
        if not config:
            return None
        run_id = getattr(config.get("callbacks"), "parent_run_id", None)
        entry = None if run_id is None else self._runs.get(run_id.int)
        if entry is None or run_id is None:
            return None
        # (only a fallbacks run's own runnables — the root's, or a step's: a fallback with
        # fallbacks of its own. A call made inside a step with callbacks of its own,
        # `other.invoke(x, config={"callbacks": [handler]})`, is a root run of LangChain's
        # and a record of its own, though the step's context names its run.)
        root = entry[1]
        if root.fallbacks and root.spans[0] is entry[0]:
            return entry
        inner = getattr(root, "inner_fallbacks", None)
        return entry if inner is not None and run_id.int in inner else None

    def _mark_foreign(self, key: int) -> None:
        foreign = self._foreign
        foreign[key] = None
        if len(foreign) > _MAX_OUTLIVED:  # (runs that never ended: oldest dropped)
            try:
                del foreign[next(iter(foreign))]
            except (RuntimeError, StopIteration, KeyError):  # (another thread's change)
                pass

    def _outlive(self, key: int) -> None:
        outlived = self._outlived
        outlived[key] = None
        if len(outlived) > _MAX_OUTLIVED:  # (runs that never ended: the oldest dropped,
            try:  # one at a time — a copy of the whole list was 10,000 keys per call)
                del outlived[next(iter(outlived))]
            except (RuntimeError, StopIteration, KeyError):  # (another thread's change)
                pass

    def _end_at_exit(self) -> None:
        """(At interpreter exit, before the sessions close.) Every call still open becomes
        a `cancelled` record with what it had done: a stream still held unread is
        finalized only while the interpreter tears down, after the sessions were closed,
        and its record was lost."""
        for key, root in list(self._roots.items()):
            try:
                span = root.spans[0]  # (the root run's own span)
                span.end_time = time.time()
                span.error = _EXITED
                self._finish_root(UUID(int=key), span, None, _ENDED_AT_EXIT)
            except Exception:  # (it ended meanwhile, on a thread still running)
                logger.debug("scrutiny: a call open at exit ended meanwhile", exc_info=True)

    def _finish_root(self, run_id: UUID, span: Span, error: BaseException | None,
                     ended: int | None = None) -> None:
        """The root run ended: hand its spans over as a record. The Record itself is
        assembled later, off the application's thread (or when first looked at)."""
        root = self._roots.pop(run_id.int)
        runs = self._runs
        for rid in root.run_ids:
            runs.pop(rid, None)
        how = _how_it_ended(error, root) if ended is None else ended
        # Runs still going go on without a record of their own (nor do their later steps
        # make one): branches that outlived a failed sibling, calls a step started in the
        # background without waiting for them, the steps of a stream stopped early.
        for child, rid in zip(root.spans, root.run_ids, strict=True):
            if child.end_time is None:
                self._outlive(rid)
        settings = self.settings
        record = LazyRecord(lambda record_id: _build_record(
            record_id, settings, root, span, how, run_id))
        kept = self._records
        # The record this one pushes out would be freed here, with its spans and the
        # framework objects they hold (~10 us); the session frees it on its writer thread.
        evicted = kept.popleft() if kept.maxlen and len(kept) >= kept.maxlen else None
        kept.append(record)
        recording = root.recording
        if recording is not None:
            recording._add(record)
            root.recording = None
        listening = [h for h in root.handlers if _listens(h)]
        bridge = [_FeedbackBridge(listening, run_id, root.tags, root.metadata)] \
            if listening else []
        settings.ingest(record, recording, bridge, evicted)

    # ------------------------------------------------------------------ chains
    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *,
                       run_id: UUID, parent_run_id: UUID | None = None,
                       tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                       **kwargs: Any) -> None:
        try:
            kind = kwargs.get("run_type") or _CHAIN
            self._start(run_id, parent_run_id, _name(serialized, kwargs), kind, inputs, tags,
                        metadata)
        except Exception:
            _log_failure("on_chain_start")

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            root = self._roots.get(run_id.int)
            if root is not None:
                stream = getattr(root, "stream", None)
                if stream is not None:  # (read now: the stream loop still holds it)
                    root.stream = None
                    received = _stopped_at_yield(stream)
                    if received is not _NOT_STREAMED:
                        root.received = received
            self._end(run_id, outputs, inputs=kwargs.get("inputs", _NO_INPUTS))
        except Exception:
            _log_failure("on_chain_end")

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            root = self._roots.get(run_id.int)
            if root is not None:
                stream = getattr(root, "stream", None)
                at_yield = isinstance(error, GeneratorExit)
                # (an event stream the consumer stopped ends with a CancelledError: it saw
                # the model's tokens as events, ahead of the run's own chunks, and the
                # record keeps those)
                if stream is not None and (at_yield or _how_it_ended(error, root) != _STOPPED):
                    root.stream = None  # (read now: the stream loop still holds it)
                    root.received = _received(stream, at_yield)
                elif getattr(root, "graph_stream", False) and root.graph is not None and \
                        not _streaming_events(root.handlers):
                    # (a LangGraph stream; one streamed as events gave its consumer the
                    # model's tokens as events, ahead of its chunks: the record keeps those)
                    root.received = _graph_received(root.graph, root)
            self._end(run_id, error=error, inputs=kwargs.get("inputs", _NO_INPUTS))
        except Exception:
            _log_failure("on_chain_error")

    # ------------------------------------------------------------------ models
    def on_chat_model_start(self, serialized: dict[str, Any] | None, messages: Any, *,
                            run_id: UUID, parent_run_id: UUID | None = None,
                            tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            inputs = messages[0] if isinstance(messages, list) and len(messages) == 1 else messages
            self._start(run_id, parent_run_id, _name(serialized, kwargs),
                        SpanKind.CHAT_MODEL.value, inputs, tags, metadata,
                        _ModelHint(kwargs.get("invocation_params"), metadata))
        except Exception:
            _log_failure("on_chat_model_start")

    def on_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], *,
                     run_id: UUID, parent_run_id: UUID | None = None,
                     tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                     **kwargs: Any) -> None:
        try:
            inputs = prompts[0] if len(prompts) == 1 else prompts
            self._start(run_id, parent_run_id, _name(serialized, kwargs), SpanKind.LLM.value,
                        inputs, tags, metadata,
                        _ModelHint(kwargs.get("invocation_params"), metadata))
        except Exception:
            _log_failure("on_llm_start")

    def on_llm_new_token(self, token: str | list[str | dict[str, Any]], *, run_id: UUID,
                         **kwargs: Any) -> None:
        try:
            entry = self._runs.get(run_id.int)
            if entry is not None:
                if not isinstance(token, str):
                    token = "".join(t if isinstance(t, str) else str(t.get("text", ""))
                                    for t in token)
                entry[1].tokens.append(token)
        except Exception:
            _log_failure("on_llm_new_token")

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, response)  # read into text and usage when the record is built
        except Exception:
            _log_failure("on_llm_end")

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, error=error)
        except Exception:
            _log_failure("on_llm_error")

    # ------------------------------------------------------------------ retrievers, tools
    def on_retriever_start(self, serialized: dict[str, Any] | None, query: str, *,
                           run_id: UUID, parent_run_id: UUID | None = None,
                           tags: list[str] | None = None,
                           metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            self._start(run_id, parent_run_id, _name(serialized, kwargs),
                        SpanKind.RETRIEVER.value, query, tags, metadata)
        except Exception:
            _log_failure("on_retriever_start")

    def on_retriever_end(self, documents: Sequence[Any], *, run_id: UUID,
                         **kwargs: Any) -> None:
        try:
            self._end(run_id, list(documents))
        except Exception:
            _log_failure("on_retriever_end")

    def on_retriever_error(self, error: BaseException, *, run_id: UUID,
                           **kwargs: Any) -> None:
        try:
            self._end(run_id, error=error)
        except Exception:
            _log_failure("on_retriever_error")

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *,
                      run_id: UUID, parent_run_id: UUID | None = None,
                      tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                      inputs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            self._start(run_id, parent_run_id, _name(serialized, kwargs), SpanKind.TOOL.value,
                        inputs if inputs is not None else input_str, tags, metadata)
        except Exception:
            _log_failure("on_tool_start")

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            handled = _handled_tool_error(output)
            if isinstance(output, ToolMessage):
                # Called by an agent (a ToolNode) a tool answers with a ToolMessage, called
                # with its arguments with its value: a feedback on the tool spans' outputs
                # got the message object one way (and scored "sunny" in it 0.0) and the text
                # the other. The span's output is the value either way; what the message
                # adds — the documents returned as its artifact, its tool call — is in the
                # span's metadata.
                entry = self._runs.get(run_id.int)
                if entry is not None:
                    if output.artifact is not None:
                        entry[0].metadata["artifact"] = output.artifact
                    entry[0].metadata["tool_call_id"] = output.tool_call_id
                output = output.content
            self._end(run_id, output, handled=handled)
        except Exception:
            _log_failure("on_tool_end")

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            self._end(run_id, error=error)
        except Exception:
            _log_failure("on_tool_error")

    # ------------------------------------------------------------------ surfacing
    def on_feedback_result(self, result: FeedbackResult, record: Record) -> None:
        """Called with each stored feedback result of a run this handler recorded.

        Any LangChain handler attached to the recorded run may define this method; all of
        them also receive the custom event ``"scrutiny.feedback_result"``.
        """


_LISTENS: dict[type, bool] = {}


def _listens(handler: BaseCallbackHandler) -> bool:
    """Whether a handler does anything with feedback results: it overrides
    `on_custom_event` or defines its own `on_feedback_result`. Others are not sent the
    events (a plain Scrutiny handler or a no-op handler would only cost a thread hop)."""
    kind = type(handler)
    known = _LISTENS.get(kind)
    if known is None:
        custom = getattr(kind, "on_custom_event", None)
        on_result = getattr(kind, "on_feedback_result", None)
        known = custom not in (BaseCallbackHandler.on_custom_event,
                               AsyncCallbackHandler.on_custom_event) or (
            on_result is not None and on_result is not
            ScrutinyCallbackHandler.on_feedback_result)
        _LISTENS[kind] = known
    return known


def _name(serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
    name = kwargs.get("name")
    if name:
        return name if type(name) is str else str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ident = serialized.get("id")
        if isinstance(ident, list) and ident:
            return str(ident[-1])
    return "run"


class _ModelHint:
    """What names a model, read into its name when the record is built."""

    __slots__ = ("metadata", "params")

    def __init__(self, params: dict[str, Any] | None, metadata: dict[str, Any] | None) -> None:
        self.params = params
        self.metadata = metadata

    def name(self) -> str | None:
        return _model(self.params, self.metadata)


def _model(params: dict[str, Any] | None, metadata: dict[str, Any] | None) -> str | None:
    params = params or {}
    for key in ("model", "model_name", "model_id"):
        if params.get(key):
            return str(params[key])
    if metadata and metadata.get("ls_model_name"):
        return str(metadata["ls_model_name"])
    return str(params["_type"]) if params.get("_type") else None


def _streaming_events(handlers: list[BaseCallbackHandler]) -> bool:
    """Whether the run was streamed as events (``astream_events``, ``astream_log``):
    LangChain then ends it with a CancelledError when the consumer stops early."""
    return any(c.__name__ == "_StreamingCallbackHandler"
               for h in handlers for c in type(h).__mro__)


_TOOL_RUN_CODES = frozenset((BaseTool.run.__code__, BaseTool.arun.__code__))
_HANDLED_TOOL_ERROR = "handled tool error (its message was returned as the tool's output): "
_TOOL_FRAMES = 8


def _handled_tool_error(output: Any) -> str | None:
    """The error of a tool that failed but returned its message as its output (a
    ToolException with ``handle_tool_error``, input refused with
    ``handle_validation_error``); None for a tool that succeeded.

    LangChain ends such a run with on_tool_end, not on_tool_error. Called with a tool call
    the output is a ToolMessage with ``status="error"``; called with plain arguments it is
    the bare message, and only the `status` of the tool's `run` (or `arun`) frame — a few
    frames up, in the same call stack — says it failed.
    """
    if isinstance(output, ToolMessage):
        failed = output.status == "error"
    else:
        failed = False
        frame: FrameType | None = sys._getframe(2)  # <- on_tool_end <- LangChain's dispatch
        for _ in range(_TOOL_FRAMES):
            if frame is None:
                break
            if frame.f_code in _TOOL_RUN_CODES:
                failed = frame.f_locals.get("status") == "error"
                break
            frame = frame.f_back
    if not failed:
        return None
    text = _read(main_output, output)
    return _HANDLED_TOOL_ERROR + (text if isinstance(text, str) else repr(text))


_ENDED_OK, _STOPPED, _CANCELLED, _FAILED, _ENDED_AT_EXIT = range(5)  # how a root run ended


def _how_it_ended(error: BaseException | None, root: _Root) -> int:
    """Classified when the run ends: the exception (and its traceback's frames) is not
    kept."""
    if error is None:
        return _ENDED_OK
    cancelled = type(error).__name__ == "CancelledError"
    if isinstance(error, GeneratorExit) or (cancelled and _streaming_events(root.handlers)):
        return _STOPPED
    return _CANCELLED if cancelled or isinstance(error, KeyboardInterrupt) else _FAILED
_INTERRUPTS = ("GraphInterrupt", "NodeInterrupt")  # LangGraph's pauses, as a step's error
_NODE_TAG = "graph:step:"  # (the tag LangGraph gives a node's run)
_PREGEL = "langgraph.pregel.main"
_pregel: dict[tuple[str, ...], frozenset[Any]] = {}


def _pregel_methods(*names: str) -> frozenset[Any]:
    """The code of `Pregel`'s methods `names`, read once LangGraph is loaded (empty
    before)."""
    codes = _pregel.get(names)
    if codes is None:
        pregel = getattr(sys.modules.get(_PREGEL), "Pregel", None)
        if pregel is None:
            return frozenset()
        codes = _pregel[names] = frozenset(
            code for name in names
            if (code := getattr(getattr(pregel, name, None), "__code__", None)))
    return codes


def _pregel_codes() -> frozenset[Any]:
    """The code of LangGraph's run loops (``Pregel.stream`` / ``astream``; `invoke` runs
    `stream`)."""
    return _pregel_methods("stream", "astream")


_UPDATE_STATE = "UpdateState"  # (LangGraph runs a state edit as "<graph name>UpdateState")
_UPDATE_FRAMES = 16


def _updating_graph_state(frame: FrameType | None) -> bool:
    """Whether the root run starting now (named "...UpdateState") is LangGraph's
    ``update_state`` / ``aupdate_state`` (``bulk_update_state``) writing a state edit —
    the human-in-the-loop "edit, then resume" step, not a call of the app: it ran the
    node's writers as a run of their own, which was recorded, and judged, as an answer."""
    codes = _pregel_methods("bulk_update_state", "abulk_update_state")
    for _ in range(_UPDATE_FRAMES):
        if frame is None:
            return False
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _mark_breakpoint(span: Span, graph: FrameType) -> None:
    """(A LangGraph root run that ended normally.) Marks the run's span when LangGraph
    stopped it at a static breakpoint (``compile(interrupt_before=[...])`` /
    ``interrupt_after``): when, and the nodes it stopped before, in its metadata.

    Such a pause raises nothing in any step, so it was recorded as a finished answer —
    the model's request for a tool not run yet as the output, no `interrupted` tag. Only
    LangGraph's run loop says so (``loop.status``), read from the frame of its `stream`
    / `astream`, kept from the run's start (an async run ends on a task of its own).
    """
    try:
        loop = graph.f_locals.get("loop")
        status = getattr(loop, "status", None)
        if status in _BREAKPOINTS:
            tasks = getattr(loop, "tasks", None) or {}
            nodes = sorted({str(getattr(t, "name", "?")) for t in tasks.values()})
            span.metadata["breakpoint"] = (_BREAKPOINTS[status], nodes)
    except Exception:  # (the record is kept, unmarked)
        logger.exception("scrutiny: reading how a LangGraph run stopped failed")


_BREAKPOINTS = {"interrupt_before": "before", "interrupt_after": "after"}
_PARENT_COMMAND = "ParentCommand"
_BUBBLE_UPS = frozenset((*_INTERRUPTS, _PARENT_COMMAND))
_PAUSED = "paused for human input: "


def _bubbled_up(span: Span, error: BaseException) -> None:
    """A step ended by one of LangGraph's control-flow exceptions (raised through its
    nodes, subgraphs and tools, never reaching the app's code).

    A node's ``Command(graph=Command.PARENT, goto=...)`` — a hand-off to another agent —
    is a ParentCommand: the step answered with that Command, it did not fail (three red
    spans, ``ParentCommand: Command(graph='sub:5f0c...', ...)``, in an `ok` record). An
    ``interrupt(value)`` is a GraphInterrupt: its text was the repr of LangGraph's
    Interrupt objects (with their ids); it says what the run is waiting for, and the
    values asked are kept in the span's metadata (``"interrupt"``) for the record.
    """
    name = type(error).__name__
    if name == _PARENT_COMMAND:
        span.outputs = error.args[0] if error.args else None
        span.error = None
        return
    raised = error.args[0] if error.args else ()
    asked = [getattr(i, "value", i) for i in raised] \
        if isinstance(raised, list | tuple) else [raised]
    if not asked:
        span.error = describe_error(error)
        return
    span.metadata["interrupt"] = _snapshot(asked[0] if len(asked) == 1 else asked)
    text = "; ".join(a if isinstance(a, str) else repr(a) for a in asked)
    span.error = f"{name}: {_PAUSED}{text}"


def _read(main: Callable[[Any], Any], value: Any) -> Any:
    """The main input or output of a run; the value as it is when it cannot be read (the
    record is built off the app's thread or on a user's look: it must not raise)."""
    try:
        return main(value)
    except Exception:
        logger.exception("scrutiny: reading the main value of a run failed; kept as is")
        return value


def _last_step(spans: list[Span], root: Span, unread: Sequence[str] = ()) -> Span | None:
    """The root's last direct step that finished with an output (not LangGraph's
    ``__start__``, which only hands the input on); None if there is none. `unread`: the
    names of the steps whose update the consumer of a LangGraph stream has not received
    (the latest step of each is passed over)."""
    root_id = root.span_id
    steps = sorted((s for s in spans
                    if s.parent_id == root_id and s.end_time is not None
                    and s.outputs is not None and s.error is None and s.name != "__start__"),
                   key=lambda s: s.end_time or 0)
    for name in unread:
        for i in range(len(steps) - 1, -1, -1):
            if steps[i].name == name:
                del steps[i]
                break
    return steps[-1] if steps else None


def _last_step_output(spans: list[Span], root: Span) -> Any:
    """The main output of the root's last direct step that finished with an output."""
    last = _last_step(spans, root)
    return None if last is None else _read(main_output, last.outputs)


_GRAPH_OUTPUTS = frozenset(("updates", "values"))


def _copy_of(queue: Any) -> list[Any]:
    """A list of what a deque holds, read while a node's thread may still append to it
    (a copy fails then, "deque mutated during iteration": tried again)."""
    for _ in range(10):
        try:
            return list(queue)
        except RuntimeError:
            continue
    return list(queue)


def _graph_received(graph: FrameType, root: _Root) -> Any:
    """(A LangGraph run the app read as a stream, ending with an error: it failed, or its
    consumer stopped it.) What the consumer last received — the update or state, the text
    of the message streamed to it so far — to be read as the record's output (a failed
    run's partial output); None when it received nothing, `_NOT_STREAMED` when that cannot
    be told (a stream of other modes only, `custom` or `debug`).

    LangGraph ends such a run with no output, and its nodes run ahead of the consumer: an
    update that a node of the same step made later than the one the consumer read (a
    fan-out), or the tokens a model kept writing into the stream's queue, were taken for
    what the consumer saw. Read from the run's loop (`graph`, the frame of `Pregel.stream`
    / `astream`): the queue still holds the chunks the consumer was not given, and an
    async loop holds the chunk it yielded last (``o``).
    """
    try:
        local = graph.f_locals
        queue = getattr(local.get("stream"), "_queue", None)
        unread = _copy_of(queue) if queue is not None else []  # (ns, mode, payload) each
        stream_mode = local.get("stream_mode")
        modes = stream_mode if isinstance(stream_mode, list) else [stream_mode]
        last_chunk = None
        if graph.f_code in _pregel_methods("astream"):
            if "o" not in local:  # (nothing was yielded yet)
                return None
            mode, payload = _graph_chunk(local["o"], stream_mode, local.get("subgraphs"),
                                         local.get("version"))
            if mode in _GRAPH_OUTPUTS:
                return payload
            if mode == "messages":
                last_chunk = payload[0] if isinstance(payload, tuple | list) else payload
                if not isinstance(last_chunk, BaseMessageChunk):
                    return last_chunk  # (a whole message: a tool's, a model's unstreamed)
        if "messages" in modes and root.tokens:
            seen = _tokens_seen(root.tokens, unread, last_chunk)
            if seen is not None:
                return seen
        if _GRAPH_OUTPUTS.intersection(modes):
            names = [name for ns, mode, payload in unread
                     if not ns and mode == "updates" and isinstance(payload, dict)
                     for name, update in payload.items() if update is not None]
            step = _last_step(root.spans, root.spans[0], names)
            return None if step is None else step.outputs
    except Exception:  # (the record keeps the last step that finished, as before)
        logger.exception("scrutiny: reading what a LangGraph stream yielded failed")
    return _NOT_STREAMED


def _graph_chunk(chunk: Any, stream_mode: Any, subgraphs: Any, version: Any) -> tuple[Any, Any]:
    """The mode and payload of a chunk a LangGraph stream yielded, in each of its shapes:
    ``{"type", "ns", "data"}`` (version "v2"), ``(ns, mode, payload)``, ``(mode, payload)``
    (several modes), ``(ns, payload)`` (`subgraphs=True`), the payload alone."""
    if version == "v2" and isinstance(chunk, dict) and "type" in chunk:
        return chunk["type"], chunk.get("data")
    if isinstance(stream_mode, list):
        return (chunk[1], chunk[2]) if subgraphs else (chunk[0], chunk[1])
    return stream_mode, chunk[1] if subgraphs else chunk


def _tokens_seen(tokens: list[str], unread: list[Any], last: Any) -> str | None:
    """The text of the model's tokens the consumer of a `stream_mode="messages"` stream
    received: those streamed (`tokens`) less the ones still in the queue (`unread`), which
    are the last ones (the queue is first in, first out); None when the two disagree, or
    when the chunk it received last (`last`, when known) is not where they end."""
    streamed = "".join(tokens)
    unread_text = "".join(_text_of(payload[0]) for _ns, mode, payload in unread
                          if mode == "messages" and isinstance(payload, tuple | list)
                          and isinstance(payload[0], BaseMessageChunk))
    if not streamed.endswith(unread_text):
        return None
    seen = streamed[:len(streamed) - len(unread_text)]
    if not seen or (last is not None and not seen.endswith(_text_of(last))):
        return None
    return seen


def _ancestry(span: Span, spans: list[Span]) -> list[Span]:
    """`span` and the spans it is a step of, innermost first."""
    by_id = {str(s.span_id): s for s in spans}
    chain, seen = [span], {str(span.span_id)}
    parent = by_id.get(str(span.parent_id)) if span.parent_id is not None else None
    while parent is not None and str(parent.span_id) not in seen:
        chain.append(parent)
        seen.add(str(parent.span_id))
        parent = by_id.get(str(parent.parent_id)) if parent.parent_id is not None else None
    return chain


def _last_user_message(state: Any) -> str | None:
    """The text of the last user message in a LangGraph state's ``messages``."""
    messages = state.get("messages") if isinstance(state, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if getattr(message, "type", None) == "human":
            return _text_of(message) or None
    return None


def _text_of(message: Any) -> str:
    text = content_text(message)
    return text if isinstance(text, str) else ""


def _artifact_documents(span: Span) -> list[Any] | None:
    """The documents a tool returned as its artifact (``response_format=
    "content_and_artifact"``, as LangChain's RAG agents retrieve), when it did."""
    artifact = span.metadata.get("artifact") if span.metadata else None
    if isinstance(artifact, list | tuple) and artifact and all(
            isinstance(d, Document) for d in artifact):
        return list(artifact)
    return None


def _contexts(spans: list[Span]) -> list[str]:
    """The texts of the retrieved documents: those retrievers returned, and those tools
    returned as their artifact (unless a retriever inside the tool returned them)."""
    tools = {s.span_id for s in spans if s.kind == _TOOL and _artifact_documents(s)}
    if tools:  # the tools' spans above a retriever: that retriever's documents are kept
        by_id = {s.span_id: s for s in spans}
        for s in spans:
            if s.kind == _RETRIEVER:
                parent = by_id.get(s.parent_id) if s.parent_id is not None else None
                while parent is not None:
                    tools.discard(parent.span_id)
                    parent = by_id.get(parent.parent_id) \
                        if parent.parent_id is not None else None
    texts: list[str] = []
    for s in spans:
        if s.kind == _RETRIEVER and isinstance(s.outputs, list):
            texts.extend(document_text(d) for d in s.outputs)
        elif s.span_id in tools:
            texts.extend(document_text(d) for d in _artifact_documents(s) or ())
    return texts


def _build_record(record_id: str, settings: RecorderSettings, root: _Root, span: Span,
                  ended: int, run_id: UUID) -> Record:
    """The record of a finished root run (runs once, on whichever thread asks first)."""
    spans = root.spans
    for s in spans:
        s.span_id = str(s.span_id)
        if s.parent_id is not None:
            s.parent_id = str(s.parent_id)
        if isinstance(s.model, _ModelHint):
            s.model = s.model.name()
        if isinstance(s.outputs, LLMResult):  # a model's response, kept as it came
            response = s.outputs
            try:
                s.outputs, s.usage = llm_output(response), usage_of(response)
            except Exception:
                s.usage = None
    try:
        contexts = _contexts(spans)
    except Exception:  # a document whose text cannot be read: the record is kept without
        logger.exception("scrutiny: reading the retrieved documents of a run failed")
        contexts = []
    # Child runs still open when the root ends: the consumer stopped a stream early
    # (LangChain then ends a sync stream's root run normally — it swallows the
    # GeneratorExit — with the output gathered so far, and never ends the children); when
    # the root failed, a sibling step raised while these still ran (async branches); and
    # when a call that is no stream returned, a step started them in the background
    # without waiting (`pool.submit(ctx.run, other.invoke, x)`, `asyncio.create_task`):
    # the call itself returned its answer, so its record is `ok`.
    unfinished = [s for s in spans if s.end_time is None]
    in_background = ended == _ENDED_OK and not _was_streamed(root)
    for child in unfinished:
        child.end_time = span.end_time
        child.error = child.error or (
            _OUTLIVED if ended == _FAILED else _EXITED if ended == _ENDED_AT_EXIT
            else _IN_BACKGROUND if in_background else _STOPPED_EARLY)
    if ended == _STOPPED:
        # (an event stream's steps end with the CancelledError it used; a LangGraph
        # stream's, with one carrying LangGraph's sentinel: "<object object at 0x...>")
        for s in spans:
            if s.error is not None and s.error.partition(":")[0] == _CANCELLED_ERROR:
                s.error = _STOPPED_EARLY
    elif ended == _CANCELLED and span.error == _CANCELLED_ERROR:
        span.error = _CANCELLED_TEXT
    error_text = span.error
    partial = None
    if ended == _ENDED_OK and (in_background or not unfinished):
        status, output = RecordStatus.OK, _read(main_output, span.outputs)
        error_text = None  # (a tool called as the app that handled its own error)
    else:
        status = RecordStatus.ERROR if ended == _FAILED else RecordStatus.CANCELLED
        received = getattr(root, "received", _NOT_STREAMED)
        if received is not _NOT_STREAMED:
            # A stream that failed or was stopped: what its caller received, rather than
            # the model's tokens (a later step may have passed on only some of them, or
            # changed them).
            output = None if received is None else _read(main_output, received)
        else:
            streamed = "".join(root.tokens) if root.tokens else None
            output = streamed if span.outputs is None else _read(main_output, span.outputs)
            # (A stream whose loop could not be read.) LangChain adds a sync stream's chunk
            # to the run's output only once the generator is resumed past its yield: a
            # consumer that stopped after k chunks left k - 1 there. The model's tokens
            # hold the k the caller saw, when no later step changed them.
            if (span.outputs is not None and isinstance(output, str) and streamed is not None
                    and len(streamed) > len(output) and streamed.startswith(output)):
                output = streamed
        if output is None and ended in (_STOPPED, _ENDED_AT_EXIT) and received is _NOT_STREAMED:
            # A LangGraph stream stopped early ends its root with no output and streams no
            # tokens of its own: when what the consumer last saw could not be read (see
            # _graph_received), the last step that finished (a node's update) stands for
            # it, so feedbacks judge that rather than nothing.
            output = _last_step_output(spans, span)
        if ended == _STOPPED or (ended == _ENDED_OK and unfinished):
            error_text = _STOPPED_EARLY
        elif ended == _FAILED:
            # A failed call has no answer, streamed or not: what it produced before it
            # failed (a stream's chunks) is kept to be seen, but not as the output that
            # feedbacks judge — they end `skipped`, as for a failed invoke.
            partial, output = output, None
    usage = _calls_usage(spans)
    tags = [*settings.tags, *root.tags]
    metadata = {**settings.metadata, **root.metadata}
    paused = next((s for s in spans if s.error and s.error.startswith(_INTERRUPTS)), None)
    record_input = _read(main_input, span.inputs)
    if record_input is None and span.inputs is None:
        # A LangGraph thread continued with graph.invoke(None, config) — past a static
        # breakpoint, or replayed from a checkpoint — had no input: its input/output
        # feedbacks were skipped. The question it answers is the thread's last user
        # message.
        record_input = _last_user_message(span.outputs)
    if paused is not None and status is RecordStatus.OK:
        # A LangGraph run paused by interrupt() returns normally, so it looked like a
        # finished answer: said so, for filters and for feedbacks that should not judge it.
        tags.append("interrupted")
        # The deepest steps that paused (nodes side by side may each call interrupt(): the
        # app gets every Interrupt, and the record kept only one): in a subgraph, its node,
        # not the parent graph's node that runs the subgraph (a tool's pause names the node
        # that ran the tool).
        pausing = [s for s in spans if s.error and s.error.startswith(_INTERRUPTS)]
        under = {s.parent_id for s in pausing}
        deepest = [s for s in pausing if str(s.span_id) not in under] or [paused]
        nodes = [next((a.name for a in _ancestry(s, spans) if any(
            t.startswith(_NODE_TAG) for t in a.tags) and a in pausing), s.name)
            for s in deepest]
        metadata["interrupted_at"] = ", ".join(dict.fromkeys(nodes))
        values = [s.metadata["interrupt"] for s in deepest if "interrupt" in s.metadata]
        asked = None if not values else values[0] if len(values) == 1 else values
        if asked is not None:
            metadata["interrupt"] = asked
            if output is None or (isinstance(output, str) and output == record_input) \
                    or asks_for_tools(span.outputs):
                # Paused before it answered anything: the state's last message is the
                # user's own question, or the model's call of the tool that paused (an
                # agent asking for approval in a tool), which was recorded (and judged) as
                # the answer. What the run returned to the user is what it asked them.
                output = _read(main_output, asked)
    stopped = span.metadata.get("breakpoint")
    if stopped is not None and paused is None and status is RecordStatus.OK:
        # paused at a static breakpoint: the steps that are next (interrupt_before) or
        # that just ran (interrupt_after) and wait for a human's go-ahead
        when, nodes = stopped
        tags.append("interrupted")
        metadata["interrupted_at"] = ", ".join(nodes) if when == "before" else next(
            (s.name for s in reversed(spans) if s.parent_id == str(span.span_id)
             and s.error is None), ", ".join(nodes))
        metadata["breakpoint"] = f"interrupt_{when}"
    if partial is not None:
        metadata["partial_output"] = partial
    return Record(
        record_id=record_id,
        app_name=settings.app_name,
        app_version=settings.app_version,
        input=record_input,
        output=output,
        status=status,
        error=error_text,
        start_time=span.start_time,
        end_time=span.end_time or span.start_time,
        spans=spans,
        contexts=contexts,
        usage=usage,
        tags=tags,
        metadata=metadata,
        framework="langchain",
        root_run_id=str(run_id),
    )


def _calls_usage(spans: list[Span]) -> TokenUsage | None:
    """Total usage of the model calls: a model run that wraps another one (a router,
    cache or guard model calling the real one as its child run) reports that call's
    usage again, and counts only when no model run inside it reported any (as
    `Select.spans(kind="llm")` takes the pair for one call)."""
    reporting = [s for s in spans if s.usage is not None]
    if len(reporting) < 2:
        return TokenUsage.total([s.usage for s in reporting])
    by_id = {s.span_id: s for s in spans}
    covered: set[str] = set()
    for s in reporting:  # (only model runs report usage: see usage_of)
        parent = by_id.get(s.parent_id) if s.parent_id is not None else None
        while parent is not None and parent.span_id not in covered:
            covered.add(parent.span_id)
            parent = by_id.get(parent.parent_id) if parent.parent_id is not None else None
    return TokenUsage.total([s.usage for s in reporting if s.span_id not in covered])


class _FeedbackBridge:
    """Hands each stored result to the handlers of the recorded run, through LangChain.

    Runs on Scrutiny's callback thread, after the result is stored. Async handlers (and async
    `on_feedback_result` methods) run there to their end on a private event loop, so no
    event is lost when the application's loop has stopped; to touch objects of the app's
    loop they must hand over with ``loop.call_soon_threadsafe``.
    """

    __slots__ = ("handlers", "metadata", "run_id", "tags")

    def __init__(self, handlers: list[BaseCallbackHandler], run_id: UUID, tags: list[str],
                 metadata: dict[str, Any]) -> None:
        self.handlers = handlers
        self.run_id = run_id
        self.tags = tags
        self.metadata = metadata

    @property
    def __scrutiny_name__(self) -> str:
        """What a slow-callback warning names: the app's handlers, not this bridge."""
        return "LangChain handler " + ", ".join(
            sorted({type(h).__qualname__ for h in self.handlers}))

    def __call__(self, result: FeedbackResult, record: Record) -> None:
        for handler in self.handlers:
            method = getattr(handler, "on_feedback_result", None)
            if not callable(method):
                continue
            try:
                outcome = method(result, record)
                if inspect.isawaitable(outcome):  # an async on_feedback_result
                    asyncio.run(_awaited(outcome))
            except Exception:
                logger.exception("scrutiny: %s.on_feedback_result raised",
                                 type(handler).__name__)
        payload = feedback_event_payload(result, record)
        for handler in self.handlers:
            # One handler at a time: LangChain re-raises the error of a handler with
            # `raise_error=True`, which stopped the event before the handlers after it.
            try:
                handle_event([handler], "on_custom_event", "ignore_custom_event",
                             FEEDBACK_EVENT, dict(payload), run_id=self.run_id,
                             tags=self.tags, metadata=self.metadata)
            except Exception:
                logger.exception("scrutiny: %s.on_custom_event raised on a feedback result",
                                 type(handler).__name__)


def feedback_event_payload(result: FeedbackResult, record: Record) -> dict[str, Any]:
    """The data of a :data:`FEEDBACK_EVENT`: :meth:`FeedbackResult.as_dict` (``record_id``,
    ``feedback_name``, ``status``, ``result`` and its alias ``score``, ``explanation``,
    ``error``, ...) with the record's ``app_name`` and ``app_version``."""
    payload = result.as_dict()
    payload["app_name"] = record.app_name
    payload["app_version"] = record.app_version
    return payload


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


_handlers: weakref.WeakSet[ScrutinyCallbackHandler] = weakref.WeakSet()


def _open_calls(session: Session) -> int:
    """Root runs under way whose record goes to `session` (see Session.aclose)."""
    return sum(len(h._roots) for h in list(_handlers) if h._roots and h.settings.uses(session))


open_call_counters.append(_open_calls)


def _end_open_calls() -> None:
    """At interpreter exit: the calls every handler still has open become records."""
    for handler in list(_handlers):
        handler._end_at_exit()
