"""Evaluating one feedback on one record: selection, calls, timeouts, retries, the verdict.

Everything that can go wrong ends as a `failed` (or `skipped`) :class:`FeedbackResult` with a
readable reason; nothing here raises to its caller except cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import email.utils
import itertools
import logging
import math
import random
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from scrutiny.core._context import _cost, _held_limits, _suppressed, add_evaluation_cost
from scrutiny.core._errors import (
    FeedbackTimeout,
    InvalidFeedbackValue,
    SkipFeedback,
    describe_error,
)
from scrutiny.core._feedback import Feedback, coerce_feedback_value, mean_of
from scrutiny.core._mask import Mask, mask_result, mask_text, set_current_mask
from scrutiny.core._pool import DaemonThreadPool, RaisedInCall, futurable
from scrutiny.core._results import FeedbackCall, FeedbackResult, FeedbackStatus
from scrutiny.core._select import EmptySelection
from scrutiny.core._slots import SlotGate, SyncCall

if TYPE_CHECKING:
    from scrutiny.core._records import Record

__all__ = ["CLOSING", "Evaluator", "cancel_task", "cancelled_by_us", "describe_error",
           "ended_by_us", "retry_after_hint", "retry_after_seconds"]

logger = logging.getLogger("scrutiny")

Limiter = Callable[[], AbstractAsyncContextManager[Any]]


def retry_after_seconds(value: Any) -> float | None:
    """A Retry-After value in seconds: a number of seconds, or an HTTP date (RFC 9110
    allows both; a date already past is 0)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            when = email.utils.parsedate_to_datetime(str(value))
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_after_hint(exc: BaseException) -> float | None:
    """Seconds a server asked us to wait, if `exc` (or an exception it was raised from)
    carries the hint: a ``retry_after`` attribute, or a ``retry-after-ms`` / ``Retry-After``
    header on its ``response``."""
    current: BaseException | None = exc
    seen: list[BaseException] = []
    while current is not None and current not in seen and len(seen) < 5:
        seen.append(current)
        for attr in ("retry_after", "retry_after_seconds"):
            value = getattr(current, attr, None)
            # (seconds, as a number or text, or an HTTP date: a date or "3" was ignored)
            if value is not None and not isinstance(value, bool) and (
                    seconds := retry_after_seconds(value)) is not None:
                return seconds
        headers = getattr(getattr(current, "response", None), "headers", None)
        if headers is not None:
            try:
                millis = headers.get("retry-after-ms")
                if millis is not None:
                    return float(millis) / 1000.0
                seconds = retry_after_seconds(
                    headers.get("retry-after") or headers.get("Retry-After"))
                if seconds is not None:
                    return seconds
            except (TypeError, ValueError, AttributeError):
                pass
        current = current.__cause__ or current.__context__
    return None


_LOGGED_REASON = 1000
"""Characters of a failure's reason that go into the log line."""
_WARNED_REASON = 160
"""Characters of its first line that a feedback's first-failure WARNING shows."""
_HELD = 0.05
"""A timeout firing this much later than due means the loop was held, not that the awaited
work was slow."""


def cancel_task(task: asyncio.Future[Any]) -> None:
    """Cancel an evaluation's task on Scrutiny's behalf (its timeout, or close()), so that
    a CancelledError the feedback raises on its own can be told apart (see
    :func:`cancelled_by_us`)."""
    task.scrutiny_cancelled = True  # type: ignore[attr-defined]
    task.cancel()


CLOSING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "scrutiny_closing_evaluations", default=False)
"""Set while the evaluation loop closes the coroutines of evaluations that would not end
(see EvaluationLoop._unwind): the GeneratorExit they get then is ours, not a feedback's."""


def ended_by_us(exc: BaseException, task: asyncio.Task[Any] | None = None) -> bool:
    """Whether `exc`, reaching an evaluation, is its end by Scrutiny (its cancellation, or
    its coroutine closed: with the loop, or by the garbage collector) rather than an error
    of the feedback's own: a feedback that raised GeneratorExit itself was taken for its
    coroutine being closed, and its evaluation stayed `running` for ever."""
    if isinstance(exc, GeneratorExit):
        # Closing a coroutine raises it afresh at each frame's await (PEP 380): a
        # traceback of that frame alone. One raised in the feedback comes up through it.
        tb = exc.__traceback__
        return CLOSING.get() or tb is None or tb.tb_next is None
    return isinstance(exc, asyncio.CancelledError) and cancelled_by_us(
        task or asyncio.current_task())  # (a CancelledError arrives on the loop)


