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
"""

from __future__ import annotations

import collections
import logging
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
from scrutiny.core.storage import Store, WriteOp

__all__ = ["StorageWriter", "WriteItem"]

logger = logging.getLogger("scrutiny")

POLL = 0.002
IDLE_AFTER = 0.05
OUTAGE_BACKOFF = 0.25
OUTAGE_BACKOFF_MAX = 5.0


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
        self._polling = False  # the writer looks at its queue by itself: no need to wake it
        self._outage = threading.Event()  # set by close(): stop waiting out an outage
        self._gave_up = False  # the last commit gave up on an unreachable database
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
        return len(self._queue)

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
        last_idle = last_work = time.monotonic()
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
            if self._on_idle is not None and self._idle_interval is not None and (
                    now - last_idle >= self._idle_interval):
                last_idle = now
                try:
                    ops = self._on_idle()
                except Exception:
                    logger.exception("scrutiny: the writer's periodic task failed")
                    ops = ()
                if ops:
                    self._commit(list(ops))
            if self._queue:
                last_work = now
            while self._queue:
                batch: list[WriteItem] = []
                while self._queue and len(batch) < self._max_batch:
                    batch.append(self._queue.popleft())
                try:
                    self._write_batch(batch)
                except Exception:  # a bug of ours: this batch is lost, not the writer
                    self._abandon(batch)
            if self._stopping and not self._queue:
                return

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
        stored = self._commit(ops)
        if not stored and len(prepared) > 1 and not self._gave_up:
            # isolate the bad item: write one by one so the others are kept
            results = [(item, self._commit(list(item_ops))) for item, item_ops in prepared]
        else:
            results = [(item, stored) for item, _ in prepared]
        results += [(item, False) for item in unprepared]
        self._announce(results)
        # Let go of the batch before telling waiters it is done: a flush that returns must
        # find no record of it still held here.
        count = len(batch)
        for held in (batch, ops, prepared, unprepared, results):
            held.clear()
        with self._cond:
            self._finished += count
            self._cond.notify_all()

    @staticmethod
    def _prepare(batch: list[WriteItem]) -> tuple[
            list[WriteOp], list[tuple[WriteItem, Sequence[WriteOp]]], list[WriteItem]]:
        ops: list[WriteOp] = []
        prepared: list[tuple[WriteItem, Sequence[WriteOp]]] = []
        unprepared: list[WriteItem] = []
        for item in batch:
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

    def _commit(self, ops: list[WriteOp]) -> bool:
        """Store `ops`; False when the database refused them (or the writer is stopping
        while it is unreachable).

        When a write fails and the database does not answer a ping either (a PostgreSQL
        server restarting, a dropped network) the batch is kept and retried, backing off
        up to OUTAGE_BACKOFF_MAX seconds: a few seconds of outage lost every record made
        during it. So is a write that failed for a reason that passes though the database
        answers (the store's `transient(exc)`: a table locked past lock_timeout or
        statement_timeout, a deadlock, too many connections): a migration or a VACUUM FULL
        holding a table for a few seconds lost every record made meanwhile. Work queued
        meanwhile waits behind it, bounded by the queue size (beyond it, new work is
        dropped, counted and logged); `close()` gives up what is still held.
        """
        self._gave_up = False
        if not ops:
            return True
        backoff, since = OUTAGE_BACKOFF, 0.0
        while True:
            try:
                for attempt in self._retrying:
                    with attempt:
                        self._store.write(ops)
                if since:
                    logger.warning("scrutiny: the database takes writes again after %.1f "
                                   "s; the records held meanwhile are being stored",
                                   time.monotonic() - since)
                return True
            except Exception as exc:
                down = self._unreachable()
                busy = not down and self._transient(exc)
                if not down and not busy:  # it answers: these operations are the problem
                    hint = (" (the database file, or its folder, is not writable by this "
                            "process)" if "readonly" in str(exc) else "")
                    logger.error("scrutiny: storing %d operation(s) failed: %s%s", len(ops),
                                 exc, hint)
                    return False
                if self._stopping:
                    logger.error("scrutiny: the database is unreachable (or refuses writes) "
                                 "and the session is closing: %d operation(s) not stored: %s",
                                 len(ops), exc)
                    self._gave_up = True  # (one by one would not fare better)
                    return False
                if not since:
                    since = time.monotonic()
                    if busy:
                        logger.error("scrutiny: the database refuses writes for now (%s); "
                                     "holding %d operation(s) and retrying (queued: %d)",
                                     exc, len(ops), len(self._queue))
                    else:
                        logger.error("scrutiny: the database cannot be reached (%s); "
                                     "holding %d operation(s) and retrying (queued: %d)",
                                     exc, len(ops), len(self._queue))
                if self._outage.wait(backoff):  # closing: do not try again
                    logger.error("scrutiny: the database is unreachable (or refuses writes) "
                                 "and the session is closing: %d operation(s) not stored",
                                 len(ops))
                    self._gave_up = True
                    return False
                backoff = min(backoff * 2, OUTAGE_BACKOFF_MAX)

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
