"""Dispatch policies: *when and where* feedback is evaluated, behind one small interface.

- :class:`BackgroundDispatch` evaluates on the session's own event-loop thread (modes
  `with_app_thread` and `with_app`; the latter differs only in the recorder waiting).
- :class:`NoDispatch` evaluates nothing: results are stored as `skipped` (mode `none`).

The evaluation loop (:class:`EvaluationLoop`) is one daemon thread running asyncio: async
feedback functions run on it directly, plain ones in a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import select
import selectors
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from aiolimiter import AsyncLimiter

from scrutiny.core._courtesy import Courtesy, register, unregister
from scrutiny.core._evaluate import (
    CLOSING,
    Evaluator,
    cancel_task,
    describe_error,
    ended_by_us,
)
from scrutiny.core._feedback import Feedback
from scrutiny.core._mask import Mask
from scrutiny.core._pool import DaemonThreadPool
from scrutiny.core._results import FeedbackResult, FeedbackStatus

if TYPE_CHECKING:
    from scrutiny.core._records import Record

__all__ = [
    "BackgroundDispatch",
    "DeferredDispatch",
    "DispatchPolicy",
    "EvaluationLoop",
    "Job",
    "NoDispatch",
]

logger = logging.getLogger("scrutiny")

ARRIVALS_POLL = 0.002
ARRIVALS_IDLE_AFTER = 0.05
ARRIVALS_PER_PASS = 4
"""Records the loop takes per pass: the evaluations of the first ones of a burst start
before the jobs of the rest are made (taking 500 records at once delayed every evaluation by
tens of milliseconds, and started them all in the same millisecond: in lock-step ever after)."""
SYNC_POLL = 0.002
SYNC_POLL_MAX = 0.05
"""While sync feedback calls are out, the loop collects their results every SYNC_POLL
seconds while they keep coming, up to every SYNC_POLL_MAX while the calls take long (their
threads wake it only at the end of a chain of calls)."""
HELD_WARNING = 1.0
"""Seconds without a poll for I/O after which the loop says it was held by a blocking call."""
_INF = float("inf")
_FD_SETSIZE = 1024  # select()'s limit on descriptor numbers (Linux)


@dataclass(slots=True, eq=False)
class Job:
    """One feedback to evaluate on one record, starting from its stored pending result."""

    feedback: Feedback
    record: Record
    pending: FeedbackResult
    listeners: Sequence[Callable[[FeedbackResult, Record], object]] = ()
    lease_token: str | None = None
    evaluate_on: Record | None = None
    """The record the feedback reads, when not `record` itself: a deferred record
    evaluated in the app's own process reads it as stored, as any worker does."""


ResultHook = Callable[[Job, FeedbackResult], None]
StartHook = Callable[[Job, datetime], None]


class DispatchPolicy(Protocol):
    """Decides what happens to a record's results once its pending rows are stored."""

    name: str
    owns_rows: bool
    """Whether this process holds a lease on the pending rows it writes (False: any worker
    may claim them at once)."""

    def initial(self, job: Job) -> FeedbackResult:
        """The result row written with the record (pending, or already final)."""
        ...

    def dispatch(self, jobs: list[Job]) -> None:
        """Start evaluating (called once per record, by the writer thread as it writes
        the record's rows or earlier by :meth:`start_soon`'s starter)."""

    def start_soon(self, starter: Callable[[], object]) -> bool:
        """Run `starter` (which calls :meth:`dispatch`) soon on the evaluation side, without
        waiting for the writer; False when this policy has no such side."""


class NoDispatch:
    """Mode `none`: nothing is evaluated; each result is stored `skipped` with the reason."""

    name = "none"
    owns_rows = False

    def initial(self, job: Job) -> FeedbackResult:
        p = job.pending
        return FeedbackResult(
            record_id=p.record_id, feedback_name=p.feedback_name,
            status=FeedbackStatus.SKIPPED, created_at=p.created_at, ended_at=p.created_at,
            error="not evaluated: feedback_mode is 'none'", result_id=p.result_id,
            feedback_id=p.feedback_id,
        )

    def dispatch(self, jobs: list[Job]) -> None:
        return None

    def start_soon(self, starter: Callable[[], object]) -> bool:
        return False