def cancelled_by_us(task: asyncio.Task[Any] | None) -> bool:
    """Whether the CancelledError reaching an evaluation is a cancellation of it (its
    timeout, the session closing) rather than one the feedback let escape (a client
    awaiting a future someone else cancelled): that one is the feedback's failure; taken
    for ours, the evaluation ended without a verdict and stayed `running` for ever."""
    if task is None:
        return True
    if sys.version_info >= (3, 11) and task.cancelling() > 0:
        return True
    return bool(getattr(task, "scrutiny_cancelled", False))


class _Deadline:
    """Cancels `task` once `timeout` seconds have passed (one timer and a flag: what
    asyncio.timeout() does, without its state machine, which cost more than the rest of a
    quick evaluation). A class, not a closure: rescheduling itself, a closure would refer to
    itself — a reference cycle per evaluation, for the garbage collector."""

    __slots__ = ("due", "expired", "handle", "loop", "rechecked", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
                 timeout: float) -> None:
        self.loop, self.task = loop, task
        self.due = loop.time() + timeout
        self.expired = self.rechecked = False
        self.handle: asyncio.Handle = loop.call_later(timeout, self._fire)

    def _fire(self) -> None:
        if not self.rechecked and self.loop.time() - self.due > _HELD:
            # The loop was held (a blocking call in some other feedback): what ended
            # meanwhile is queued to resume right now — let it run first, rather than fail
            # a feedback whose work was done on time.
            self.rechecked = True
            self.handle = self.loop.call_soon(self._fire)
            return
        self.expired = True
        self.task.cancel()  # (told apart by `expired`: not cancel_task)

    def cancel(self) -> None:
        self.handle.cancel()


