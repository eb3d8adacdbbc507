"""Process-wide plumbing of sessions: exit and fork hooks, and the callback thread."""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import numbers
import os
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from scrutiny.core._session import Session

__all__ = ["WAIT_MAX", "Notifier", "at_exit", "end_when_dropped", "exit_stage",
           "install_process_hooks", "live_sessions", "open_call_counters", "settle_callbacks",
           "shared_notifier", "wait_limit"]

logger = logging.getLogger("scrutiny")

live_sessions: weakref.WeakSet[Session] = weakref.WeakSet()
open_call_counters: list[Callable[[Session], int]] = []
"""One per framework integration: how many recorded calls it has open whose record goes to
the session given (see `Session.aclose`)."""
_hooks_lock = threading.Lock()
_hooks_installed = False
_exit_hooks: list[Callable[[], object]] = []
_unfinished: set[weakref.finalize[Any, Any]] = set()
"""Ends still owed for objects alive (see end_when_dropped); each removes itself."""
_unfinished_lock = threading.Lock()
_stage = 0  # 0: running; 1: ending what is unfinished at exit; 2: sessions closed at exit


WAIT_MAX = threading.TIMEOUT_MAX / 4
"""The longest wait a caller's timeout is taken as (over a century): the platform's waits
refuse longer ones (OverflowError), and deadlines made from it stay within them."""


