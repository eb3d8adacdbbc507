"""`ChainRecorder`: record every LangChain call made inside a `with` block.

Inside the block the recorder's handler is attached to every LangChain run through
LangChain's own configure hooks (the mechanism its tracers use): nothing is patched, and
calls outside the block — or in other threads and tasks that did not inherit the block's
context — are not recorded.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Sequence
from typing import Any

from langchain_core.tracers.context import register_configure_hook

from scrutiny.core import (
    Feedback,
    FeedbackMode,
    Recording,
    RecordingError,
    Session,
)
from scrutiny.integrations.langchain._handler import ScrutinyCallbackHandler

__all__ = ["ChainRecorder", "Recording"]

_hook_lock = threading.Lock()
_hook_vars: list[contextvars.ContextVar[ScrutinyCallbackHandler | None]] = []
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("scrutiny_lc_depth", default=0)
_OPEN_HINT = ("an async stream that was stopped early ends when the event loop finalizes "
              "it: use `async with recorder:` or await once more")
_EMPTY_HINT = ("call the chain inside the `with` block (threads started by hand do not "
               "inherit the block; pass config={'callbacks': [recorder.handler]} there)")


def _hook_var(level: int) -> contextvars.ContextVar[ScrutinyCallbackHandler | None]:
    """One configure hook per nesting level, registered with LangChain on first use."""
    with _hook_lock:
        while len(_hook_vars) <= level:
            var: contextvars.ContextVar[ScrutinyCallbackHandler | None] = \
                contextvars.ContextVar(f"scrutiny_lc_recorder_{len(_hook_vars)}", default=None)
            register_configure_hook(var, True)
            _hook_vars.append(var)
        return _hook_vars[level]


class _Block:
    """One open ``with recorder:`` block: its recording and the context tokens to reset."""

    __slots__ = ("recording", "tokens")

    def __init__(self, recording: Recording, tokens: list[contextvars.Token[Any]]) -> None:
        self.recording = recording
        self.tokens = tokens


class ChainRecorder:
    """Records a LangChain app (a chain, a runnable, a model, a retriever).

    Args:
        app: the LangChain object being recorded (its name is the default app name).
        app_name, app_version: what the records belong to.
        feedbacks: evaluated on every record.
        session: where records go (default: the session created last).
        feedback_mode: overrides the session's mode for this recorder.
        tags, metadata: added to every record.

    Use ``with recorder as recording: ...`` (or ``async with``), or pass
    ``recorder.handler`` in ``config={"callbacks": [...]}``: either way one root call gives
    exactly one record.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        app_name: str | None = None,
        app_version: str = "v1",
        feedbacks: Sequence[Feedback] = (),
        session: Session | None = None,
        feedback_mode: FeedbackMode | str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if app_name is None:
            get_name = getattr(app, "get_name", None)
            app_name = get_name() if callable(get_name) else type(app).__name__
        self.app = app
        self.handler = ScrutinyCallbackHandler(
            app_name, app_version, feedbacks=feedbacks, session=session,
            feedback_mode=feedback_mode, tags=tags, metadata=metadata)
        self.feedback_mode = self.handler.feedback_mode
        # The open blocks of this recorder, per context: one recorder may be entered at
        # once by many threads and asyncio tasks (one block per web request), and each
        # must leave its own block.
        self._blocks: contextvars.ContextVar[tuple[_Block, ...]] = contextvars.ContextVar(
            f"scrutiny_lc_blocks_{id(self):x}", default=())

    @property
    def app_name(self) -> str:
        return self.handler.app_name

    @property
    def app_version(self) -> str:
        return self.handler.app_version

    @property
    def session(self) -> Session:
        return self.handler.session

    @property
    def feedbacks(self) -> list[Feedback]:
        return self.handler.feedbacks

    def _mode(self) -> FeedbackMode:
        return self.handler.settings.mode()

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> Recording:
        recording = Recording(self.feedback_mode, open_hint=_OPEN_HINT,
                              empty_hint=_EMPTY_HINT)
        level = _depth.get()
        var = _hook_var(level)
        tokens: list[contextvars.Token[Any]] = [
            var.set(self.handler),
            _depth.set(level + 1),
            self.handler._recording.set(recording),
        ]
        tokens.append(self._blocks.set((*self._blocks.get(), _Block(recording, tokens))))
        return recording

    def _leave(self) -> Recording:
        blocks = self._blocks.get()
        if not blocks:
            raise RecordingError(
                "leaving a ChainRecorder block that was not entered in this thread or task "
                "(enter and leave a block in the same context)")
        block = blocks[-1]
        for token in reversed(block.tokens):
            try:
                token.var.reset(token)
            except ValueError:  # entered in a context this one was copied from
                old = token.old_value
                if old is contextvars.Token.MISSING:
                    old = () if token.var is self._blocks else 0 if token.var is _depth \
                        else None
                token.var.set(old)
        return block.recording

    def __exit__(self, *exc: object) -> None:
        self._leave().finish(self._mode())

    async def __aenter__(self) -> Recording:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        await self._leave().afinish(self._mode())
