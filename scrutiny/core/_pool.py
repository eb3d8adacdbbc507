"""A thread pool of daemon threads for plain (sync) feedback functions.

The standard `ThreadPoolExecutor` joins its threads at interpreter exit, so one feedback
stuck in a network call would hold the whole process open past its flush timeout. These
threads are daemons: exit stays bounded, and what they had not finished stays `pending`
in the database.

Work is handed to an idle thread directly, each thread waiting on a lock of its own. With
one shared queue (`queue.SimpleQueue`) only one waiting thread is woken at a time, and
each wakes the next only once it has the GIL back and has taken its item: a burst of 24
calls started one after another, up to a switch interval (5 ms) apart while the
application kept the GIL busy — the last ones 160 ms late, holding their concurrency slots
all the while.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from scrutiny.core._courtesy import Courtesy
    from scrutiny.core._slots import SlotGate, SyncCall

__all__ = ["DaemonThreadPool", "RaisedInCall", "futurable"]


class RaisedInCall(Exception):
    """An exception a call raised that an asyncio future cannot hold (StopIteration — a
    plain ``next()`` on an empty iterator —, GeneratorExit), carried inside this one:
    set as it was, the first was refused by the future (the result never arrived, and
    neither did the others delivered with it) and the second was taken by the awaiting
    coroutines for their own closing."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def futurable(error: BaseException) -> BaseException:
    """`error`, or a :class:`RaisedInCall` carrying it when a future cannot hold it."""
    return RaisedInCall(error) if isinstance(error, (StopIteration, GeneratorExit)) else error

logger = logging.getLogger("scrutiny")

T = TypeVar("T")

_Item = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...],
              dict[str, Any]] | tuple["SlotGate", "SyncCall"]
# Something for the loop: a future to resolve with (value, error), or fn(value) to call.
_Delivery = tuple["asyncio.Future[Any] | Callable[[Any], object]", Any, "BaseException | None"]


class _PoolFuture(concurrent.futures.Future[T]):
    """A `submit()` future that tells its pool when its caller gives up on the running
    call (a future of a running call cannot be cancelled: see _abandoned)."""

    def __init__(self, pool: DaemonThreadPool) -> None:
        super().__init__()
        self._pool = pool
        self.stuck = False

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self._pool._abandoned(self)
        return False


