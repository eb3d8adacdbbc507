"""`ChainRecorder`: record every LangChain call made inside a `with` block.

Inside the block the recorder's handler is attached to every LangChain run through
LangChain's own configure hooks (the mechanism its tracers use): nothing is patched, and
calls outside the block — or in other threads and tasks that did not inherit the block's
context — are not recorded. While the blocks of several recorders are open, a call is
recorded by the recorder of the app that makes it (each recorder records its own chain,
also when another recorded chain calls it); a call of a chain no open recorder was given
is recorded by each.
"""

from __future__ import annotations

import contextvars
import hashlib
import threading
from collections.abc import Sequence
from typing import Any

from langchain_core.tracers.context import register_configure_hook

from scrutiny.core import (
    ConfigurationError,
    Feedback,
    FeedbackMode,
    Recording,
    Session,
)
from scrutiny.core._recording import block_mode, left_elsewhere
from scrutiny.core._records import MAX_APP_LABEL_BYTES, app_id_for
from scrutiny.integrations.langchain._handler import OPEN_BLOCKS, ScrutinyCallbackHandler

__all__ = ["ChainRecorder", "Recording"]

_hook_lock = threading.Lock()
_hook_vars: list[contextvars.ContextVar[ScrutinyCallbackHandler | None]] = []
_OPEN_HINT = ("a stream that was stopped early is recorded when it is closed: call "
              "`.close()` on a stream you broke out of (or let it be released); an async "
              "one ends when the event loop finalizes it: use `async with recorder:` or "
              "await once more")
_NESTED_HINT = ("this block is inside another block of the same recorder: a call made "
                "while one of the outer block's calls runs (a chain called by a chain) is "
                "part of that call's record, in the outer recording; a call made directly "
                "in this block is recorded here")
_EMPTY_HINT = ("no call was recorded while the `with` block was open. A stream runs only as "
               "it is read: `stream()` / `astream()` called in the block but read after it "
               "(a StreamingResponse, say) ran outside it, unrecorded. Read it inside the "
               "block, or pass config={'callbacks': [recorder]} to "
               "stream()/astream(), which records it wherever it is read (its record is then "
               "in recorder.records). Threads started by hand do not inherit the "
               "block either: pass them that config")


def _hook_var(level: int) -> contextvars.ContextVar[ScrutinyCallbackHandler | None]:
    """One configure hook per nesting level, registered with LangChain on first use."""
    if level < len(_hook_vars):  # registered already (the list only grows)
        return _hook_vars[level]
    with _hook_lock:
        while len(_hook_vars) <= level:
            var: contextvars.ContextVar[ScrutinyCallbackHandler | None] = \
                contextvars.ContextVar(f"scrutiny_lc_recorder_{len(_hook_vars)}", default=None)
            register_configure_hook(var, True)
            _hook_vars.append(var)
        return _hook_vars[level]


def _default_name(app: Any, app_version: str) -> str:
    """The app's own name (`get_name()`, else its class's), as the default app name.

    Some are long: a `RunnableParallel` names every key (``RunnableParallel<key_0,key_1,
    ...>``), and one of a few hundred keys made a name of thousands of characters, which no
    store takes (the recorder refused it, telling the user to shorten the version they had
    left at its default). A name too long to be stored with the version is cut, with a
    hash of the whole name after it, so that it stays one app's name, the same in every
    process; one that can be stored is kept as it is (the name its records have).
    """
    get_name = getattr(app, "get_name", None)
    name = get_name() if callable(get_name) else type(app).__name__
    name = name if isinstance(name, str) else str(name)
    encoded = name.encode("utf-8", "surrogatepass")
    version = app_version if isinstance(app_version, str) else ""  # (refused later)
    room = MAX_APP_LABEL_BYTES - len(version.encode("utf-8", "surrogatepass"))
    if len(encoded) <= room:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    kept = encoded[:max(16, room - len(digest) - 4)].decode("utf-8", "ignore")
    return f"{kept}...~{digest}"