async def _within(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    """Await with a deadline, without wrapping a coroutine in a task of its own.

    Raises:
        FeedbackTimeout: the deadline passed (a TimeoutError the function raised itself
            stays what it is).
    """
    if timeout is None:
        return await awaitable
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    deadline = _Deadline(loop, task, timeout)
    selector = getattr(loop, "scrutiny_selector", None)
    passes = getattr(selector, "passes", None)
    try:
        value = await awaitable
        if deadline.expired:  # it caught the cancellation sent at its timeout, and returned
            if sys.version_info >= (3, 11):
                task.uncancel()  # (that cancellation was ours, and it is over)
            raise FeedbackTimeout(
                f"timed out after {timeout:g} s: it caught the cancellation sent then and "
                f"returned {loop.time() - deadline.due:.2f} s later (let "
                "asyncio.CancelledError propagate, after any cleanup)", timeout=timeout)
        if selector is not None and passes is not None and selector.passes == passes:
            # It never gave the loop back, so its timer could not fire: all the time
            # since it began was its own (a blocking call in an async feedback).
            took = loop.time() - deadline.due + timeout
            if took > timeout:
                raise FeedbackTimeout(
                    f"timed out after {timeout:g} s: it ran {took:.2f} s without once "
                    "giving the event loop back (a blocking call in an async "
                    "feedback; make it a plain def, or await asyncio.to_thread(...))",
                    timeout=timeout)
        return value
    except asyncio.CancelledError:
        # (Python 3.10 counts no cancellations: there the deadline's is taken for the one.
        # Not asyncio.wait_for there: it runs the feedback in a task of its own, and a
        # KeyboardInterrupt or SystemExit a feedback raised in it stopped the whole loop.)
        if deadline.expired and (sys.version_info < (3, 11) or task.uncancel() == 0):
            raise FeedbackTimeout(f"timed out after {timeout:g} s", timeout=timeout) from None
        raise
    finally:
        deadline.cancel()  # drops its handle's reference to it: no cycle is left


_call_ids = itertools.count(1)


EXECUTOR_QUEUE_ALLOWANCE = 300.0
"""On an external executor a feedback's timeout is kept where the call runs, from the
moment it starts; here, where the queue before it is out of sight, the wait for it gives up
this many seconds later still (a cluster with no workers, a call lost with its worker)."""


class _WithCost(NamedTuple):
    """A call's value coming back from an external executor with the cost its evaluator
    reported there (`add_evaluation_cost`): the bucket it adds to is a context variable of
    the evaluation, which does not travel to another thread or process."""

    value: Any
    cost: dict[str, Any]


_COST_ATTRIBUTE = "scrutiny_evaluation_cost"
"""The attribute under which an exception raised on an external executor carries the cost
reported before it (a judge's reply that could not be read was paid for all the same)."""


def _call_anywhere(fn: Callable[..., Any], is_async: bool, args: dict[str, Any],
                   call_id: int = 0, positional: tuple[Any, ...] = (),
                   timeout: float | None = None) -> Any:
    """Run a feedback call in another process or thread (an external executor), within
    `timeout` seconds of its start there; the cost it reported comes back with its value
    (a `_WithCost`) or its exception (see `_COST_ATTRIBUTE`).

    `call_id` makes each call's arguments unique: Dask names a task by hashing them
    (``pure=True`` by default), so two identical calls shared one task — and a timeout
    that cancelled it left the other waiting for good.

    The timeout counts where the call runs: counted from the hand-over to the executor,
    calls queued on a cluster with fewer threads than `max_concurrency` timed out before
    they started. A plain function with a timeout runs on a thread of its own, which is left
    to finish on its own when the time is up (as on the session's own pool).
    """
    cost: dict[str, Any] = {}
    # (set for this call and reset after it: an executor's thread runs other work next)
    suppressed, bucket = _suppressed.set(True), _cost.set(cost)
    try:
        value = _call_here(fn, is_async, args, positional, timeout)
    except BaseException as exc:
        if cost:
            with suppress(Exception):  # (one that takes no attributes: the cost is lost)
                setattr(exc, _COST_ATTRIBUTE, dict(cost))
        raise
    finally:
        _cost.reset(bucket)
        _suppressed.reset(suppressed)
    return _WithCost(value, dict(cost)) if cost else value


def _call_here(fn: Callable[..., Any], is_async: bool, args: dict[str, Any],
               positional: tuple[Any, ...], timeout: float | None) -> Any:
    """`_call_anywhere`'s call, where it runs."""
    if is_async:
        if timeout is None:
            return asyncio.run(fn(*positional, **args))
        return asyncio.run(_bounded(fn(*positional, **args), timeout))
    if timeout is None:
        try:
            return fn(*positional, **args)
        except (StopIteration, GeneratorExit) as exc:  # (it comes back through a future)
            raise futurable(exc) from None
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((fn(*positional, **args), None))
        except BaseException as exc:
            outcome.append((None, exc))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True,
                              name="scrutiny-executor-call")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise FeedbackTimeout(f"timed out after {timeout:g} s", timeout=timeout)
    value, error = outcome[0]
    if error is not None:
        raise futurable(error)
    return value


async def _came_back(future: asyncio.Future[Any]) -> Any:
    """The value of a call made on an external executor, its cost (reported where it ran)
    added to this evaluation's."""
    try:
        value = await future
    except BaseException as exc:
        reported = getattr(exc, _COST_ATTRIBUTE, None)
        if isinstance(reported, dict):
            add_evaluation_cost(**reported)
        raise
    if isinstance(value, _WithCost):
        add_evaluation_cost(**value.cost)
        return value.value
    return value


