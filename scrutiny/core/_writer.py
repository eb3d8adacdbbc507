"""The storage writer: one daemon thread owns the write queue and commits in batches.

Producers (the application's thread, the evaluation loop) only append to a bounded deque;
they never wait for the database and never raise. After each commit the writer runs the
batch's `after_commit` hooks, which resolve futures and hand callbacks on — so a result is
always stored before anyone is told about it.

Waking a sleeping thread costs its waker a system call (about 7 us here, a tenth of what
recording a call costs the app). So while work keeps coming the writer does not sleep
until woken: it looks at its queue every POLL seconds by itself, and producers append
without waking it. Only after IDLE_AFTER seconds without work does it sleep until the next
producer wakes it.

A batch the database refuses is held while the reason passes (an outage, a lock): only one
it keeps refusing past TRANSIENT_HOLD_MAX seconds while it answers is split, so that one
poisoned item does not hold every later one behind it (see `StorageWriter._commit`).

The periodic task (the session's lease renewal) runs every `idle_interval` whatever the
writer is doing: between two batches while work keeps coming, and between two attempts at a
batch the database refuses for a passing reason. Run only when the queue was empty, it
never ran under steady traffic, nor while a batch was held for up to TRANSIENT_HOLD_MAX
seconds: the leases ran out and workers took over results still being evaluated here.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from scrutiny.core._courtesy import offer
from scrutiny.core.storage import InsertRecord, Store, UpdateResult, WriteOp

__all__ = ["StorageWriter", "WriteItem"]

logger = logging.getLogger("scrutiny")

POLL = 0.002
IDLE_AFTER = 0.05
OUTAGE_BACKOFF = 0.25
OUTAGE_BACKOFF_MAX = 5.0
TRANSIENT_HOLD_MAX = 60.0
"""Seconds a batch is held and retried while the database answers but refuses it for a
passing reason (the store's `transient(exc)`). Past them its items are tried one by one and
those still refused are given up: a write that always times out (one row locked for good, a
statement one item always takes too long for) held every later record and result behind it
until the session closed. A lock held for some seconds (a migration, VACUUM FULL) loses
nothing; an unreachable database is waited for without this bound."""
BATCH_PREPARE_MAX = 0.25
"""Seconds a batch's items may take to prepare (their rows built: a record with a span
tree of megabytes takes tens of milliseconds) before the rest waits for the next batch.
A batch of 500 such records was one transaction of many seconds: waiters on its first
record waited for its last, and a close() or exit that ran out meanwhile lost all of it."""
GIVE_UP_IN_A_ROW = 3
"""Trying a stuck batch's items one by one: once this many in a row are refused too (a
whole table locked rather than one row), the rest is held again as a batch instead of
each paying its timeout."""


class _Outcome(enum.Enum):
    """What became of a commit."""

    STORED = "stored"
    REFUSED = "refused"  # the database answers and refuses these operations
    STUCK = "stuck"  # refused for a passing reason, past the patience given
    ABANDONED = "abandoned"  # unreachable (or refusing) while the session closes


@dataclass(slots=True)
class WriteItem:
    """Work for the writer: `prepare()` builds the operations on the writer thread (so the
    application never pays for serialization); `after_commit(stored)` runs once they are
    committed (stored=True) or finally given up (stored=False)."""

    prepare: Callable[[], Sequence[WriteOp]]
    after_commit: Callable[[bool], None] | None = None


class StorageWriter:
    """Owns one bounded queue of :class:`WriteItem` and the thread that drains it."""

    def __init__(self, store: Store, *, max_queue: int, max_batch: int = 500,
                 name: str = "scrutiny-writer", idle_interval: float | None = None,
                 on_idle: Callable[[], Sequence[WriteOp]] | None = None) -> None:
        self._store = store
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._queue: collections.deque[WriteItem] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.RLock()  # the condition's: C-level `with` in submit()
        self._cond = threading.Condition(self._lock)
        self._submitted = 0
        self._finished = 0
        self._stopping = False
        self.dropped = 0
        self.failed = 0
        self._idle_interval = idle_interval
        self._on_idle = on_idle
        self._last_idle = time.monotonic()
        self._in_idle = False  # running the periodic task (its own commit does not nest it)
        self._polling = False  # the writer looks at its queue by itself: no need to wake it
        self._outage = threading.Event()  # set by close(): stop waiting out an outage
        self._last_error: Exception | None = None  # why the last commit got STUCK
        self._refusal = ("", 0)  # the last refusal's text, and how often in a row
        self._busy_since = 0.0  # when the last STUCK commit's ops were first refused
        # One policy object for every commit (on the writer thread only): a new one per
        # commit left a reference cycle of some 14 objects for the garbage collector.
        self._retrying = Retrying(
            retry=retry_if_exception_type(OperationalError),
            stop=stop_after_attempt(5),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            sleep=self._pause,  # close() cuts the waits short (the attempts still run)
            reraise=True,
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producers
    def submit(self, item: WriteItem) -> bool:
        """Queue `item`; False (counted and logged) when the queue is full or closed."""
        if self._stopping or len(self._queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                if self._stopping:
                    logger.error(
                        "scrutiny: the session is closed; %d item(s) given to it since were "
                        "not stored. The application is not affected.", self.dropped)
                else:
                    logger.error(
                        "scrutiny: the storage queue is full (%d); %d item(s) dropped so far "
                        "(the database is too slow or down). The application is not "
                        "affected.", self._max_queue, self.dropped)
            if item.after_commit is not None:
                try:
                    item.after_commit(False)
                except Exception:
                    logger.exception("scrutiny: after-commit hook failed")
            return False
        with self._lock:
            self._submitted += 1
        self._queue.append(item)
        if not self._polling and not self._wake.is_set():
            self._wake.set()
        return True

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything queued before this call is stored (or given up)."""
        if threading.current_thread() is self._thread:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()  # someone waits: do not leave it to the next poll
        with self._cond:
            target = self._submitted
            while self._finished < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if not self._thread.is_alive():
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 0.5))
        return True

    @property
    def backlog(self) -> int:
        """Items given and not yet stored or given up: those queued and the batch being
        written (taken off the queue, up to max_batch of them: a close() that ran out
        while one was written said nothing, and stats() said 0)."""
        return max(0, self._submitted - self._finished)

    def close(self, timeout: float | None) -> bool:
        """Store what is queued (bounded by `timeout`), then stop the thread; idempotent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = self.flush(timeout)
        self._stopping = True
        self._outage.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            # (within the same timeout: a flush that used it all was followed by a join as
            # long again)
            self._thread.join(timeout=1.0 if deadline is None
                              else max(0.05, deadline - time.monotonic()))
        return flushed

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        last_work = time.monotonic()
        while True:
            if time.monotonic() - last_work < IDLE_AFTER:
                self._polling = True
                self._wake.wait(POLL)
            else:
                self._polling = False
                if not self._queue:  # (appended while we decided: no wake-up was sent)
                    self._wake.wait(self._idle_interval)
            self._wake.clear()
            now = time.monotonic()
            self._periodic()
            if self._queue:
                last_work = now
            while self._queue:
                self._periodic()  # (due while work keeps coming, too)
                batch: list[WriteItem] = []
                while self._queue and len(batch) < self._max_batch:
                    batch.append(self._queue.popleft())
                try:
                    self._write_batch(batch)
                except Exception:  # a bug of ours: this batch is lost, not the writer
                    self._abandon(batch)
            if self._stopping and not self._queue:
                return

    def _periodic(self, *, quick_retries: bool = True) -> None:
        """Run the periodic task and store what it returns, when it is due (one attempt:
        the next one comes in idle_interval, and a lease outlives two of them)."""
        if (self._on_idle is None or self._idle_interval is None or self._in_idle
                or time.monotonic() - self._last_idle < self._idle_interval):
            return
        self._last_idle = time.monotonic()
        self._in_idle = True
        # (a STUCK commit says why in these two: those of a batch held meanwhile are kept)
        error, busy_since = self._last_error, self._busy_since
        try:
            try:
                ops = self._on_idle()
            except Exception:
                logger.exception("scrutiny: the writer's periodic task failed")
                return
            if ops and self._commit(list(ops), patience=0.0,
                                    quick_retries=quick_retries) is _Outcome.STUCK:
                logger.warning("scrutiny: the writer's periodic write was refused (%s) and "
                               "is skipped: %s", _reason(self._last_error),
                               _describe(ops))
        finally:
            self._in_idle = False
            self._last_error, self._busy_since = error, busy_since

    def _abandon(self, batch: list[WriteItem]) -> None:
        """After an unexpected error in `_write_batch`: tell whoever waits on the batch's
        items that they were not stored, and count them finished, so the thread goes on
        (it ended, and every later record was silently kept in memory until dropped)."""
        logger.exception("scrutiny: the storage writer failed on a batch of %d item(s); "
                         "they may not be stored. The writer goes on with the next ones",
                         len(batch))
        self.failed += len(batch)
        for item in batch:
            hook, item.after_commit = item.after_commit, None
            if hook is not None:
                try:
                    hook(False)
                except Exception:
                    logger.exception("scrutiny: after-commit hook failed")
        with self._cond:
            self._finished += len(batch)
            self._cond.notify_all()

    def _write_batch(self, batch: list[WriteItem]) -> None:
        ops, prepared, unprepared = self._prepare(batch)
        if len(prepared) + len(unprepared) < len(batch):  # (the rest waits its turn, first)
            self._queue.extendleft(reversed(batch[len(prepared) + len(unprepared):]))
            del batch[len(prepared) + len(unprepared):]
        held = prepared
        while held:
            outcome = self._commit(ops)
            if outcome is _Outcome.STORED:
                self._announce([(item, True) for item, _ in held])
            elif outcome is _Outcome.REFUSED and len(held) > 1:
                # isolate the bad item: write one by one so the others are kept
                for item, item_ops in held:
                    self._announce([(item, self._commit_alone(item_ops))])
            elif outcome is not _Outcome.STUCK:  # (abandoned, or the one item refused)
                self._announce([(item, False) for item, _ in held])
            else:  # maybe one item the database can never take (a row locked for good)
                logger.error(
                    "scrutiny: the database answers but has refused %d operation(s) for "
                    "%.0f s (%s); trying its %d item(s) one by one, to store what can be "
                    "and give up what cannot (queued behind them: %d)", len(ops),
                    time.monotonic() - self._busy_since, _reason(self._last_error), len(held),
                    len(self._queue))
                held = self._isolate(held, self._busy_since)
                ops = [op for _, item_ops in held for op in item_ops]
                continue
            break
        self._announce([(item, False) for item in unprepared])
        # Let go of the batch before telling waiters it is done: a flush that returns must
        # find no record of it still held here.
        count = len(batch)
        for held_list in (batch, ops, prepared, unprepared, held):
            held_list.clear()
        with self._cond:
            self._finished += count
            self._cond.notify_all()

    def _commit_alone(self, item_ops: Sequence[WriteOp]) -> bool:
        """Store one item's operations (held as a batch's are); False when given up."""
        outcome = self._commit(list(item_ops))
        if outcome is _Outcome.STUCK:
            self._lose(item_ops, self._busy_since)
        return outcome is _Outcome.STORED

    def _isolate(self, held: list[tuple[WriteItem, Sequence[WriteOp]]], since: float
                 ) -> list[tuple[WriteItem, Sequence[WriteOp]]]:
        """Try each item of a batch stuck since `since` once on its own (it has waited
        long enough): store those the database takes, give up those it still refuses.
        Returns the items to hold again as a batch: those after GIVE_UP_IN_A_ROW refusals
        in a row."""
        in_a_row = 0
        for i, (item, item_ops) in enumerate(held):
            outcome = self._commit(list(item_ops), patience=0.0, quick_retries=False)
            if outcome is _Outcome.ABANDONED:  # closing: the rest would not fare better
                self._announce([(it, False) for it, _ in held[i:]])
                return []
            if outcome is _Outcome.STUCK:
                self._lose(item_ops, since)
                in_a_row += 1
            else:
                in_a_row = 0
            self._announce([(item, outcome is _Outcome.STORED)])
            if in_a_row >= GIVE_UP_IN_A_ROW and i + 1 < len(held):
                logger.error("scrutiny: %d item(s) in a row were refused on their own too "
                             "(a whole table locked?); holding the other %d again",
                             in_a_row, len(held) - i - 1)
                return held[i + 1:]
        return []

    def _lose(self, item_ops: Sequence[WriteOp], since: float) -> None:
        """Say what is given up: the database answers but has refused it since `since`."""
        logger.error(
            "scrutiny: gave up storing %s: the database answers but kept refusing it for "
            "%.0f s, on its own too (%s); it is not stored (counted in failed_writes) so "
            "that the work queued behind it is", _describe(item_ops),
            time.monotonic() - since, _reason(self._last_error))

    @staticmethod
    def _prepare(batch: list[WriteItem]) -> tuple[
            list[WriteOp], list[tuple[WriteItem, Sequence[WriteOp]]], list[WriteItem]]:
        ops: list[WriteOp] = []
        prepared: list[tuple[WriteItem, Sequence[WriteOp]]] = []
        unprepared: list[WriteItem] = []
        began = time.monotonic()
        for item in batch:
            if prepared and time.monotonic() - began > BATCH_PREPARE_MAX:
                break  # (the rest is put back, first in the queue: see _write_batch)
            offer(budgeted=False)  # late evaluations go first (see scrutiny.core._courtesy)
            try:
                item_ops = item.prepare()
            except Exception:
                logger.exception("scrutiny: preparing a write failed; it is not stored")
                unprepared.append(item)
                continue
            prepared.append((item, item_ops))
            ops.extend(item_ops)
        return ops, prepared, unprepared

    def _announce(self, results: list[tuple[WriteItem, bool]]) -> None:
        for item, ok in results:
            offer(budgeted=False)
            if not ok:
                self.failed += 1
            hook, item.after_commit = item.after_commit, None  # (told once, see _abandon)
            if hook is not None:
                try:
                    hook(ok)
                except Exception:
                    logger.exception("scrutiny: after-commit hook failed")

    def _commit(self, ops: list[WriteOp], *, patience: float | None = None,
                quick_retries: bool = True) -> _Outcome:
        """Store `ops` and say how that went.

        When a write fails and the database does not answer a ping either (a PostgreSQL
        server restarting, a dropped network) the batch is kept and retried, backing off
        up to OUTAGE_BACKOFF_MAX seconds: a few seconds of outage lost every record made
        during it. So is a write that failed for a reason that passes though the database
        answers (the store's `transient(exc)`: a table locked past lock_timeout or
        statement_timeout, a deadlock, too many connections): a migration or a VACUUM FULL
        holding a table for a few seconds lost every record made meanwhile — but only for
        `patience` seconds (default TRANSIENT_HOLD_MAX), then it is STUCK: one row locked
        for good held every later write behind it. Work queued meanwhile waits behind it,
        bounded by the queue size (beyond it, new work is dropped, counted and logged);
        `close()` gives up what is still held (ABANDONED).

        Args:
            patience: seconds to keep retrying a transient refusal (0: one attempt).
            quick_retries: whether an attempt is retried at once a few times
                (OperationalError), as a batch's is.
        """
        if not ops:
            return _Outcome.STORED
        if patience is None:
            patience = TRANSIENT_HOLD_MAX  # (read now: tests shrink it)
        backoff, since, busy_since = OUTAGE_BACKOFF, 0.0, 0.0
        while True:
            try:
                if quick_retries:
                    for attempt in self._retrying:
                        with attempt:
                            self._store.write(ops)
                else:
                    self._store.write(ops)
                if since:
                    logger.warning("scrutiny: the database takes writes again after %.1f "
                                   "s; the records held meanwhile are being stored",
                                   time.monotonic() - since)
                return _Outcome.STORED
            except Exception as exc:
                down = self._unreachable()
                busy = not down and self._transient(exc)
                if not down and not busy:  # it answers: these operations are the problem
                    self._say_refused(len(ops), exc)
                    return _Outcome.REFUSED
                if self._stopping:
                    logger.error("scrutiny: the database is unreachable (or refuses writes) "
                                 "and the session is closing: %d operation(s) not stored: %s",
                                 len(ops), _reason(exc))
                    return _Outcome.ABANDONED
                now = time.monotonic()
                if not busy:
                    busy_since = 0.0  # (unreachable: waited for without a bound)
                elif not busy_since:
                    busy_since = now
                if busy and now - busy_since >= patience:
                    self._last_error, self._busy_since = exc, busy_since
                    return _Outcome.STUCK
                if not since:
                    since = now
                    if busy:
                        logger.error("scrutiny: the database refuses writes for now (%s); "
                                     "holding %d operation(s) and retrying (queued: %d)",
                                     _reason(exc), len(ops), len(self._queue))
                    else:
                        logger.error("scrutiny: the database cannot be reached (%s); "
                                     "holding %d operation(s) and retrying (queued: %d)",
                                     _reason(exc), len(ops), len(self._queue))
                if self._hold(backoff, busy):  # closing: do not try again
                    logger.error("scrutiny: the database is unreachable (or refuses writes) "
                                 "and the session is closing: %d operation(s) not stored",
                                 len(ops))
                    return _Outcome.ABANDONED
                backoff = min(backoff * 2, OUTAGE_BACKOFF_MAX)

    def _say_refused(self, count: int, exc: Exception) -> None:
        """Log a refused write; the same refusal again in a row only the 10th, 100th,
        ... time, with the count (a database file deleted under the session refused
        every write, and each batch split into single writes logged its own line)."""
        reason = _reason(exc)
        hint = (" (the database file, or its folder, is not writable by this process)"
                if "readonly" in reason else "")
        text = f"{reason}{hint}"
        seen, times = self._refusal
        times = times + 1 if text == seen else 1
        self._refusal = (text, times)
        if times == 1:
            logger.error("scrutiny: storing %d operation(s) failed: %s", count, text)
        elif math.log10(times).is_integer():
            logger.error("scrutiny: storing %d operation(s) failed, the %dth time in a row "
                         "for this reason: %s", count, times, text)

    def _hold(self, seconds: float, answers: bool) -> bool:
        """Wait `seconds` before trying a refused write again; True when closing. While
        the database `answers`, the periodic task runs when due meanwhile (the leases can
        be renewed: a batch may be held as long as a lease lasts) — tried once, not
        retried at once as a batch is: the database refuses writes for now."""
        end = time.monotonic() + seconds
        while (answers and self._on_idle is not None and self._idle_interval is not None
               and not self._in_idle):
            self._periodic(quick_retries=False)
            left = end - time.monotonic()
            if left <= 0:
                return self._outage.is_set()
            due = self._last_idle + self._idle_interval - time.monotonic()
            if self._outage.wait(max(0.0, min(left, due))):
                return True
        return self._outage.wait(max(0.0, end - time.monotonic()))

    def _pause(self, seconds: float) -> None:
        self._outage.wait(seconds)

    def _transient(self, exc: Exception) -> bool:
        """Whether the store says the write can succeed unchanged later."""
        transient = getattr(self._store, "transient", None)
        if transient is None:
            return False
        try:
            return bool(transient(exc))
        except Exception:
            return False

    def _unreachable(self) -> bool:
        """Whether the database itself fails to answer (rather than refusing a write)."""
        ping = getattr(self._store, "ping", None)
        if ping is None:
            return False
        try:
            return not ping()
        except Exception:
            return True


def _reason(exc: BaseException | None) -> str:
    """What the database said, without the statement SQLAlchemy adds to its errors (a
    batch's INSERT of many rows, a kilobyte or more per refused item)."""
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip()


def _describe(ops: Sequence[WriteOp], most: int = 5) -> str:
    """What `ops` would have stored, for a log line (the first `most` of them)."""
    parts: list[str] = []
    for op in ops[:most]:
        if isinstance(op, InsertRecord):
            parts.append(f"record {op.record.get('record_id')} (app "
                         f"{op.app.get('app_id')!r}) with {len(op.results)} result(s)")
        elif isinstance(op, UpdateResult):
            status = op.values.get("status")
            parts.append(f"result {op.result_id}" + (f" ({status})" if status else ""))
        else:
            parts.append(f"the lease renewal of {op.worker_id}")
    if len(ops) > most:
        parts.append(f"{len(ops) - most} more operation(s)")
    return ", ".join(parts)