class _Block:
    """One open ``with recorder:`` block: its recorder's handler, its recording and the
    context tokens to reset when it is left."""

    __slots__ = ("app", "handler", "hook_token", "open_token", "recording")

    def __init__(self, handler: ScrutinyCallbackHandler, recording: Recording,
                 app: Any) -> None:
        self.handler = handler
        self.recording = recording
        self.app = app  # (which calls are its own when other recorders' blocks are open)
        self.hook_token: contextvars.Token[Any] | None = None
        self.open_token: contextvars.Token[Any] | None = None


class ChainRecorder(ScrutinyCallbackHandler):
    """Records a LangChain app (a chain, a runnable, a model, a retriever).

    Args:
        app: the LangChain object being recorded (its name is the default app name; one too
            long to be stored with the version is cut, with a hash of the whole name; with
            other recorders' blocks open, its calls are the ones this one records).
        app_name, app_version: what the records belong to.
        feedbacks: evaluated on every record.
        session: where records go (default: the session created last).
        feedback_mode: overrides the session's mode for this recorder.
        tags, metadata: added to every record.
        keep_records: how many of its latest records it keeps in `records`.

    Use ``with recorder as recording: ...`` (or ``async with``), or pass the recorder
    itself (it is a LangChain callback handler) in ``config={"callbacks": [recorder]}``:
    either way one root call gives exactly one record, also when both are used at once.
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
        keep_records: int = 100,
    ) -> None:
        if app_name is None:
            if app is None:  # (its records were filed under app "NoneType")
                raise ConfigurationError(
                    "ChainRecorder needs the app it records, or an app_name: "
                    "ChainRecorder(chain, app_name='qa')")
            app_name = _default_name(app, app_version)
        self.app = app
        super().__init__(
            app_name, app_version, feedbacks=feedbacks, session=session,
            feedback_mode=feedback_mode, tags=tags, metadata=metadata,
            keep_records=keep_records)

    @property
    def handler(self) -> ScrutinyCallbackHandler:
        """The recorder itself: the LangChain callback handler its blocks attach (passing
        either in ``config={"callbacks": [...]}`` is the same)."""
        return self

    @property
    def app_id(self) -> str:
        """``"app_name:app_version"``, the id its records are stored and filtered under."""
        return app_id_for(self.app_name, self.app_version)

    def _mode(self) -> FeedbackMode:
        return self.handler.settings.mode()

    # ------------------------------------------------------------------ the block
    def __enter__(self) -> Recording:
        # The open blocks live in the context: one recorder may be entered at once by many
        # threads and asyncio tasks (one block per web request), and each leaves its own.
        handler = self.handler
        blocks = OPEN_BLOCKS.get()
        nested = any(b.handler is handler for b in blocks)
        recording = Recording(self.feedback_mode, open_hint=_OPEN_HINT,
                              empty_hint=_NESTED_HINT if nested else _EMPTY_HINT)
        block = _Block(handler, recording, self.app)
        block.hook_token = _hook_var(len(blocks)).set(handler)
        block.open_token = OPEN_BLOCKS.set((*blocks, block))
        return recording

    def _leave(self) -> Recording | None:
        """Close the innermost block of this recorder open in this context; None (logged)
        when none is: see _left_elsewhere."""
        blocks = OPEN_BLOCKS.get()
        handler = self.handler
        block: _Block
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i].handler is handler:
                block = blocks[i]
                break
        else:
            left_elsewhere("ChainRecorder")
            return None
        level = i
        assert block.open_token is not None
        assert block.hook_token is not None
        try:
            OPEN_BLOCKS.reset(block.open_token)
        except ValueError:  # entered in a context this one was copied from
            OPEN_BLOCKS.set(blocks[:i] + blocks[i + 1:])
        try:
            _hook_vars[level].reset(block.hook_token)
        except ValueError:
            old = block.hook_token.old_value
            _hook_vars[level].set(None if old is contextvars.Token.MISSING else old)
        return block.recording

    def __exit__(self, *exc: object) -> None:
        recording = self._leave()
        mode = None if recording is None else block_mode(recording, self.handler.settings)
        if recording is not None and mode is FeedbackMode.WITH_APP:  # (the only mode
            recording.finish(mode)  # that waits on leaving)

    async def __aenter__(self) -> Recording:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        recording = self._leave()
        mode = None if recording is None else block_mode(recording, self.handler.settings)
        if recording is not None and mode is not None:
            await recording.afinish(mode)

