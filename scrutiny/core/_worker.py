"""Evaluating what waits in the database: workers that claim pending results, and the
watcher that tells a deferred-mode app when workers have stored its results.

A worker claims a batch of results with a lease (on PostgreSQL with `FOR UPDATE SKIP
LOCKED`, so any number of workers on any number of machines never take the same row; on
SQLite under the single-writer lock), rebuilds each feedback from the spec stored with its
definition, evaluates it on the session's evaluation loop and stores the end state guarded
by the lease token. The session's heartbeat renews the lease; a worker that dies stops
renewing, and its claims become claimable again when the lease runs out.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from scrutiny.core import _rows, _serialize
from scrutiny.core._dispatch import Job
from scrutiny.core._feedback import Feedback
from scrutiny.core._records import Record
from scrutiny.core._results import FeedbackResult, FeedbackStatus
from scrutiny.core.storage import Row

if TYPE_CHECKING:
    from scrutiny.core._session import Session

__all__ = ["ResultWatcher", "Worker"]

logger = logging.getLogger("scrutiny")


def _unloadable(*_: Any, **__: Any) -> float:  # stands in for a feedback that cannot load
    raise RuntimeError("unreachable")


RETRY_LOAD_AFTER = 60.0
"""Seconds a worker leaves alone the results of a feedback it could not import before it
tries again (the missing package may have been installed meanwhile)."""


class _NotHere(str):
    """Why a feedback cannot be loaded *in this process* (its module or function is
    missing here): another worker, deployed with that code, may load it."""

    __slots__ = ()


class Worker:
    """Claims pending results from the session's database and evaluates them here.

    Args:
        session: supplies the store, the evaluation loop, the writer and the lease.
        poll_interval: seconds to wait after finding nothing to claim.
        batch_size: the most results claimed at once.
        max_claims: a result claimed this many times without finishing (its workers kept
            dying) ends `failed` instead of being claimed forever.
    """

    def __init__(self, session: Session, *, poll_interval: float, batch_size: int,
                 max_claims: int) -> None:
        self._session = session
        self._poll = poll_interval
        self._batch = batch_size
        self._max_claims = max_claims
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feedbacks: dict[str, Feedback | str] = {}
        self._not_here: dict[str, float] = {}  # feedback id -> when to try loading it again
        self._feedbacks_warned: set[str] = set()
        self.claimed = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="scrutiny-worker", daemon=True)
        self._thread.start()

    def stop_claiming(self) -> None:
        """Claim nothing more; what is running goes on."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming and wait (bounded) for the claimed work to be stored."""
        self.stop_claiming()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return self._session.wait_for_feedback(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Claim and evaluate until :meth:`stop_claiming`."""
        while not self._stop.is_set():
            try:
                got = self._claim_once()
            except Exception:
                logger.exception("scrutiny worker: claiming failed; retrying")
                got = 0
            if got == 0:
                self._stop.wait(max(self._poll, 0.01))

    def drain(self) -> int:
        """Claim until nothing is claimable (evaluation goes on in the background)."""
        total = 0
        while not self._stop.is_set():
            got = self._claim_once(wait_for_room=True)
            if got == 0:
                break
            total += got
        return total

    # ------------------------------------------------------------------ claiming
    def _room(self) -> int:
        session = self._session
        return session.max_concurrency * 2 - len(session._inflight)

    def _claim_once(self, wait_for_room: bool = False) -> int:
        session = self._session
        room = self._room()
        if room <= 0:
            with session._outstanding_cond:
                session._outstanding_cond.wait_for(lambda: self._room() > 0 or
                                                   self._stop.is_set(), timeout=1.0)
            return 1 if wait_for_room else 0  # not idle: try again at once
        session._evaluation_loop()
        token = uuid.uuid4().hex
        now = time.monotonic()
        due = [f for f, retry_at in self._not_here.items() if retry_at <= now]
        if due:  # load them again when they next come up (their code may be there now)
            importlib.invalidate_caches()
            for feedback_id in due:
                del self._not_here[feedback_id]
                self._feedbacks.pop(feedback_id, None)
        while True:
            rows = session.store.claim(worker_id=session.owner_id, token=token,
                                       limit=min(room, self._batch),
                                       lease_seconds=session.lease_seconds,
                                       now=datetime.now(timezone.utc),
                                       exclude_feedback_ids=list(self._not_here))
            if not rows:
                return 0
            taken = self._dispatch(rows, token)
            self.claimed += taken
            if taken:
                return taken
            # Every row was of feedbacks it cannot load (now excluded): claim again at once,
            # or a drain stopped here with loadable work left behind them.

    def _dispatch(self, rows: list[Row], token: str) -> int:
        """Evaluate (or end) the claimed rows; claims of feedbacks this process cannot
        import are given back. Returns how many rows it kept."""
        session = self._session
        records = {r["record_id"]: _rows.record_from_row(r)
                   for r in session.store.records_by_ids(list({r["record_id"] for r in rows}))}
        to_run: list[Job] = []
        failed: list[tuple[Job, str]] = []
        give_back: list[str] = []
        with session._outstanding_cond:  # this process's own deferred records, waited on here
            own = {r["result_id"]: session._inflight.get(r["result_id"]) for r in rows}
        for row in rows:
            pending = _rows.result_from_row(row)
            pending.status = FeedbackStatus.PENDING
            mine = own.get(row["result_id"])
            if mine is not None and mine.lease_token is None:
                # The app's own feedback on the app's own record object, so that finishing
                # it resolves what the app waits on (its wait, callbacks, listeners) once —
                # but reading the record as stored, as a worker in another process does:
                # live objects here (a Document, a pydantic model) and their JSON form
                # there made a feedback pass in one and fail in the other.
                stored = records.get(row["record_id"])
                to_run.append(Job(mine.feedback, mine.record, pending, mine.listeners, token,
                                  evaluate_on=stored))
                continue
            feedback = self._feedback(row["feedback_id"], row["feedback_name"])
            if isinstance(feedback, _NotHere):
                give_back.append(row["result_id"])
                self._leave_for_others(row["feedback_id"], feedback)
                continue
            record = records.get(row["record_id"]) or _missing_record(row)
            job = Job(feedback if isinstance(feedback, Feedback) else Feedback(
                _unloadable, name=row["feedback_name"]), record, pending, (), token)
            if isinstance(feedback, str):
                failed.append((job, feedback))
            elif row["record_id"] not in records:
                failed.append((job, "its record is no longer in the database"))
            elif (row.get("attempts") or 0) > self._max_claims:
                failed.append((job, f"abandoned after {self._max_claims} claims: every "
                                    "worker that took it stopped before finishing"))
            else:
                to_run.append(job)
        with session._outstanding_cond:
            for job in to_run + [j for j, _ in failed]:
                session._inflight[job.pending.result_id or ""] = job
        for job, reason in failed:
            now = datetime.now(timezone.utc)
            session._on_final(job, FeedbackResult(
                record_id=job.pending.record_id, feedback_name=job.pending.feedback_name,
                status=FeedbackStatus.FAILED, error=reason, result_id=job.pending.result_id,
                feedback_id=job.pending.feedback_id, created_at=job.pending.created_at,
                started_at=now, ended_at=now, attempts=1))
        if give_back:
            session.store.release(give_back, token=token)
        if to_run:
            session._evaluation_loop().submit(to_run)
        return len(rows) - len(give_back)

    def _leave_for_others(self, feedback_id: str, reason: str) -> None:
        """Claim no results of this feedback for RETRY_LOAD_AFTER seconds; say so once."""
        if feedback_id not in self._not_here:
            log = logger.debug if feedback_id in self._feedbacks_warned else logger.error
            self._feedbacks_warned.add(feedback_id)
            log("scrutiny worker: %s. Its results stay pending for a worker that can load "
                "it (install that code here, or run such a worker); this one tries again "
                "in %g s", reason, RETRY_LOAD_AFTER)
        self._not_here[feedback_id] = time.monotonic() + RETRY_LOAD_AFTER

    def _feedback(self, feedback_id: str, name: str) -> Feedback | str:
        """The feedback rebuilt from its stored spec, or the reason it cannot be."""
        if feedback_id not in self._feedbacks:
            for d in self._session.store.definitions():
                if d["feedback_id"] not in self._feedbacks or isinstance(
                        self._feedbacks[d["feedback_id"]], str):
                    self._feedbacks[d["feedback_id"]] = _load(d)
        return self._feedbacks.get(
            feedback_id, f"feedback {name!r} has no stored definition")


def _load(definition: Row) -> Feedback | str:
    spec = _serialize.loads(definition.get("spec_json"))
    name = definition["name"]
    if not spec:
        return (f"feedback {name!r} cannot be loaded by a worker: its function or selectors "
                "are not importable by path (a lambda, a closure or code in __main__)")
    try:
        return Feedback.from_spec(spec)
    except (ImportError, AttributeError) as exc:  # its code is not installed here
        return _NotHere(f"feedback {name!r} could not be loaded from {spec.get('fn')!r} "
                        f"in this process: {type(exc).__name__}: {exc}")
    except Exception as exc:
        return f"feedback {name!r} could not be loaded from {spec.get('fn')!r}: {exc}"


def _missing_record(row: Row) -> Record:
    return Record(app_name="?", app_version="?", record_id=row["record_id"])


class ResultWatcher:
    """Polls the database for end states of deferred results this process waits on."""

    MAX_WATCHED = 100_000

    def __init__(self, session: Session, interval: float = 0.2) -> None:
        self._session = session
        self._interval = interval
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="scrutiny-watch", daemon=True)
        self._thread.start()

    def add(self, jobs: list[Job]) -> None:
        with self._lock:
            for job in jobs:
                if len(self._jobs) >= self.MAX_WATCHED:
                    self._forget(job)
                    continue
                self._jobs[job.pending.result_id or ""] = job

    def _forget(self, job: Job) -> None:
        """Too many to watch: stop waiting here (the database still gets the result)."""
        if not self._warned:
            self._warned = True
            logger.warning("scrutiny: more than %d deferred results awaited in this process; "
                           "the newest are not watched (their results are still stored by "
                           "the workers)", self.MAX_WATCHED)
        with self._session._outstanding_cond:
            self._session._inflight.pop(job.pending.result_id or "", None)
            self._session._outstanding_cond.notify_all()

    def stop(self) -> list[Job]:
        """Stop watching; results still awaited here stay in the database for later.
        Returns the jobs no longer watched."""
        self._stop.set()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        with self._session._outstanding_cond:
            for job in jobs:
                self._session._inflight.pop(job.pending.result_id or "", None)
            self._session._outstanding_cond.notify_all()
        return jobs

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._jobs)
            if not ids:
                continue
            try:
                rows = self._session.store.results_final(ids)
            except Exception:
                logger.debug("scrutiny: polling deferred results failed", exc_info=True)
                continue
            for row in rows:
                with self._lock:
                    job = self._jobs.pop(row["result_id"], None)
                if job is not None:
                    self._session._finish(job, _rows.result_from_row(row))


