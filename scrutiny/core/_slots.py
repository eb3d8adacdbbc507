"""The session's concurrency limit, shared by its event loop and its sync-pool threads.

An `asyncio.Semaphore` lives on the loop alone: a slot freed by a plain (sync) feedback would
travel pool thread -> loop (one wake-up) -> the next evaluation -> a pool thread (another)
before the next sync call could start, and while the application keeps the GIL busy each of
those hand-offs waits up to a switch interval (5 ms). Here the pool thread that finishes a
sync call gives its slot straight to the next queued sync call and runs it itself; an async
evaluation waiting for a slot is woken on the loop as before. Waiters are served in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrutiny.core._pool import DaemonThreadPool

__all__ = ["SlotGate", "SyncCall"]


class SyncCall:
    """One call of a plain feedback function, queued for a slot and a pool thread.

    `future` (of the loop) gets its value; `on_start(started_at)` runs on the loop once the
    call has started. `started` is the monotonic time it started (set by its thread).
    """

    __slots__ = ("abandoned", "fn", "future", "granted", "granted_at", "on_start", "started",
                 "started_at", "stuck")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any],
                 on_start: Callable[[datetime], None]) -> None:
        self.fn = fn
        self.future = future
        self.on_start = on_start
        self.started: float | None = None
        self.started_at: datetime | None = None
        self.granted = False
        """Holds a slot (set under the gate's lock)."""
        self.granted_at: float | None = None
        """When it got its slot (monotonic): from then on it only waits for a thread."""
        self.abandoned = False
        """The loop stopped waiting (timeout, cancellation) and took its slot back."""
        self.stuck = False
        """It timed out while running: its thread was replaced (see the pool's lost())."""


class _AsyncWaiter:
    __slots__ = ("future", "granted")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.granted = False


class SlotGate:
    """At most `limit` feedback calls at once, async and sync together.

    Async calls use ``async with gate:`` on the loop; sync calls go through
    :meth:`start_sync` and run on `pool`.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop,
                 pool: DaemonThreadPool) -> None:
        self._free = limit
        self._lock = threading.Lock()
        self._waiters: deque[_AsyncWaiter | SyncCall] = deque()
        self._loop = loop
        self._pool = pool

    # ------------------------------------------------------------------ on the loop
    async def __aenter__(self) -> None:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            waiter = _AsyncWaiter(self._loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:  # the slot arrived as the wait was cancelled: pass it on
                self.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def start_sync(self, call: SyncCall) -> None:
        """Run `call` on a pool thread as soon as it has a slot."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                call.granted = True
                call.granted_at = time.monotonic()
            else:
                self._waiters.append(call)
                return
        self._pool.run_calls(call, self)

    def abandon(self, call: SyncCall) -> None:
        """Stop waiting for `call`: a queued call leaves the queue; a started one gives its
        slot back now (its thread, still busy, will not give it again)."""
        with self._lock:
            if call.abandoned:
                return
            call.abandoned = True
            if not call.granted:
                self._waiters.remove(call)
                return
        self.release()

    # ------------------------------------------------------------------ any thread
    def release(self) -> None:
        """Give a slot back: to the first waiter, else to the free count."""
        with self._lock:
            waiter = self._grant_next()
        if isinstance(waiter, SyncCall):
            self._pool.run_calls(waiter, self)
        elif waiter is not None:
            self._wake(waiter)

    def finish(self, call: SyncCall) -> SyncCall | None:
        """On the pool thread that ran `call`: free its slot. Returns the next sync call,
        which now holds the slot, for this thread to run."""
        with self._lock:
            if call.abandoned:  # its slot was given back when the loop stopped waiting
                return None
            waiter = self._grant_next()
        if isinstance(waiter, SyncCall):
            return waiter
        if waiter is not None:
            self._wake(waiter)
        return None

    def _grant_next(self) -> _AsyncWaiter | SyncCall | None:
        """(Under the lock.) The waiter that now holds the freed slot, if any."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            if isinstance(waiter, SyncCall):
                waiter.granted_at = time.monotonic()
            return waiter
        self._free += 1
        return None

    def _wake(self, waiter: _AsyncWaiter) -> None:
        if self._pool.on_loop_thread():
            if not waiter.future.done():
                waiter.future.set_result(None)
        else:
            self._pool.deliver_later(waiter.future, None, None)
