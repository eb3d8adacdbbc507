"""A thread pool of daemon threads for plain (sync) feedback functions.

The standard `ThreadPoolExecutor` joins its threads at interpreter exit, so one feedback
stuck in a network call would hold the whole process open past its flush timeout. These
threads are daemons: exit stays bounded, and what they had not finished stays `pending`
in the database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from scrutiny.core._courtesy import Courtesy
    from scrutiny.core._slots import SlotGate, SyncCall

__all__ = ["DaemonThreadPool"]

logger = logging.getLogger("scrutiny")

T = TypeVar("T")

_Item = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...],
              dict[str, Any]] | tuple["SlotGate", "SyncCall"]
# Something for the loop: a future to resolve with (value, error), or fn(value) to call.
_Delivery = tuple["asyncio.Future[Any] | Callable[[Any], object]", Any, "BaseException | None"]


class DaemonThreadPool(concurrent.futures.Executor):
    """Up to `max_workers` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "scrutiny-sync", *,
                 courtesy: Courtesy | None = None) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._blocked = None if courtesy is None else courtesy.blocked
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._done: list[_Delivery] = []
        self._done_lock = threading.Lock()
        self._done_scheduled = False

    def prestart(self) -> None:
        """Start every thread now (off the application's thread), so that a burst of work
        does not pay for thread starts one by one."""
        with self._lock:
            while len(self._threads) < self._max and not self._shutdown:
                self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, daemon=True,
                                  name=f"{self._prefix}-{len(self._threads)}")
        self._threads.append(thread)
        thread.start()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver results to `loop` (call this on the loop's thread)."""
        self._loop = loop
        self._loop_thread = threading.current_thread()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._loop_thread

    def run_calls(self, call: SyncCall, gate: SlotGate) -> None:
        """Run `call`, which holds a slot of `gate`, on a pool thread; that thread then runs
        whichever sync call the slot goes to next (see :mod:`scrutiny.core._slots`)."""
        self._enqueue((gate, call))

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue((future, fn, args, kwargs))
        return future

    def _enqueue(self, item: _Item) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool that is shut down")
            self._queue.put(item)
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                self._spawn()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # wake the next thread to stop too
                return
            if len(item) == 2:
                self._run_calls(*item)
            else:
                future, fn, args, kwargs = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
                del future
            del item
            self._idle.release()

    def _run_calls(self, gate: SlotGate, call: SyncCall | None) -> None:
        """Run `call`, then every sync call its slot is handed to, on this thread; results
        (and start times) reach the loop in batches."""
        blocked = self._blocked
        me = threading.get_ident()
        while call is not None:
            if call.abandoned:
                call = gate.finish(call)
                continue
            call.started = time.monotonic()
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
            if not isinstance(target, asyncio.Future):
                try:
                    target(value)
                except Exception:  # a bug of ours must not cost the other deliveries
                    logger.exception("scrutiny: a sync call's notice to the loop failed")
            elif target.cancelled():
                continue
            elif error is not None:
                target.set_exception(error)
            else:
                target.set_result(value)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and len(item) == 4:
                    item[0].cancel()  # sync calls of the loop end with its tasks
        self._queue.put(None)
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
