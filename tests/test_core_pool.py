"""The sync pool's daemon threads: work handed to idle threads, a backlog when all are busy,
and shutdown that either finishes or cancels what is queued."""

from __future__ import annotations

import threading

import pytest

from scrutiny.core._pool import DaemonThreadPool


def test_a_burst_runs_on_as_many_threads_at_once() -> None:
    pool = DaemonThreadPool(8)
    pool.prestart()
    barrier = threading.Barrier(8, timeout=10)  # breaks unless all 8 calls run together
    try:
        futures = [pool.submit(lambda: (barrier.wait(), threading.get_ident())[1])
                   for _ in range(8)]
        idents = {f.result(timeout=10) for f in futures}
    finally:
        pool.shutdown(wait=True)
    assert len(idents) == 8


def test_work_beyond_the_threads_waits_for_one_and_runs_in_order() -> None:
    pool = DaemonThreadPool(2)
    release = threading.Event()
    order: list[int] = []
    try:
        blockers = [pool.submit(release.wait, 10) for _ in range(2)]
        queued = [pool.submit(order.append, i) for i in range(5)]
        assert not any(f.done() for f in queued)  # both threads are busy
        release.set()
        for f in blockers + queued:
            f.result(timeout=10)
    finally:
        pool.shutdown(wait=True)
    assert sorted(order) == list(range(5))
    assert len(pool._threads) == 2  # never more threads than max_workers


def test_shutdown_finishes_queued_work_unless_told_to_cancel_it() -> None:
    pool = DaemonThreadPool(1)
    release = threading.Event()
    ran: list[str] = []
    blocker = pool.submit(release.wait, 10)
    kept = pool.submit(ran.append, "kept")
    release.set()
    pool.shutdown(wait=True)
    assert blocker.result(timeout=0) is True
    assert kept.result(timeout=0) is None
    assert ran == ["kept"]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(ran.append, "late")

    pool = DaemonThreadPool(1)
    release = threading.Event()
    blocker = pool.submit(release.wait, 10)
    dropped = pool.submit(ran.append, "dropped")
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert pool.join(10)
    assert dropped.cancelled()
    assert ran == ["kept"]


def test_idle_threads_end_at_shutdown() -> None:
    pool = DaemonThreadPool(4)
    pool.prestart()
    assert pool.submit(lambda: 1).result(timeout=10) == 1
    pool.shutdown(wait=False)
    assert pool.join(10)
    assert not any(t.is_alive() for t in pool._threads)


def test_a_slot_handed_on_after_shutdown_starts_nothing_and_raises_nothing() -> None:
    """Closing a session with work queued: an evaluation being cancelled frees its slot,
    which goes to a queued sync call. With the pool already shut down that raised, and the
    error was stored and logged as that (cancelled) feedback's failure."""
    import asyncio

    from scrutiny.core._slots import SlotGate, SyncCall

    loop = asyncio.new_event_loop()
    pool = DaemonThreadPool(1)
    try:
        gate = SlotGate(1, loop, pool)
        ran = threading.Event()
        call = SyncCall(ran.set, loop.create_future(), lambda started: None)
        pool.shutdown(wait=True)
        pool.run_calls(call, gate)  # (what SlotGate.release does with a queued call)
        assert not ran.is_set()
        with pytest.raises(RuntimeError, match="shut down"):
            pool.submit(ran.set)  # work given to a closed pool is still refused
    finally:
        loop.close()


def test_a_pool_that_can_start_no_more_threads_runs_work_on_the_ones_it_has(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.12+ starts no thread once the interpreter is shutting down, where sessions
    are closed: the pool's lazy start raised in the evaluation thread (which died, every
    result left pending), and closing it raised "cannot join thread before it is
    started". (The refusal is Python's own RuntimeError, raised here by hand.)"""
    pool = DaemonThreadPool(4)
    pool.prestart(1)
    assert len(pool._threads) == 1

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refused)
    try:
        pool.prestart()  # (no error: the pool keeps the one thread it has)
        futures = [pool.submit(lambda i=i: i * 2) for i in range(5)]
        assert [f.result(timeout=10) for f in futures] == [0, 2, 4, 6, 8]
        assert len(pool._threads) == 1
    finally:
        pool.shutdown(wait=False)
        assert pool.join(10)