@overload
def wait_limit(timeout: float) -> float: ...
@overload
def wait_limit(timeout: None) -> None: ...
@overload
def wait_limit(timeout: float | None) -> float | None: ...
def wait_limit(timeout: float | None) -> float | None:
    """A caller's timeout as Scrutiny's waits take it: ``float("inf")`` (or anything past
    WAIT_MAX) is WAIT_MAX, as good as no limit. It raised OverflowError, and close(inf)
    left the session marked closed with its threads still running. A timeout that is not
    a number (``"5"``) is refused here, rather than deep inside a wait, and so is NaN:
    no comparison holds for it, so some waits took it as no limit at all and others as
    none left."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout is seconds (a number) or None; got {timeout!r}")
    if timeout != timeout:  # NaN
        raise ValueError("timeout is NaN; give seconds (a number, inf for no limit) or None")
    return WAIT_MAX if timeout > WAIT_MAX else timeout


def exit_stage() -> int:
    """0 while the process runs; 1 while what is unfinished is ended at exit (see
    :func:`end_when_dropped`, :func:`at_exit`); 2 once the sessions are closed at exit."""
    return _stage


def install_process_hooks() -> None:
    """Flush at interpreter exit and reset threads in forked children (once per process)."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        _hooks_installed = True
    # Two steps. First, before concurrent.futures joins its pools (threading's private
    # exit hook, which runs before the interpreter joins the app's own threads), the
    # evaluations under way finish while executors still take work; the sessions stay
    # open. Then, once every thread of the app has ended (atexit), what is still open is
    # ended and the sessions closed. Closed in the first step, they dropped every record
    # the app's own threads (a ThreadPoolExecutor not shut down, threads the main thread
    # did not join) made while the interpreter waited for them.
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(_drain_all_at_exit)
    except RuntimeError:  # (the interpreter is past that point: atexit still runs)
        pass
    atexit.register(_close_all_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def at_exit(hook: Callable[[], object]) -> None:
    """Run `hook` at interpreter exit before the sessions are closed (once, however often
    it is registered): an integration ends there the calls still open, whose records
    would otherwise reach a closed session (or none) when the interpreter tears down."""
    install_process_hooks()
    with _hooks_lock:
        if hook not in _exit_hooks:
            _exit_hooks.append(hook)


def end_when_dropped(obj: object, end: Callable[..., object], *args: Any) -> None:
    """Call ``end(*args)`` when `obj` is garbage-collected — or at interpreter exit, before
    the sessions close, if it is still alive then (a stream the app still held unread:
    weakref.finalize's own exit call comes after the sessions are closed, and its record
    was lost). `end` must tolerate being called after the object ended by other means."""
    install_process_hooks()
    fin: weakref.finalize[Any, Any]

    def run() -> None:
        with _unfinished_lock:
            _unfinished.discard(fin)
        end(*args)

    fin = weakref.finalize(obj, run)
    fin.atexit = False
    with _unfinished_lock:
        _unfinished.add(fin)


_interrupted = False


def interrupted_at_exit() -> None:
    """Ctrl-C while the exit waits for evaluations (a second one, after the one that
    stopped the app): every session releases what is unfinished as `pending` now (it
    printed a traceback, waited on, and once more left the results `running`)."""
    global _interrupted
    if not _interrupted:
        _interrupted = True
        logger.warning("scrutiny: interrupted while finishing evaluations at exit: what is "
                       "unfinished is released as pending now")
    for session in list(live_sessions):
        session._cut_close_short()


def _drain_all_at_exit() -> None:
    # (one span for all: drained one after another, each waiting its own flush_timeout,
    # three sessions with a slow evaluation each held the exit for 30 s)
    began = time.monotonic()
    sessions = list(live_sessions)
    for session in sessions:
        try:
            session._drain(began)
        except KeyboardInterrupt:  # (Ctrl-C again: what is unfinished is released now)
            interrupted_at_exit()
            return
        except Exception:
            logger.exception("scrutiny: finishing a session's evaluations at exit failed")


def _close_all_at_exit() -> None:
    global _stage
    _stage = 1
    with _unfinished_lock:
        ends: list[Callable[[], object]] = list(_unfinished)
    with _hooks_lock:
        ends += _exit_hooks
    for end in ends:
        try:
            end()
        except Exception:
            logger.exception("scrutiny: ending the calls still open at exit failed")
    sessions = list(live_sessions)
    for session in sessions:
        try:
            if session._exit_deadline is not None and \
                    time.monotonic() >= session._exit_deadline:
                # (the exit waited for its evaluations already: what is unfinished is
                # released now — waited for again, one session after another, exit took
                # a second more per session)
                session._cut_close_short()
            session.close(session._exit_timeout())
        except KeyboardInterrupt:  # (Ctrl-C again: the rest is released at once)
            interrupted_at_exit()
        except Exception:
            logger.exception("scrutiny: closing a session at exit failed")
    shared = _shared
    if shared is not None and shared[0] == os.getpid():  # (callbacks handed to it run)
        owed = shared[1].close(SHARED_DRAIN)
        if owed:
            logger.warning(
                "scrutiny: %d results callback(s) had not run %g s into the exit and are "
                "lost: keep callbacks short, or hand slow work to a thread of your own",
                owed, SHARED_DRAIN)
    _stage = 2


def _after_fork_in_child() -> None:
    for session in list(live_sessions):
        session._after_fork()


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


SLOW_CALLBACK = 0.5
"""Seconds a callback may run on the callback thread before a warning says it held the
others up (once per callback)."""
SLOW_NAMES_KEPT = 100
"""The most callbacks named in slow-callback warnings (each once); past them, one more
warning says so and the rest are logged at debug: an app that made a callable per call
would otherwise grow the set of names for ever."""


def _named(fn: Callable[..., object]) -> str:
    """The user's callable behind what the callback thread runs, by a name that stays the
    same from one call to the next (never a repr with an address: the warning was said
    again for every record). An object may name itself with a ``__scrutiny_name__``
    attribute or property (the framework bridges name the app's handlers so); a results
    callback is run through the record's count of finished results (its `_callback`)."""
    try:
        for target in (fn, getattr(fn, "__self__", None)):
            given = getattr(target, "__scrutiny_name__", None)
            if isinstance(given, str) and given:
                return given
        owner = getattr(fn, "__self__", None)
        inner = getattr(owner, "_callback", None)
        target = inner if callable(inner) else fn
        name = getattr(target, "__qualname__", None)
        if isinstance(name, str) and name:
            return name
        return type(target).__qualname__  # (a callable object: its class, not its repr)
    except Exception:  # (a broken __getattr__ must not stop the callback thread)
        return type(fn).__qualname__


class Notifier:
    """One daemon thread that runs user callbacks in order, never under our locks (an
    ``async def`` one is run to its end there). A callback that runs SLOW_CALLBACK or
    longer is named in a warning (once): every other one waited behind it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._warned: set[str] = set()
        self._count_lock = threading.Lock()
        self._given = 0  # callbacks handed over (not the internal marks of settle())
        self._ran = 0  # of those, run (or raised)
        self._thread = threading.Thread(target=self._run, name="scrutiny-callbacks",
                                        daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        with self._count_lock:
            self._given += 1
        self._queue.put((fn, args))

    @property
    def owed(self) -> int:
        """Callbacks handed over and not run yet (the one running included)."""
        return self._given - self._ran

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            if fn is _mark:  # (settle(): everything handed over before it has run)
                args[0].set()
                continue
            started = time.monotonic()
            try:
                outcome = fn(*args)
                if inspect.isawaitable(outcome):  # an async listener: run to its end here
                    asyncio.run(_awaited(outcome))  # (it was never awaited: never ran)
            except BaseException:  # (sys.exit() in a callback ended this thread: no more)
                logger.exception("scrutiny: callback %s raised", _named(fn))
            finally:
                with self._count_lock:
                    self._ran += 1
            took = time.monotonic() - started
            if took >= SLOW_CALLBACK:
                self._slow(fn, took)

    def _slow(self, fn: Callable[..., object], took: float) -> None:
        name = _named(fn)
        if name in self._warned:
            return
        if len(self._warned) >= SLOW_NAMES_KEPT:
            logger.debug("scrutiny: callback %s took %.1f s on the callback thread", name, took)
            return
        self._warned.add(name)
        logger.warning(
            "scrutiny: callback %s took %.1f s on the session's callback thread; every other "
            "results callback, listener and feedback event waited behind it (%d waiting "
            "now). Keep callbacks short: hand slow work (an HTTP post, a database write) to "
            "a thread or queue of your own. (Said once per callback%s.)",
            name, took, max(0, self.owed - 1),
            "; other slow callbacks are no longer named" if
            len(self._warned) == SLOW_NAMES_KEPT else "")

    def settle(self, timeout: float | None) -> bool:
        """Wait until every callback handed over before this call has run; False when
        `timeout` ran out first. (On the callback thread itself: True at once, it cannot
        wait for itself.)"""
        if threading.current_thread() is self._thread:
            return True
        if not self._thread.is_alive():
            return self.owed == 0
        reached = threading.Event()
        self._queue.put((_mark, (reached,)))
        return reached.wait(timeout)

    def close(self, timeout: float | None) -> int:
        """Run what was handed over, within `timeout`, then end the thread. Returns how
        many callbacks had not run when the time ran out (0: all ran); those still run
        while the process lives, and are lost when it exits (a daemon thread)."""
        self._queue.put(None)
        if threading.current_thread() is self._thread:  # (closed from a callback: the
            return 0  # rest runs once it returns)
        self._thread.join(timeout)
        return self.owed if self._thread.is_alive() else 0


def _mark(reached: threading.Event) -> None:
    """(A mark queued by Notifier.settle: the thread sets `reached` when it gets there.)"""
    reached.set()


SHARED_DRAIN = 5.0
"""Seconds the shared callback thread is given at exit to run what it was handed."""
_shared: tuple[int, Notifier] | None = None
_shared_lock = threading.Lock()


def settle_callbacks(notifier: Notifier | None, timeout: float | None) -> bool:
    """Wait until the callbacks handed to `notifier` (a session's) and to the shared
    callback thread before this call have run; False when `timeout` ran out first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if notifier is not None and not notifier.settle(timeout):
        return False
    shared = _shared
    if shared is None or shared[0] != os.getpid() or not shared[1].owed:
        return True
    return shared[1].settle(None if deadline is None
                            else max(0.0, deadline - time.monotonic()))


def shared_notifier() -> Notifier:
    """A callback thread for callbacks that no session is about to run: a results callback
    given once every result of its record is stored already (or it has none). Started on
    first use (again in a forked child); what it was handed runs before the process exits.
    """
    global _shared
    pid = os.getpid()
    shared = _shared
    if shared is None or shared[0] != pid:
        install_process_hooks()
        with _shared_lock:
            if _shared is None or _shared[0] != pid:
                _shared = (pid, Notifier())
            shared = _shared
    return shared[1]