async def _bounded(coro: Awaitable[Any], timeout: float) -> Any:
    """`coro` within `timeout` seconds (a TimeoutError it raises itself stays what it is)."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise FeedbackTimeout(f"timed out after {timeout:g} s", timeout=timeout)
    return task.result()


class _RunDeadline:
    """Cancels `task` once `call` has held its slot `limit` seconds (normally: run that
    long on its thread; a call that got a slot but no thread, because every pool thread is
    stuck in a call that never returned, also ends). The time it waited for a slot does not
    count, nor the time it waited for a thread while the pool's threads kept starting calls
    (a pool smaller than the concurrency limit queues calls: they failed as timeouts,
    said to be stuck, although every call returned). (A class, not a closure that
    reschedules itself: such a closure refers to itself, a reference cycle that kept each
    evaluation's objects alive until the garbage collector's next full pass.)"""

    __slots__ = ("call", "expired", "handle", "limit", "loop", "pool", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
                 call: SyncCall, limit: float, pool: DaemonThreadPool) -> None:
        self.loop, self.task, self.call, self.limit = loop, task, call, limit
        self.pool = pool
        self.expired = False
        self.handle = loop.call_later(limit, self._check)

    def _check(self) -> None:
        now = self.loop.time()  # the monotonic clock, as `call.started`
        since = self.call.started
        if since is None and self.call.granted_at is not None:
            since = max(self.call.granted_at, self.pool.last_start)
        if since is not None and now - since >= self.limit:
            self.expired = True
            self.task.cancel()
            return
        wait = self.limit if since is None else since + self.limit - now
        self.handle = self.loop.call_later(wait, self._check)

    def reason(self) -> str:
        if self.call.started is None:
            return (f"timed out after {self.limit:g} s waiting for a thread: no call started "
                    "on the sync pool meanwhile, every thread is busy with a call that has "
                    "not returned (see thread_pool_size)")
        return f"timed out after {self.limit:g} s"

    def cancel(self) -> None:
        self.handle.cancel()  # drops its reference to _check: no cycle is left


@dataclasses.dataclass(slots=True)
class _CallOutcome:
    call: FeedbackCall
    status: FeedbackStatus
    attempts: int


class Evaluator:
    """Runs feedbacks on the session's event loop.

    Args:
        loop: the event loop it runs on (create it on that loop's thread).
        pool: the thread pool for plain (sync) feedback functions.
        max_concurrency: the most feedback calls running at once in this session.
        default_timeout: seconds one attempt may take when the feedback sets none.
        limiter_for: returns the shared rate limiter of a feedback (or None).
        executor: when given, every call (sync or async) runs there, e.g. on a Dask
            cluster; the function and its arguments must be picklable.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        pool: DaemonThreadPool,
        max_concurrency: int,
        default_timeout: float | None,
        limiter_for: Callable[[Feedback], Limiter | None],
        executor: concurrent.futures.Executor | None = None,
        mask: Mask | None = None,
    ) -> None:
        self._mask = mask
        self._pool = pool
        self._executor = executor
        pool.bind(loop)
        self._gate = SlotGate(max_concurrency, loop, pool)
        self._default_timeout = default_timeout
        self._limiter_for = limiter_for
        self._warned: set[str] = set()
        self.sync_in_flight = 0
        """Calls of plain functions handed to the pool and not yet come back (on the loop):
        while there are any, the loop collects their results before each poll."""

    async def evaluate(
        self,
        feedback: Feedback,
        record: Record,
        pending: FeedbackResult,
        on_started: Callable[[datetime], None],
    ) -> FeedbackResult:
        """The end state of `feedback` on `record` (done, failed or skipped).

        `on_started(started_at)` is called once, when the first call of this evaluation
        has its concurrency slot (and rate-limit permit): time spent queued behind other
        evaluations is neither `running` nor part of the evaluation's timing.
        """
        # This runs in its evaluation's own task, so its own context: set, never reset.
        _suppressed.set(True)  # the evaluator's own framework calls are not recorded
        if self._mask is None:
            return await self._evaluate(feedback, record, pending, on_started)
        # (a feedback's own texts — a ground-truth set's answers — are masked with it too)
        set_current_mask(self._mask)
        return mask_result(await self._evaluate(feedback, record, pending, on_started),
                           self._mask)

    async def _evaluate(self, feedback: Feedback, record: Record, pending: FeedbackResult,
                        on_started: Callable[[datetime], None]) -> FeedbackResult:
        cost: dict[str, float] = {}
        _cost.set(cost)  # what add_evaluation_cost() reports during this evaluation
        try:
            calls = feedback.calls_for(record)
        except EmptySelection as exc:
            return self._end(pending, FeedbackStatus.SKIPPED, error=str(exc))
        except Exception as exc:
            return self._end(pending, FeedbackStatus.FAILED,
                             error=f"selecting the arguments failed: {describe_error(exc)}")
        started: list[datetime] = []

        def begin(at: datetime | None = None) -> None:
            if not started:
                started.append(at or datetime.now(timezone.utc))
                on_started(started[0])

        if len(calls) == 1:  # the common case: no extra task for a gather
            outcomes = [await self._call(feedback, calls[0], begin)]
        else:
            outcomes = list(await asyncio.gather(
                *(self._call(feedback, args, begin) for args in calls)))
        start = started[0] if started else datetime.now(timezone.utc)
        return self._verdict(feedback, pending, start, outcomes, dict(cost) or None)

    # ------------------------------------------------------------------ one call
    async def _call(self, feedback: Feedback, args: dict[str, Any],
                    begin: Callable[[datetime | None], None]) -> _CallOutcome:
        policy = feedback.retry
        per_attempt = feedback.timeout if feedback.timeout is not None \
            else self._default_timeout
        limiter = self._limiter_for(feedback)
        # (the group whose permit the call holds: an evaluator limiting itself when called
        # directly, such as an LLMJudge, does not take a second one — see rate_limit_held)
        group = (feedback.rate_limit.group or feedback.name) \
            if limiter and feedback.rate_limit else None
        loop = asyncio.get_running_loop()
        first: list[float] = []  # when the first attempt got its slot (loop time)

        def began(at: datetime | None = None) -> None:
            if not first:
                first.append(loop.time())
            begin(at)

        attempt = 0
        while True:
            attempt += 1
            timeout = per_attempt
            if policy.deadline is not None:  # what is left of it bounds this attempt
                left = max(0.001, policy.deadline - (loop.time() - first[0] if first else 0.0))
                timeout = left if timeout is None else min(timeout, left)
            try:
                async with limiter() if limiter else nullcontext():
                    held = _held_limits.set(_held_limits.get() | {group}) if group else None
                    try:
                        if feedback.is_async or self._executor is not None:
                            async with self._gate:
                                began(None)
                                value = await self._attempt(feedback, args, timeout)
                        else:
                            value = await self._run_sync(feedback, args, timeout, began)
                    finally:
                        if held is not None:
                            _held_limits.reset(held)
                score, explanation, metadata = coerce_feedback_value(value)
                call = FeedbackCall(args=args, score=score, explanation=explanation,
                                    metadata=metadata)
                return _CallOutcome(call, FeedbackStatus.DONE, attempt)
            except SkipFeedback as exc:
                return _CallOutcome(FeedbackCall(args=args, error=exc.reason),
                                    FeedbackStatus.SKIPPED, attempt)
            except BaseException as exc:  # (SystemExit from a feedback: its failure too)
                if ended_by_us(exc):
                    raise
                if isinstance(exc, RaisedInCall):  # (the feedback's own StopIteration, ...)
                    exc = exc.original
                elif isinstance(exc, RuntimeError) and isinstance(
                        exc.__cause__, StopIteration) and "raised StopIteration" in str(exc):
                    exc = exc.__cause__  # (Python's wrapping of an async one's StopIteration)
                retryable = isinstance(exc, policy.retry_on) and not isinstance(
                    exc, policy.never_retry_on)
                hint = retry_after_hint(exc) if retryable else None
                cap = policy.max_retry_after
                if hint is not None and cap is not None and hint > cap:
                    retryable = False  # the server asks for longer than the policy waits
                    too_long = (f" (the provider asked to wait {hint:g} s before retrying, "
                                f"longer than max_retry_after={cap:g} s: raise "
                                f"max_retry_after to wait that long)")
                else:
                    too_long = ""
                if hint is not None and limiter is not None:
                    pause = getattr(limiter, "pause", None)
                    if pause is not None:  # the whole rate-limit group waits, not this call
                        pause(hint)
                past_deadline = ""
                if retryable and attempt < policy.attempts:
                    # (the exponent capped: 2 ** 1024 is past a float's range)
                    delay = min(policy.max_backoff,
                                policy.initial_backoff * 2 ** min(attempt - 1, 64))
                    delay = delay * (0.5 + random.random() / 2)  # noqa: S311 - jitter
                    if hint is not None:
                        delay = max(delay, hint)
                    if policy.deadline is not None and first and (
                            loop.time() - first[0] + delay >= policy.deadline):
                        retryable = False
                        left = max(0.0, policy.deadline - (loop.time() - first[0]))
                        if hint is not None and hint >= delay:
                            past_deadline = (
                                f" (the provider asked to wait {hint:g} s before retrying, "
                                f"more than the {left:.3g} s left of the deadline of "
                                f"{policy.deadline:g} s for all attempts: raise the deadline "
                                f"to wait that long)")
                        else:
                            past_deadline = (f" (no more attempts: the deadline of "
                                             f"{policy.deadline:g} s for all of them has "
                                             f"passed)")
                if retryable and attempt < policy.attempts:
                    logger.debug("feedback %r attempt %d failed (%s); retrying in %.2fs",
                                 feedback.name, attempt, describe_error(exc), delay)
                    await asyncio.sleep(delay)
                    continue
                reason = describe_error(exc) + too_long + past_deadline
                if isinstance(exc, asyncio.CancelledError):
                    reason += (" (raised by the feedback itself: the evaluation was not "
                               "cancelled)")
                if isinstance(exc, InvalidFeedbackValue):
                    metadata = {"raw_value": repr(exc.value)[:2000]}
                else:
                    metadata = {}
                if attempt > 1:
                    reason += f" (after {attempt} attempts)"
                self._log_failure(feedback, reason)
                return _CallOutcome(FeedbackCall(args=args, error=reason, metadata=metadata),
                                    FeedbackStatus.FAILED, attempt)

    async def _attempt(self, feedback: Feedback, args: dict[str, Any],
                       timeout: float | None) -> Any:
        """One async call (or one call on the external executor), holding a slot."""
        awaitable: Awaitable[Any]
        positional, named = feedback.call_args(args)
        if self._executor is not None:
            future = asyncio.wrap_future(
                self._executor.submit(_call_anywhere, feedback.fn, feedback.is_async, named,
                                      next(_call_ids), tuple(positional), timeout))
            if timeout is None:
                return await _came_back(future)
            try:
                done, _ = await asyncio.wait({future},
                                             timeout=timeout + EXECUTOR_QUEUE_ALLOWANCE)
            except asyncio.CancelledError:
                future.cancel()
                raise
            if done:
                return await _came_back(future)  # (a timeout where it ran is raised here)
            future.cancel()
            raise FeedbackTimeout(
                f"timed out: the executor had not run the call {timeout:g} s long "
                f"{timeout + EXECUTOR_QUEUE_ALLOWANCE:g} s after it was handed over (its "
                "queue is out of Scrutiny's sight: a cluster without workers, or with far "
                "fewer threads than max_concurrency)", timeout=timeout)
        awaitable = feedback.fn(*positional, **named)
        value = await _within(awaitable, timeout)
        if isinstance(value, Coroutine):  # a sync wrapper that returned a coroutine (not a
            # generator, which asyncio.iscoroutine also takes before 3.12: its value fails)
            value = await _within(value, timeout)
        return value

    async def _run_sync(self, feedback: Feedback, args: dict[str, Any],
                        timeout: float | None,
                        begin: Callable[[datetime | None], None]) -> Any:
        """One call of a plain function on the pool, once it has a slot.

        The timeout counts from the moment the call starts on its thread, not from when it
        was queued for a slot.
        """
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        fn = feedback.fn
        positional, named = feedback.call_args(args)
        call = SyncCall(lambda: ctx.run(fn, *positional, **named), loop.create_future(), begin)
        self.sync_in_flight += 1
        try:
            self._gate.start_sync(call)
        except BaseException:
            self.sync_in_flight -= 1
            raise
        task = asyncio.current_task()
        assert task is not None
        deadline = None if timeout is None else _RunDeadline(loop, task, call, timeout,
                                                             self._pool)
        try:
            value = await call.future
        except asyncio.CancelledError:
            self._gate.abandon(call)
            if deadline is not None and deadline.expired and (
                    sys.version_info < (3, 11) or task.uncancel() == 0):
                if call.started is not None:  # its thread is still inside it
                    self._pool.lost(call)
                raise FeedbackTimeout(deadline.reason(), timeout=deadline.limit) from None
            raise
        finally:
            self.sync_in_flight -= 1
            if deadline is not None:
                deadline.cancel()
        if isinstance(value, Coroutine):  # a sync wrapper that returned a coroutine (not a
            # generator, which asyncio.iscoroutine also takes before 3.12: its value fails)
            async with self._gate:
                value = await _within(value, timeout)
        return value

    # ------------------------------------------------------------------ the verdict
    def _verdict(self, feedback: Feedback, pending: FeedbackResult, started: datetime,
                 outcomes: list[_CallOutcome], cost: dict[str, Any] | None) -> FeedbackResult:
        calls = [o.call for o in outcomes]
        attempts = max((o.attempts for o in outcomes), default=1)
        failed = [o for o in outcomes if o.status is FeedbackStatus.FAILED]
        done = [o for o in outcomes if o.status is FeedbackStatus.DONE]

        def end(status: FeedbackStatus, **values: Any) -> FeedbackResult:
            return pending.evolve(status=status, started_at=started,
                ended_at=datetime.now(timezone.utc), calls=calls, attempts=attempts,
                cost=cost, **values)

        if failed:
            error = failed[0].call.error or "failed"
            if len(outcomes) > 1:
                error = f"{len(failed)} of {len(outcomes)} calls failed; first: {error}"
            return end(FeedbackStatus.FAILED, error=error)
        if not done:
            reasons = sorted({o.call.error or "skipped" for o in outcomes})
            return end(FeedbackStatus.SKIPPED, error="; ".join(reasons))
        scores = [o.call.score for o in done if o.call.score is not None]
        try:
            # (an aggregate of one context is still the aggregate: a share of relevant
            # contexts is 1.0 for one 0.7, not 0.7; the mean of one score is that score)
            score = float(feedback.aggregator(scores)) if (
                len(scores) > 1 or feedback.aggregator is not mean_of) else scores[0]
        except Exception as exc:
            return end(FeedbackStatus.FAILED, error=f"aggregating {len(scores)} scores "
                                                    f"failed: {describe_error(exc)}")
        if not math.isfinite(score):
            return end(FeedbackStatus.FAILED, error=f"the aggregate score is {score}")
        if len(outcomes) == 1:
            explanation = outcomes[0].call.explanation or None
        else:  # numbered by call (context) from 1, each with its score; skipped ones say why
            explanation = "\n".join(
                f"[{i}] {_score_text(o.call.score)}: {o.call.explanation}"
                if o.status is FeedbackStatus.DONE
                else f"[{i}] skipped: {o.call.error or 'no reason given'}"
                for i, o in enumerate(outcomes, 1)
                if o.status is not FeedbackStatus.DONE or o.call.explanation) or None
        return end(FeedbackStatus.DONE, result=score, explanation=explanation)

    @staticmethod
    def _end(pending: FeedbackResult, status: FeedbackStatus, *,
             error: str) -> FeedbackResult:
        """An end state reached before any call was made."""
        now = datetime.now(timezone.utc)
        return pending.evolve(status=status, error=error, started_at=now, ended_at=now)

    def _log_failure(self, feedback: Feedback, reason: str) -> None:
        if len(reason) > _LOGGED_REASON:  # (a 5 MB error message filled the log line)
            reason = f"{reason[:_LOGGED_REASON]}... ({len(reason)} characters; the stored " \
                     "result has more)"
        reason = mask_text(reason, self._mask) or ""  # (logged as it is stored: masked)
        if feedback.name in self._warned:
            logger.debug("feedback %r failed: %s", feedback.name, reason)
            return
        self._warned.add(feedback.name)
        # At WARNING, the reason's first line, cut short: the rest of a reason is often
        # what was judged — a judge's answer quoting the user, a returned text — and logs
        # go where the evaluation database's access rules do not.
        first = reason.split("\n", 1)[0]
        shown = first if len(first) <= _WARNED_REASON and first == reason else \
            f"{first[:_WARNED_REASON]}..."
        logger.warning("feedback %r failed: %s (the whole reason is stored on the result: "
                       "get_records_and_feedback(reasons=True), `scrutiny records --reasons`; "
                       "further failures of it are logged at DEBUG)", feedback.name, shown)


def _score_text(score: float | None) -> str:
    """A call's score in a fanned-out result's explanation (0.8, not 0.7999999999999999)."""
    return "no score" if score is None else f"{score:.4g}"