class BackgroundDispatch:
    """Evaluate on the session's evaluation loop."""

    owns_rows = True

    def __init__(self, loop: Callable[[], EvaluationLoop], name: str) -> None:
        self._loop = loop
        self.name = name

    def initial(self, job: Job) -> FeedbackResult:
        return job.pending

    def dispatch(self, jobs: list[Job]) -> None:
        self._loop().submit(jobs)

    def start_soon(self, starter: Callable[[], object]) -> bool:
        self._loop().accept(starter)
        return True


class DeferredDispatch:
    """Mode `deferred`: rows stay pending for workers; this process only watches for their
    end states (so waits and callbacks still work here)."""

    name = "deferred"
    owns_rows = False

    def __init__(self, watch: Callable[[list[Job]], None]) -> None:
        self._watch = watch

    def initial(self, job: Job) -> FeedbackResult:
        return job.pending

    def dispatch(self, jobs: list[Job]) -> None:
        self._watch(jobs)

    def start_soon(self, starter: Callable[[], object]) -> bool:
        return False


class _GroupLimit:
    """A rate limit and/or a concurrency cap shared by one group of feedbacks."""

    def __init__(self, per_minute: float | None, max_concurrent: int | None) -> None:
        # capacity 1: calls are spaced evenly, never a burst of a minute's budget at once
        self._rate = AsyncLimiter(1, 60.0 / per_minute) if per_minute else None
        self._sem = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self._resume_at = 0.0  # (loop time) a server asked the group to wait until then

    def pause(self, seconds: float) -> None:
        """A server answered one call with "retry after `seconds`": that is about the key
        or account the whole group shares, so no call of it starts before then (the others
        kept calling into the window, each drawing another 429 and burning its retries)."""
        loop = asyncio.get_running_loop()
        self._resume_at = max(self._resume_at, loop.time() + seconds)

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if self._sem is not None:
            await self._sem.acquire()
        try:
            if self._rate is not None:
                await self._rate.acquire()
            # Last, right before the call: a pause that began while this one queued for a
            # permit holds it too. (It can grow while this waits — another 429 — so it is
            # read again.)
            while (wait := self._resume_at - loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
            yield
        finally:
            if self._sem is not None:
                self._sem.release()


_loop_limits: weakref.WeakKeyDictionary[Any, dict[str, _GroupLimit]] = \
    weakref.WeakKeyDictionary()
_unweakable_limits: list[tuple[Any, dict[str, _GroupLimit]]] = []  # (the latest such loop)
_loop_limits_lock = threading.Lock()


def group_limit(group: str, per_minute: float | None,
                max_concurrent: int | None) -> _GroupLimit:
    """The limit of rate-limit `group` on the running event loop: one per loop and group,
    shared by a session's evaluations of the group's feedbacks and by evaluators that limit
    their own calls (an LLMJudge awaited directly, or from a feedback function that wraps
    it). Each had a budget of its own — two judges of one group awaited side by side, or a
    judge's feedback beside a function awaiting the same judge, ran twice the cap. The
    group's first limits are its limits on that loop. (asyncio primitives belong to one
    loop: another loop has its own budget.)"""
    loop = asyncio.get_running_loop()
    with _loop_limits_lock:
        try:
            limits = _loop_limits.get(loop)
            if limits is None:
                limits = _loop_limits[loop] = {}
        except TypeError:  # a loop without weak references (one written in C)
            if not _unweakable_limits or _unweakable_limits[0][0] is not loop:
                _unweakable_limits[:] = [(loop, {})]
            limits = _unweakable_limits[0][1]
        limit = limits.get(group)
        if limit is None:
            limit = limits[group] = _GroupLimit(per_minute, max_concurrent)
        return limit


class _BusySelector(selectors.DefaultSelector):
    """The loop's selector, keeping the GIL while the loop has callbacks ready.

    asyncio polls for I/O on every pass of its loop, with a zero timeout when callbacks are
    ready; the poll gives the GIL away, and while the application's thread is busy getting
    it back waits up to a switch interval (5 ms). An evaluation takes a few passes (a timer
    wakes its task, the task finishes and frees a slot, the next task starts), so each one
    paid several such waits. Zero-timeout polls are skipped when the last poll is less than
    a millisecond old: I/O readiness is still seen within a millisecond, and waiting polls
    (a positive timeout: nothing is ready) are never skipped.

    Before each poll it runs `before_poll()`, which returns how long the poll may block at
    most (None: no limit); and it tells `courtesy` when the poll is due to end, so that the
    application's thread can hand over the GIL when the loop is late (see
    :mod:`scrutiny.core._courtesy`).

    Timed waits end on time: epoll counts whole milliseconds and rounds a wait up, so every
    timer (an async feedback's ``await asyncio.sleep``, a model's response timer, a
    timeout) fired 0-1 ms late, half a millisecond on average — for a slot running ten
    50 ms evaluations in a row, 5 ms. A wait with a fraction of a millisecond in it waits
    on the epoll descriptor itself with ``select()``, which counts microseconds (one system
    call, as before, and the registered descriptors are unchanged); epoll is asked for the
    events only when that reports some are ready. (select() takes descriptors below
    FD_SETSIZE only: a loop whose epoll descriptor is above it keeps epoll's rounding.)
    """

    _POLL_EVERY = 0.001

    def __init__(self, courtesy: Courtesy) -> None:
        super().__init__()
        self._last_poll = 0.0
        self._warned_held = False
        self.passes = 0
        self.closing = False
        self.courtesy = courtesy
        self.before_poll: Callable[[], float | None] | None = None
        epoll = getattr(selectors, "EpollSelector", None)
        self._precise = (epoll is not None and isinstance(self, epoll)
                         and self.fileno() < _FD_SETSIZE)

    def select(self, timeout: float | None = None) -> list[Any]:
        self.passes += 1  # (one per pass of the loop: see _evaluate._within)
        # When the loop's next timer is due. A cap of our own below is no one's deadline, and
        # a zero timeout (callbacks ready) is none either: the loop gets back to them at the
        # next switch; offering the app's time for them cost quick feedbacks' apps 1-2 %.
        asked = time.monotonic()
        if asked - self._last_poll > HELD_WARNING and self._last_poll and not self.closing:
            self._warn_held(asked - self._last_poll)
        due = _INF if timeout is None or timeout <= 0 else asked + timeout
        before = self.before_poll
        cap = None if before is None else before()
        now = time.monotonic()
        wait = None if timeout is None else max(0.0, asked + timeout - now)
        if cap is not None and (wait is None or wait > cap):
            wait = cap
        if wait is not None and wait <= 0 and now - self._last_poll < self._POLL_EVERY:
            return []
        courtesy = self.courtesy
        courtesy.due = due
        try:
            events: list[Any] = self._wait(wait)
        finally:
            courtesy.due = _INF
        self._last_poll = time.monotonic()
        return events

    def _warn_held(self, held: float) -> None:
        """Nothing but a blocking call keeps the loop from polling this long."""
        log = logger.debug if self._warned_held else logger.warning
        self._warned_held = True
        log("scrutiny: the evaluation loop was held for %.1f s without a break: an async "
            "feedback made a blocking call (a sync client, time.sleep, a sync model call). "
            "Every other evaluation waited, and their timeouts counted it. Make that "
            "feedback a plain def (it then runs on a thread) or await "
            "asyncio.to_thread(...) around the call", held)

    def _wait(self, wait: float | None) -> list[Any]:
        if not self._precise or wait is None or wait <= 0 or (wait * 1e3).is_integer():
            return super().select(wait)
        try:
            ready, _, _ = select.select([self.fileno()], [], [], wait)
        except InterruptedError:
            return []
        except (ValueError, OSError):  # the descriptor is out of select()'s range
            self._precise = False
            return super().select(wait)
        return super().select(0) if ready else []


class _Loop(asyncio.SelectorEventLoop):
    """The evaluation loop: ``run_in_executor(None, ...)`` runs on daemon threads.

    Frameworks fall back to the default executor for models without native async
    (LangChain runs a sync-only chat model's ``_generate`` there). asyncio's own is a
    ``ThreadPoolExecutor`` of cpus + 4 threads — 6 judge calls at once on two cores,
    whatever the session's limit, with the rest timing out in its queue — whose threads
    the interpreter joins at exit: one hung model call kept the process alive past
    ``close()``. (``set_default_executor`` takes only a ``ThreadPoolExecutor``.)

    A call sent there runs in the caller's context, as with ``asyncio.to_thread``: an async
    feedback's ``await loop.run_in_executor(None, model.invoke, text)`` ran without it, so
    the model's call was recorded as an app record when the model carried a recorder's
    handler (given at its construction), and its ``add_evaluation_cost`` was lost.
    """

    def __init__(self, selector: selectors.BaseSelector, default_pool: DaemonThreadPool) -> None:
        super().__init__(selector)
        self._default_pool = default_pool
        self.scrutiny_selector = selector

    def run_in_executor(self, executor: Any, func: Any,  # type: ignore[override]
                        *args: Any) -> asyncio.Future[Any]:
        if executor is not None:  # (maybe a process pool: a context cannot be sent there)
            return super().run_in_executor(executor, func, *args)
        return super().run_in_executor(self._default_pool, contextvars.copy_context().run,
                                       func, *args)


def _new_loop(courtesy: Courtesy, default_pool: DaemonThreadPool) -> tuple[
        asyncio.AbstractEventLoop, _BusySelector | None]:
    if sys.platform == "win32":  # pragma: no cover - the proactor loop has no selector
        return asyncio.new_event_loop(), None
    selector = _BusySelector(courtesy)
    return _Loop(selector, default_pool), selector


UNWIND = 0.5
"""Seconds cancelled evaluations get to unwind once the evaluation loop has stopped."""


class EvaluationLoop:
    """A daemon thread with an asyncio loop that evaluates jobs.

    Args:
        max_concurrency: the most feedback calls running at once.
        thread_pool_size: threads for plain (sync) feedback functions.
        executor: run every feedback call there instead (e.g. a Dask cluster's executor);
            results still come back here to be stored and announced.
        default_timeout: seconds per attempt when a feedback sets none.
        on_running: called (on the loop) with the time a job got its concurrency slot.
        on_final: called (on the loop) with the end state of each job.
    """

    def __init__(self, *, max_concurrency: int, thread_pool_size: int,
                 default_timeout: float | None, on_running: StartHook,
                 on_final: ResultHook, name: str = "scrutiny-eval",
                 executor: concurrent.futures.Executor | None = None,
                 mask: Mask | None = None) -> None:
        self._mask = mask
        self._on_running = on_running
        self._on_final = on_final
        self._courtesy = Courtesy()
        self._pool = DaemonThreadPool(thread_pool_size, thread_name_prefix=f"{name}-sync",
                                      courtesy=self._courtesy)
        # For run_in_executor(None, ...) on the loop (see _Loop): as many threads as
        # feedback calls may run at once, started as needed.
        self._default_pool = DaemonThreadPool(max_concurrency,
                                              thread_name_prefix=f"{name}-executor")
        self._loop, selector = _new_loop(self._courtesy, self._default_pool)
        self._selector = selector
        if selector is not None:
            selector.before_poll = self._before_poll
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbox: list[Job] = []
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        # Records handed over by the application (see accept()): looked at every
        # ARRIVALS_POLL seconds while they keep coming, the loop woken only when it is not.
        self._arrivals: collections.deque[Callable[[], object]] = collections.deque()
        self._watching = False
        self._wake_sent = False
        self._last_arrival = 0.0
        self._last_sync_delivery = 0.0
        self._syncing = False
        self._max_concurrency = max_concurrency
        self._default_timeout = default_timeout
        self._executor = executor
        self._evaluator: Evaluator | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=name,
                                        daemon=True)
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._evaluator = Evaluator(
            loop=self._loop, pool=self._pool, max_concurrency=self._max_concurrency,
            default_timeout=self._default_timeout, limiter_for=self._limiter_for,
            executor=self._executor, mask=self._mask)
        # One thread for plain feedbacks before the application goes on: a script that
        # ends right after its call reaches interpreter exit at once, where Python 3.12+
        # starts no new thread, and its plain feedbacks had none to run on.
        self._pool.prestart(1)
        ready.set()
        self._pool.prestart()
        register(self._courtesy)
        try:
            self._loop.run_forever()
        finally:
            unregister(self._courtesy)
            self._unwind()
            self._loop.close()

    def _unwind(self) -> None:
        """(The loop has stopped: close() cancelled what was unfinished.) Let cancelled
        evaluations unwind for up to UNWIND seconds, then close those that still have not:
        left pending on the closed loop, each was reported when the garbage collector
        reached it, at some later moment of the app — "Task was destroyed but it is
        pending!" from asyncio, and the coroutine's own error as it was closed there."""
        loop = self._loop
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=UNWIND))
            for task in pending:
                if task.done():
                    continue
                task._log_destroy_pending = False  # type: ignore[attr-defined]
                closing = CLOSING.set(True)
                try:
                    task.get_coro().close()  # (its finally blocks run now, here)
                except BaseException as exc:  # (it would not end: an await in a finally)
                    logger.debug("scrutiny: closing an evaluation that would not end: %s",
                                 exc)
                finally:
                    CLOSING.reset(closing)
        except Exception:
            logger.debug("scrutiny: unwinding the evaluation loop failed", exc_info=True)

    def _limiter_for(self, feedback: Feedback) -> Callable[
            [], AbstractAsyncContextManager[Any]] | None:
        limit = feedback.rate_limit
        if limit is None:
            return None
        return group_limit(limit.group or feedback.name, limit.per_minute,
                           limit.max_concurrent)

    # ------------------------------------------------------------------ any thread
    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, jobs: list[Job]) -> None:
        """Schedule jobs; thread-safe, returns at once.

        Jobs submitted while the loop has not yet picked up earlier ones join them: one
        wake-up of the loop (a write to its self-pipe) serves them all.
        """
        if threading.get_ident() == self._thread.ident:
            self._start(jobs)
            return
        with self._inbox_lock:
            self._inbox.extend(jobs)
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._take_inbox)
        except RuntimeError:  # the loop is closed: the results stay pending in the database
            logger.warning("scrutiny: evaluation loop closed; %d result(s) stay pending",
                           len(jobs))

    def accept(self, starter: Callable[[], object]) -> None:
        """Run `starter` on the loop soon; thread-safe, returns at once, never raises.

        This is how a record's evaluations start without waiting for the writer: while the
        application's thread keeps the interpreter busy, every commit of the writer waits
        for the interpreter lock several times, and evaluations that waited for it started
        tens of milliseconds late. While records keep arriving the loop looks for them at
        least every ARRIVALS_POLL seconds by itself, so handing one over costs the
        application an append, not a wake-up (a system call).
        """
        self._arrivals.append(starter)
        if self._watching or self._wake_sent:
            return
        self._wake_sent = True
        try:
            self._loop.call_soon_threadsafe(self._on_arrival_wake)
        except RuntimeError:  # the loop is closed: the writer's dispatch reports it
            return
        # Its poll ends now: the loop waits for the GIL from here on (see _courtesy).
        self._courtesy.due = time.monotonic()

    def _on_arrival_wake(self) -> None:
        self._wake_sent = False
        self._take_arrivals()

    def _before_poll(self) -> float | None:
        """(On the loop, before each poll for I/O.) Start what was handed over and collect
        what the sync pool's threads delivered; returns how long the poll may block."""
        evaluator = self._evaluator
        sync_poll: float | None = None
        syncing = evaluator is not None and evaluator.sync_in_flight > 0
        if syncing:
            # (their threads do not wake the loop mid-chain: see _pool.deliver_later)
            now = time.monotonic()
            if self._pool.collect() or not self._syncing:
                self._last_sync_delivery = now
            # Often while results keep coming; less so while the calls take long.
            sync_poll = min(SYNC_POLL_MAX,
                            max(SYNC_POLL, (now - self._last_sync_delivery) / 4))
        self._syncing = syncing
        if self._arrivals:
            self._take_arrivals()
            return 0.0  # their tasks are ready to run
        if not self._watching:
            return sync_poll
        if time.monotonic() - self._last_arrival < ARRIVALS_IDLE_AFTER:
            return ARRIVALS_POLL
        self._watching = False
        if self._arrivals:  # handed over while we decided: nobody woke us for it
            self._take_arrivals()
            return 0.0
        return sync_poll

    def _take_arrivals(self) -> None:
        """Start ARRIVALS_PER_PASS handed-over records at most; the poll that follows does
        not wait while more are left (see _before_poll)."""
        arrivals = self._arrivals
        if not arrivals:
            return
        self._watching = True
        self._last_arrival = time.monotonic()
        for _ in range(min(len(arrivals), ARRIVALS_PER_PASS)):
            starter = arrivals.popleft()
            try:
                starter()
            except Exception:
                logger.exception("scrutiny: starting evaluations failed; the writer "
                                 "starts them when it stores the record")

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            jobs, self._inbox = self._inbox, []
            self._inbox_scheduled = False
        self._start(jobs)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def close(self, timeout: float | None) -> list[Job]:
        """Cancel what is still running; return the jobs that did not finish."""
        unfinished: list[Job] = []
        done = threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout

        selector = self._selector

        def cancel_all() -> None:
            if selector is not None:  # unwinding thousands of tasks is no blocking feedback
                selector.closing = True
            for task in list(self._tasks):
                cancel_task(task)
                job = getattr(task, "scrutiny_job", None)
                if job is not None:
                    unfinished.append(job)
            done.set()

        # Not is_running(): a loop whose thread is still starting its pool runs these
        # as soon as it starts (skipped, it ran for ever and close waited its whole timeout).
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(cancel_all)
                done.wait(timeout)
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=None if deadline is None
                              else max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._default_pool.shutdown(wait=False, cancel_futures=True)
        # Idle threads end at once; a stuck sync feedback is not waited for past the
        # deadline (its thread is a daemon).
        left = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        self._pool.join(left)
        self._default_pool.join(min(0.1, left))
        return unfinished

    # ------------------------------------------------------------------ on the loop
    def _start(self, jobs: list[Job]) -> None:
        for job in jobs:
            task = self._loop.create_task(self._evaluate(job))
            task.scrutiny_job = job  # type: ignore[attr-defined]
            self._tasks.add(task)  # (it leaves the set itself: no done-callback to schedule)

    async def _evaluate(self, job: Job) -> None:
        assert self._evaluator is not None
        task = asyncio.current_task()
        try:
            final = await self._evaluator.evaluate(
                job.feedback, job.evaluate_on or job.record, job.pending,
                lambda started: self._on_running(job, started))
        except BaseException as exc:  # a bug of ours: still a failed result, never a lost one
            if ended_by_us(exc, task):
                raise
            logger.exception("scrutiny: evaluating %r failed unexpectedly", job.feedback.name)
            final = FeedbackResult(
                record_id=job.pending.record_id, feedback_name=job.pending.feedback_name,
                status=FeedbackStatus.FAILED, error=f"internal error: {describe_error(exc)}",
                result_id=job.pending.result_id, feedback_id=job.pending.feedback_id,
                created_at=job.pending.created_at)
        finally:
            self._tasks.discard(task)
        self._on_final(job, final)
