"""A thread pool of daemon threads for plain (sync) feedback functions.

The standard `ThreadPoolExecutor` joins its threads at interpreter exit, so one feedback
stuck in a network call would hold the whole process open past its flush timeout. These
threads are daemons: exit stays bounded, and what they had not finished stays `pending`
in the database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DaemonThreadPool"]

T = TypeVar("T")

_Item = tuple["concurrent.futures.Future[Any] | asyncio.Future[Any]", Callable[..., Any],
              tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(concurrent.futures.Executor):
    """Up to `max_workers` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "scrutiny-sync") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._shutdown = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
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

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], /,
            *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on a pool thread; the result arrives as an asyncio future of
        `loop` (call this on the loop's thread).

        Results finished while the loop has not yet collected earlier ones are delivered
        together, with one wake-up of the loop, instead of one per result as
        `run_in_executor` does.
        """
        self._loop = loop
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue((future, fn, args, {}))
        return future

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
            future, fn, args, kwargs = item
            if isinstance(future, asyncio.Future):
                try:
                    self._deliver_later(future, fn(*args, **kwargs), None)
                except BaseException as exc:
                    self._deliver_later(future, None, exc)
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del item, future
            self._idle.release()

    def _deliver_later(self, future: asyncio.Future[Any], value: Any,
                       error: BaseException | None) -> None:
        with self._done_lock:
            self._done.append((future, value, error))
            if self._done_scheduled:
                return
            self._done_scheduled = True
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            pass

    def _deliver(self) -> None:
        """On the loop: hand every finished result to its future."""
        with self._done_lock:
            done, self._done = self._done, []
            self._done_scheduled = False
        for future, value, error in done:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
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
