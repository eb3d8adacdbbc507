"""Process-wide plumbing of sessions: exit and fork hooks, and the callback thread."""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrutiny.core._session import Session

__all__ = ["Notifier", "install_process_hooks", "live_sessions"]

logger = logging.getLogger("scrutiny")

live_sessions: weakref.WeakSet[Session] = weakref.WeakSet()
_hooks_lock = threading.Lock()
_hooks_installed = False


def install_process_hooks() -> None:
    """Flush at interpreter exit and reset threads in forked children (once per process)."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    # Run before concurrent.futures joins its pools at shutdown, so evaluations that are
    # still running can finish (threading's private hook; atexit where it is missing).
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError
        register(_close_all_at_exit)
    except RuntimeError:
        import atexit

        atexit.register(_close_all_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_all_at_exit() -> None:
    for session in list(live_sessions):
        try:
            session.close()
        except Exception:
            logger.exception("scrutiny: closing a session at exit failed")


def _after_fork_in_child() -> None:
    for session in list(live_sessions):
        session._after_fork()


class Notifier:
    """One daemon thread that runs user callbacks in order, never under our locks."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="scrutiny-callbacks",
                                        daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # (sys.exit() in a callback ended this thread: no more)
                logger.exception("scrutiny: callback %r raised", fn)

    def close(self, timeout: float | None) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
