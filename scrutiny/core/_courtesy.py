"""Handing the interpreter lock to the evaluation threads when they are overdue.

CPython lets a thread that waits for the GIL take it from a busy thread only after a switch
interval (5 ms by default). While the application's thread runs Python code without pause,
every timer of the evaluation loop (an async feedback's `await` ending) and every sync
feedback coming back from its blocking call waits up to that long, so each 50 ms
evaluation took 55-65 ms: a tenth or more of the session's concurrency lost exactly while
the app is busiest.

The recorders' callbacks run on the application's thread anyway; on each one they call
:func:`offer`, which gives the GIL away briefly (``time.sleep(0)``) when

- an evaluation loop is *overdue*: its poll for I/O was due to end (its next timer, or the
  moment a record handed over to an idle loop woke it) and it has not come back to poll
  again, so it is waiting for the GIL; or
- sync feedbacks are *blocked* in their calls (not merely queued): each may want the GIL
  back at any moment, and nothing tells us when, so the offer is made at most every
  SYNC_EVERY seconds while any is.

The app comes first: what the offers cost its thread (the sleep, and waiting to get the GIL
back) is measured and held to BUDGET of its time, so evaluations can slow the app's calls
by about that much at most, however many are in flight. Nothing is offered while the loop
is idle or quick feedbacks come and go, so an app whose feedbacks are cheap pays one clock
read per callback. ``time.sleep(0)`` and not ``os.sched_yield()``: the latter gives the GIL
back before a waiting thread can take it, and resets that thread's wait, which starves it.
"""

from __future__ import annotations

import threading
import time

__all__ = ["Courtesy", "offer"]

SYNC_EVERY = 0.001
"""While sync feedbacks are blocked in their calls: offer the GIL this often."""
BUDGET = 0.04
"""The share of the application's time the offers may cost it."""
BURST = 0.004
"""The most offer time saved up while none was needed (seconds)."""

_INF = float("inf")
_monotonic = time.monotonic
_sleep = time.sleep


class Courtesy:
    """What one evaluation loop tells the application's thread (written by the loop and the
    pool threads, read by :func:`offer`), and what the offers have cost."""

    __slots__ = ("allowance", "blocked", "due", "last_offer", "refilled")

    def __init__(self) -> None:
        self.due = _INF
        """When the loop's current poll for I/O ends (monotonic); inf while it polls without
        a timer or runs."""
        self.blocked: set[int] = set()
        """The pool threads inside a sync feedback call (thread idents)."""
        self.last_offer = 0.0
        self.allowance = BURST
        """Seconds the offers may still cost; grows by BUDGET per second, up to BURST."""
        self.refilled = _monotonic()


_live: tuple[Courtesy, ...] = ()  # replaced, never changed in place: read without a lock
_live_lock = threading.Lock()


def register(courtesy: Courtesy) -> None:
    global _live
    with _live_lock:
        _live = (*_live, courtesy)


def unregister(courtesy: Courtesy) -> None:
    global _live
    courtesy.due = _INF
    courtesy.blocked.clear()
    with _live_lock:
        _live = tuple(c for c in _live if c is not courtesy)


def offer(*, budgeted: bool = True) -> None:
    """Give the GIL to an overdue evaluation thread, if any: on the application's thread
    within its budget; on a thread of Scrutiny's own (`budgeted=False`) whenever needed."""
    for courtesy in _live:
        now = _monotonic()
        if now < courtesy.due and not (courtesy.blocked
                                       and now - courtesy.last_offer >= SYNC_EVERY):
            continue
        if not budgeted:
            courtesy.last_offer = now
            _sleep(0)
            return
        allowance = min(BURST, courtesy.allowance + (now - courtesy.refilled) * BUDGET)
        courtesy.refilled = now
        if allowance <= 0:
            courtesy.allowance = allowance
            return
        courtesy.last_offer = now
        _sleep(0)
        courtesy.allowance = allowance - (_monotonic() - now)
        return