class _Worker:
    """One pool thread's hand-off: the item given to it and the lock it waits on."""

    __slots__ = ("item", "wake")

    def __init__(self) -> None:
        self.item: _Item | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class DaemonThreadPool(concurrent.futures.Executor):
    """Up to `max_workers` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "scrutiny-sync", *,
                 courtesy: Courtesy | None = None) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._blocked = None if courtesy is None else courtesy.blocked
        self._max = max_workers
        self._stuck = 0  # threads still inside a call the loop gave up on (timed out)
        self._warned_stuck = False
        self._prefix = thread_name_prefix
        self._backlog: collections.deque[_Item] = collections.deque()  # (no idle thread)
        self._threads: list[threading.Thread] = []
        self._idle: list[_Worker] = []  # waiting for work; the last one gets it first
        self._lock = threading.Lock()
        self._shutdown = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_start = 0.0
        """When a sync feedback call last started on one of the threads (monotonic): while
        calls keep starting, one granted a slot but queued for a thread is only queued."""
        self._loop_thread: threading.Thread | None = None
        self._done: list[_Delivery] = []
        self._done_lock = threading.Lock()
        self._done_scheduled = False

    def prestart(self, count: int | None = None) -> None:
        """Start every thread now (or up to `count` of them), off the application's
        thread, so that a burst of work does not pay for thread starts one by one."""
        with self._lock:
            limit = self._capacity() if count is None else min(count, self._capacity())
            while len(self._threads) < limit and not self._shutdown:
                if not self._spawn():
                    break

    def _capacity(self) -> int:
        """(Under the lock.) How many threads may run: `max_workers`, plus one for each
        thread still stuck in a call that timed out (up to `max_workers` more)."""
        return self._max + min(self._stuck, self._max)

    def lost(self, call: SyncCall) -> None:
        """`call` timed out while running: its thread stays inside it (a thread cannot be
        stopped) and is replaced. Without that, once every thread was stuck in a call that
        never returned (a network call without a timeout of its own), every later sync
        call — of any feedback — failed "waiting for a thread", for good."""
        self._replace_stuck(call, "a sync feedback call is still running after its timeout",
                            "A call that never returns keeps its thread: give the blocking "
                            "call inside the feedback a timeout of its own")

    def _replace_stuck(self, stuck_one: SyncCall | _PoolFuture[Any], what: str,
                       advice: str) -> None:
        """Count `stuck_one`'s thread as stuck (once) and start one in its place, up to
        `max_workers` more; say so (a warning the first time and once past the cap)."""
        with self._lock:
            if self._shutdown or stuck_one.stuck:
                return
            stuck_one.stuck = True
            self._stuck += 1
            stuck, capped = self._stuck, self._stuck > self._max
            if self._backlog and len(self._threads) < self._capacity():
                self._spawn()
        log = logger.debug if self._warned_stuck and not capped else logger.warning
        self._warned_stuck = True
        log("scrutiny: %s; %s (%d thread(s) stuck so far). %s", what,
            "no more threads are started for stuck ones" if capped
            else "a new thread takes its place", stuck, advice)

    def _spawn(self) -> bool:
        """(Under the lock.) Start one more thread; False when none can be started."""
        thread = threading.Thread(target=self._work, args=(_Worker(),), daemon=True,
                                  name=f"{self._prefix}-{len(self._threads)}")
        try:
            thread.start()
        except RuntimeError:
            # Python 3.12+ starts no thread once the interpreter is shutting down (atexit,
            # where sessions are closed): the work goes to the threads there are, or
            # stays queued until close() leaves it pending.
            logger.debug("scrutiny: no new pool thread could be started", exc_info=True)
            return False
        self._threads.append(thread)
        return True

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver results to `loop` (call this on the loop's thread)."""
        self._loop = loop
        self._loop_thread = threading.current_thread()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._loop_thread

    def run_calls(self, call: SyncCall, gate: SlotGate) -> None:
        """Run `call`, which holds a slot of `gate`, on a pool thread; that thread then runs
        whichever sync call the slot goes to next (see :mod:`scrutiny.core._slots`).

        After shutdown (the session closing) it does nothing: a slot freed by an evaluation
        being cancelled went to a queued call, whose evaluation is cancelled too — the
        error raised here was stored as that feedback's failure."""
        try:
            self._enqueue((gate, call))
        except RuntimeError:
            if not self._shutdown:
                raise

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        future: _PoolFuture[T] = _PoolFuture(self)
        self._enqueue((future, fn, args, kwargs))
        return future

    def _abandoned(self, future: _PoolFuture[Any]) -> None:
        """The caller of a running `submit()` call gave up on it (the evaluation awaiting
        it timed out: asyncio cancels the future): its thread is replaced, as a timed-out
        sync feedback's is (see lost). The loop's executor runs the blocking calls of
        models without async support; two calls hung on a dead connection held its
        threads, and every later judge result failed as timed out without a call."""
        self._replace_stuck(future, "a blocking call (a model without async support, run on "
                            "the evaluation loop's threads) is still running after its "
                            "evaluation gave up on it",
                            "Give the model a request timeout of its own")

    def _enqueue(self, item: _Item) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that is shut down")
            if self._idle:
                worker = self._idle.pop()
                worker.item = item
                worker.wake.release()
                return
            self._backlog.append(item)
            if len(self._threads) < self._capacity():
                self._spawn()

    def _next(self, worker: _Worker) -> _Item | None:
        """The next item for `worker`'s thread: its hand-off, else the backlog, else wait
        for one. None: the pool is shut down."""
        while True:
            item, worker.item = worker.item, None
            if item is not None:
                return item
            with self._lock:
                if self._backlog:
                    return self._backlog.popleft()
                if self._shutdown:
                    return None
                if len(self._threads) > self._capacity():  # (a stuck call came back)
                    self._threads.remove(threading.current_thread())
                    return None
                self._idle.append(worker)
            worker.wake.acquire()  # released by _enqueue (or shutdown) for us alone

    def _work(self, worker: _Worker) -> None:
        while (item := self._next(worker)) is not None:
            if len(item) == 2:
                self._run_calls(*item)
            else:
                future, fn, args, kwargs = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
                    finally:
                        if getattr(future, "stuck", False):  # (came back after all)
                            with self._lock:
                                self._stuck -= 1
                del future
            del item

    def _run_calls(self, gate: SlotGate, call: SyncCall | None) -> None:
        """Run `call`, then every sync call its slot is handed to, on this thread; results
        (and start times) reach the loop in batches."""
        blocked = self._blocked
        me = threading.get_ident()
        while call is not None:
            if call.abandoned:
                call = gate.finish(call)
                continue
            call.started = self.last_start = time.monotonic()
            call.started_at = datetime.now(timezone.utc)
            self.deliver_later(call.on_start, call.started_at, None, wake=False)
            if blocked is not None:  # inside the call (see scrutiny.core._courtesy)
                blocked.add(me)
            try:
                value, error = call.fn(), None
            except BaseException as exc:
                value, error = None, exc
            finally:
                if blocked is not None:
                    blocked.discard(me)
                if call.stuck:  # (came back after all: its replacement may end)
                    with self._lock:
                        self._stuck -= 1
            following = gate.finish(call)
            # Mid-chain the loop is not woken: it collects while sync calls are out (see
            # deliver_later); the chain's last result wakes it.
            self.deliver_later(call.future, value, error, wake=following is None)
            del value, error
            call = following

    def deliver_later(self, target: asyncio.Future[Any] | Callable[[Any], object],
                      value: Any, error: BaseException | None, *, wake: bool = True) -> None:
        """Resolve a future of the loop (or call ``target(value)`` there), from any thread.

        Deliveries made while the loop has not yet collected earlier ones go together, with
        one wake-up of the loop (`call_soon_threadsafe` wakes it once per call).

        With ``wake=False`` the loop is not woken: it finds the delivery when it next
        :meth:`collect`\\ s, which it does before every poll while sync calls are out. Waking
        it writes to its self-pipe, a system call that gives up the GIL — and while the app
        keeps the GIL busy, getting it back takes up to a switch interval (5 ms), which a
        thread about to start its next call should not wait.
        """
        with self._done_lock:
            self._done.append((target, value, error))
            if self._done_scheduled or not wake:
                return
            self._done_scheduled = True
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    def collect(self) -> bool:
        """On the loop: hand over whatever the threads delivered (none: a cheap check);
        whether there was anything."""
        if not self._done:
            return False
        self._deliver()
        return True

    def _deliver(self) -> None:
        """On the loop: hand every finished result to its future."""
        with self._done_lock:
            done, self._done = self._done, []
            self._done_scheduled = False
        for target, value, error in done:
            try:
                if not isinstance(target, asyncio.Future):
                    target(value)
                elif target.cancelled():
                    continue
                elif error is not None:
                    target.set_exception(futurable(error))
                else:
                    target.set_result(value)
            except Exception:  # a bug of ours must not cost the other deliveries
                logger.exception("scrutiny: delivering a sync call's outcome to the loop "
                                 "failed")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            dropped = list(self._backlog) if cancel_futures else []
            if cancel_futures:
                self._backlog.clear()
            idle, self._idle = self._idle, []
        for item in dropped:
            if len(item) == 4:
                item[0].cancel()  # sync calls of the loop end with its tasks
        for worker in idle:  # (with no item: they see the shutdown and end)
            worker.wake.release()
        if wait:
            self.join(None)

    def join(self, timeout: float | None) -> bool:
        """Wait (at most `timeout` seconds in all) for the threads to end after shutdown."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
