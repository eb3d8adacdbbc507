"""Evaluating what waits in the database: workers that claim pending results, and the
watcher that tells a deferred-mode app when workers have stored its results.

A worker claims a batch of results with a lease (on PostgreSQL with `FOR UPDATE SKIP
LOCKED`, so any number of workers on any number of machines never take the same row; on
SQLite under the single-writer lock), rebuilds each feedback from the spec stored with its
definition, evaluates it on the session's evaluation loop and stores the end state guarded
by the lease token. The session's heartbeat renews the lease; a worker that dies stops
renewing, and its claims become claimable again when the lease runs out.

A claimed row stays `pending` (held: its worker, token and lease are set) until its
evaluation gets one of the session's concurrency slots: a worker claims up to twice what it
evaluates at once, and the rows waiting for a slot have not started. Once an evaluation has
run RUNNING_AFTER seconds its row is stored `running` with the time it really started, as
for the evaluations of the session's own records (see `Session._on_running`).
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
from scrutiny.core._feedback import Feedback, defined_here
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


CLAIM_BACKOFF_MAX = 5.0
"""The longest wait between two claims while the database is down or busy."""


class _OnlyWhereDefined(str):
    """Why a feedback cannot be loaded by path anywhere: only a process that defines it
    (the app's own) can evaluate it."""

    __slots__ = ()


class _NotHere(str):
    """Why a feedback cannot be loaded *in this process* (its module or function is
    missing here): another worker, deployed with that code, may load it."""

    __slots__ = ()


class _BrokenHere(_NotHere):
    """Why a feedback cannot be loaded *in this process*: importing its module raised (a
    variable or a file it reads at import is missing here, a package it needs is broken):
    a worker where it imports may load it, and so may this one once that is fixed."""

    __slots__ = ()


class _MainHere(_NotHere):
    """(Resuming in the app's process.) Why a feedback cannot be loaded by path: its
    function is in ``__main__`` — a notebook's cell, a script — and no feedback of its id
    is defined in this process now. Running the code that defines it here lets it resume."""

    __slots__ = ()


class _NoSpecYet(_NotHere):
    """Why a feedback cannot be loaded *yet*: its definition has no stored spec (written
    before specs were stored, in a database upgraded since); the app stores it when it
    next records with that feedback."""

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
                 max_claims: int, in_app: bool = False) -> None:
        self._session = session
        # (resume_pending: the app's own process, where a feedback of __main__ may be
        # defined again — its results stay pending until it is, rather than failing)
        self._in_app = in_app
        self._poll = poll_interval
        self._batch = batch_size
        self._max_claims = max_claims
        self._stop = threading.Event()
        # Held from the last look at _stop to the hand-over of claimed rows: once
        # stop_claiming() returns, nothing more is handed over (claims are given back).
        self._handing_over = threading.Lock()
        self._thread: threading.Thread | None = None
        # feedback id -> (the stored spec text it was loaded from, what loading gave)
        self._feedbacks: dict[str, tuple[str | None, Feedback | str]] = {}
        self._not_here: dict[str, float] = {}  # feedback id -> when to try loading it again
        self._feedbacks_warned: set[str] = set()
        self.claimed = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="scrutiny-worker", daemon=True)
        self._thread.start()

    def stop_claiming(self) -> None:
        """Claim nothing more; what is running goes on. Rows claimed but not yet handed to
        the evaluation loop when this returns are given back (pending)."""
        with self._handing_over:
            self._stop.set()
        cond = self._session._outstanding_cond
        with cond:  # (a claim waiting for room stops waiting)
            cond.notify_all()

    def join(self, timeout: float | None) -> bool:
        """Wait for the worker thread to end (after :meth:`stop_claiming`); False when it
        is still running."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming and wait (bounded) for the claimed work to be stored."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.stop_claiming()
        self.join(timeout)
        return self._session.wait_for_feedback(
            None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Claim and evaluate until :meth:`stop_claiming` (or the session closes).

        While the database is down or refuses the claim for a reason that passes (a lock,
        too many connections), it says so once and tries again backing off up to
        CLAIM_BACKOFF_MAX seconds: it logged a full traceback at every poll (hundreds of
        lines a second with a short poll interval, for as long as the outage lasted)."""
        failing_since = 0.0
        backoff = self._poll
        while not self._stop.is_set() and not self._session.closed:
            wait = max(self._poll, 0.01)
            try:
                got = self._claim_once()
                if failing_since:
                    logger.warning("scrutiny worker: claiming works again after %.1f s",
                                   time.monotonic() - failing_since)
                    failing_since, backoff = 0.0, self._poll
            except Exception as exc:
                if self._session.closed:
                    break
                got = 0
                if not self._passing(exc):
                    logger.exception("scrutiny worker: claiming failed; retrying")
                else:
                    if not failing_since:
                        failing_since = time.monotonic()
                        logger.error("scrutiny worker: claiming failed (%s): the database "
                                     "is unreachable or busy; trying again, backing off "
                                     "up to %g s", exc, CLAIM_BACKOFF_MAX)
                    backoff = min(max(backoff * 2, 0.25), CLAIM_BACKOFF_MAX)
                    wait = max(wait, backoff)
            if got == 0:
                self._stop.wait(wait)

    def _passing(self, exc: Exception) -> bool:
        """Whether a claim that failed with `exc` may succeed later unchanged."""
        store = self._session.store
        transient = getattr(store, "transient", None)
        ping = getattr(store, "ping", None)
        try:
            return bool(transient is not None and transient(exc)) or (
                ping is not None and not ping())
        except Exception:
            return False

    def drain(self, deadline: float | None = None) -> int:
        """Claim until nothing is claimable, or until `deadline` (a `time.monotonic()`
        time); evaluation goes on in the background. Returns how many it claimed."""
        total = 0
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            got = self._claim_once(deadline)
            if got is None:  # no room yet: evaluations here are still running
                continue
            if got == 0:
                break
            total += got
        return total

    # ------------------------------------------------------------------ claiming
    def _room(self) -> int:
        """Claims this process can take on: twice what it evaluates at once, less what it
        evaluates or has queued now. (Deferred results this process only waits for are not
        counted: they hold no room, and they may be the very rows to claim.)"""
        session = self._session
        return session.max_concurrency * 2 - session._evaluating

    def _claim_once(self, deadline: float | None = None) -> int | None:
        """Claim one batch and hand it over. Returns how many rows it took (0: nothing
        claimable), or None when there was no room (after waiting a while for some)."""
        session = self._session
        if self._stop.is_set():
            return 0
        room = self._room()
        if room <= 0:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            with session._outstanding_cond:
                session._outstanding_cond.wait_for(lambda: self._room() > 0 or
                                                   self._stop.is_set(), timeout=wait)
            return None
        session._evaluation_loop()
        token = uuid.uuid4().hex
        now = time.monotonic()
        due = [f for f, retry_at in self._not_here.items() if retry_at <= now]
        if due:  # load them again when they next come up (their code may be there now)
            importlib.invalidate_caches()
            for feedback_id in due:
                del self._not_here[feedback_id]
                self._feedbacks.pop(feedback_id, None)
        while not self._stop.is_set():
            rows = session.store.claim(worker_id=session.owner_id, token=token,
                                       limit=min(room, self._batch),
                                       lease_seconds=session.lease_seconds,
                                       now=datetime.now(timezone.utc),
                                       exclude_feedback_ids=list(self._not_here))
            if not rows:
                return 0
            try:
                taken = self._dispatch(rows, token)
            except BaseException:  # not left running under a lease no one evaluates
                self._give_back([r["result_id"] for r in rows], token)
                raise
            self.claimed += taken
            if taken:
                return taken
            # Every row was of feedbacks it cannot load (now excluded), or it is stopping:
            # claim again at once, or a drain stopped here with loadable work left behind.
        return 0

    def _give_back(self, result_ids: list[str], token: str) -> None:
        if not result_ids:
            return
        try:
            self._session.store.release(result_ids, token=token)
        except Exception:
            logger.exception("scrutiny worker: giving back %d claim(s) failed; they are "
                             "claimable again when their lease runs out", len(result_ids))

    def _dispatch(self, rows: list[Row], token: str) -> int:
        """Evaluate (or end) the claimed rows; claims of feedbacks this process cannot
        import, and every claim once it is stopping, are given back. Returns how many
        rows it kept."""
        session = self._session
        if self._stop.is_set():
            self._give_back([r["result_id"] for r in rows], token)
            return 0
        record_rows = session.store.records_by_ids(list({r["record_id"] for r in rows}))
        records = {r["record_id"]: _rows.record_from_row(r) for r in record_rows}
        cut = {r["record_id"] for r in record_rows if _rows.holds_truncation(r)}
        to_run: list[Job] = []
        ended: list[tuple[Job, FeedbackStatus, str]] = []
        give_back: list[str] = []
        with session._outstanding_cond:  # this process's own deferred records, waited on here
            own = {r["result_id"]: session._inflight.get(r["result_id"]) for r in rows}
        # (and its own results left pending over the backlog: their feedbacks are here)
        shed = session._shed_feedback([r["result_id"] for r in rows if own.get(
            r["result_id"]) is None])
        with session._outstanding_lock:  # (session.retry_failed: the feedbacks given it)
            retrying = dict(session._retry_feedbacks)
        feedbacks = self._feedbacks_of([r for r in rows if ((mine := own.get(
            r["result_id"])) is None or mine.lease_token is not None)
            and r["result_id"] not in shed and r["feedback_name"] not in retrying])
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
                job = Job(mine.feedback, mine.record, pending, mine.listeners, token,
                          evaluate_on=stored)
                why = None if stored is None or row["record_id"] not in cut else (
                    _rows.truncated_selection(mine.feedback, stored))
                if why is not None:
                    ended.append((job, FeedbackStatus.SKIPPED, why))
                else:
                    to_run.append(job)
                continue
            feedback = shed.get(row["result_id"]) or retrying.get(row["feedback_name"]) or \
                feedbacks.get(row["feedback_id"]) or (
                    f"feedback {row['feedback_name']!r} has no stored definition")
            if isinstance(feedback, _NotHere):
                give_back.append(row["result_id"])
                self._leave_for_others(row["feedback_id"], feedback)
                continue
            record = records.get(row["record_id"]) or _missing_record(row)
            job = Job(feedback if isinstance(feedback, Feedback) else Feedback(
                _unloadable, name=row["feedback_name"]), record, pending, (), token)
            if isinstance(feedback, str):
                self._say_unloadable(row["feedback_id"], feedback)
                ended.append((job, FeedbackStatus.FAILED, feedback))
            elif row["record_id"] not in records:
                ended.append((job, FeedbackStatus.FAILED,
                              "its record is no longer in the database"))
            elif (row.get("attempts") or 0) > self._max_claims:
                ended.append((job, FeedbackStatus.FAILED,
                              f"abandoned after {self._max_claims} claims: every worker "
                              "that took it stopped before finishing"))
            elif row["record_id"] in cut and (
                    why := _rows.truncated_selection(feedback, record)) is not None:
                ended.append((job, FeedbackStatus.SKIPPED, why))
            else:
                to_run.append(job)
        self._give_back(give_back, token)
        kept = [j.pending.result_id or "" for j in to_run] + [
            j.pending.result_id or "" for j, _, _ in ended]
        with self._handing_over:
            stopping = self._stop.is_set()
            if not stopping:
                with session._outstanding_cond:
                    for job in to_run + [j for j, _, _ in ended]:
                        session._hold(job)
                for job, status, reason in ended:
                    now = datetime.now(timezone.utc)
                    session._on_final(job, FeedbackResult(
                        record_id=job.pending.record_id,
                        feedback_name=job.pending.feedback_name, status=status,
                        error=reason, result_id=job.pending.result_id,
                        feedback_id=job.pending.feedback_id,
                        created_at=job.pending.created_at, started_at=now, ended_at=now,
                        attempts=0), evaluated=False)
                if to_run:
                    session._evaluation_loop().submit(to_run)
        if stopping:  # (the session may be closing: its loop takes nothing more)
            self._give_back(kept, token)
            return 0
        return len(kept)

    def _leave_for_others(self, feedback_id: str, reason: str) -> None:
        """Claim no results of this feedback for RETRY_LOAD_AFTER seconds; say so once."""
        if feedback_id not in self._not_here:
            log = logger.debug if feedback_id in self._feedbacks_warned else logger.error
            self._feedbacks_warned.add(feedback_id)
            if isinstance(reason, _BrokenHere):
                log("scrutiny worker: %s. Its results stay pending for a worker where it "
                    "imports (fix what importing it needs in this worker's environment, "
                    "or run such a worker); this one tries again in %g s", reason,
                    RETRY_LOAD_AFTER)
            elif isinstance(reason, _MainHere):
                log("scrutiny: %s, and this process defines no feedback of that id now. Its "
                    "results stay pending: run the code that defines it here (a notebook's "
                    "cell, say) and call session.resume_pending() again", reason)
            elif isinstance(reason, _NoSpecYet):
                log("scrutiny worker: %s. Its results stay pending (the app stores the spec "
                    "when it next records with this feedback); this worker looks again in "
                    "%g s", reason, RETRY_LOAD_AFTER)
            else:
                log("scrutiny worker: %s. Its results stay pending for a worker that can "
                    "load it (install that code here — or give `scrutiny worker` its folder "
                    "with --import-path DIR — or run such a worker); this one tries again "
                    "in %g s", reason, RETRY_LOAD_AFTER)
        self._not_here[feedback_id] = time.monotonic() + RETRY_LOAD_AFTER

    def _say_unloadable(self, feedback_id: str, reason: str) -> None:
        """Say once why the results of a feedback that cannot be loaded anywhere end
        `failed` (they ended so without a line in the worker's log: only its count of
        failures grew)."""
        if feedback_id in self._feedbacks_warned:
            return
        self._feedbacks_warned.add(feedback_id)
        logger.error("scrutiny worker: %s. Its results are stored failed with that reason "
                     "(record with the feedback as its code now is to evaluate new ones)",
                     reason)

    def _feedbacks_of(self, rows: list[Row]) -> dict[str, Feedback | str]:
        """The feedbacks of these claimed rows, rebuilt from their stored specs (or the
        reason each cannot be). A feedback is loaded again when its stored spec changed:
        its id covers its name, code and wiring, not its options (a timeout raised from 1
        to 30 s kept timing out at 1 s in a running worker)."""
        wanted = {r["feedback_id"] for r in rows}
        if not wanted:
            return {}
        definitions = {d["feedback_id"]: d for d in self._session.store.definitions()
                       if d["feedback_id"] in wanted}
        out: dict[str, Feedback | str] = {}
        for feedback_id, definition in definitions.items():
            text = definition.get("spec_json")
            cached = self._feedbacks.get(feedback_id)
            if cached is None or cached[0] != text:
                if cached is not None:
                    logger.info("scrutiny worker: the stored spec of feedback %r changed; "
                                "loading it again", definition["name"])
                cached = self._feedbacks[feedback_id] = (text, _load(definition))
            loaded = cached[1]
            if not isinstance(loaded, Feedback):  # (not importable by path: this process
                # may hold it, a function of a notebook's cell or a script)
                here = defined_here(feedback_id)
                if here is not None:
                    loaded = here
                elif self._in_app and isinstance(loaded, _OnlyWhereDefined):
                    loaded = _MainHere(loaded)
            out[feedback_id] = loaded
        return out


def _load(definition: Row) -> Feedback | str:
    spec = _serialize.loads(definition.get("spec_json"))
    name = definition["name"]
    if not spec:
        implementation = definition.get("implementation")
        if not implementation or implementation.startswith("__main__:"):
            return _OnlyWhereDefined(
                f"feedback {name!r} cannot be loaded by a worker: its function is not "
                "importable by path (a lambda, a closure or code in __main__)")
        # Before specs were stored (a database upgraded from revision 0001), or a selector
        # of it cannot be imported by path: not a reason to fail it for good.
        return _NoSpecYet(
            f"feedback {name!r} ({implementation}) has no stored spec yet: its definition "
            "was stored without one (by a Scrutiny version older than deferred workers, in "
            "a database upgraded since; or by an app whose selectors of it cannot be "
            "imported by path)")
    not_here = _import_modules(spec, f"feedback {name!r} could not be loaded from "
                                     f"{spec.get('fn')!r} in this process")
    if not_here is not None:
        return not_here
    try:
        return Feedback.from_spec(spec)
    except (ImportError, AttributeError) as exc:  # its code is not installed here
        return _NotHere(f"feedback {name!r} could not be loaded from {spec.get('fn')!r} "
                        f"in this process: {type(exc).__name__}: {exc}")
    except Exception as exc:
        return f"feedback {name!r} could not be loaded from {spec.get('fn')!r}: {exc}"


def _import_modules(spec: dict[str, Any], what: str) -> _NotHere | None:
    """Import the modules a feedback's spec refers to; why one cannot be imported here
    (None: they all imported). An error raised at import — a variable the module reads
    missing in this worker's environment, say — failed every pending result of that
    feedback for good, in one pass of one worker deployed without it."""
    retry = spec.get("retry") or {}
    paths = [spec.get("fn"), spec.get("aggregate"), *(retry.get("retry_on") or []),
             *(retry.get("never_retry_on") or [])]
    modules = dict.fromkeys(p.partition(":")[0] for p in paths if isinstance(p, str))
    for module in filter(None, modules):  # (a malformed path: `from_spec` says so)
        try:
            importlib.import_module(module)
        except ImportError as exc:  # its code (or a package it needs) is not installed here
            return _NotHere(f"{what}: {type(exc).__name__}: {exc}")
        except (Exception, SystemExit) as exc:  # (a script's argparse exits at import)
            return _BrokenHere(f"{what}: importing {module!r} raised "
                               f"{type(exc).__name__}: {exc}")
    return None


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
            self._session._let_go(job.pending.result_id or "", job)
            self._session._outstanding_cond.notify_all()

    def stop(self) -> list[Job]:
        """Stop watching; results still awaited here stay in the database for later.
        Returns the jobs no longer waited for here: not those a worker of this session has
        taken over (they are in flight here, finished or released by close())."""
        self._stop.set()
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        session = self._session
        with session._outstanding_cond:
            left = [job for job in jobs
                    if session._let_go(job.pending.result_id or "", job) is not None]
            session._outstanding_cond.notify_all()
        return left

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._jobs)
            if not ids:
                continue
            try:
                rows, missing = self._session.store.results_final(ids)
                if missing:  # not stored yet (queued here), or deleted since
                    if self._session.flush(self._session.flush_timeout):
                        more, missing = self._session.store.results_final(list(missing))
                        rows += more
                    else:  # (still queued: nothing said about them this time)
                        missing = set()
            except Exception:
                logger.debug("scrutiny: polling deferred results failed", exc_info=True)
                continue
            for row in rows:
                with self._lock:
                    job = self._jobs.pop(row["result_id"], None)
                if job is not None:
                    self._session._finish(job, _rows.result_from_row(row))
            if missing:
                with self._lock:
                    gone = [job for rid in missing
                            if (job := self._jobs.pop(rid, None)) is not None]
                if gone:  # (a wait on them never ended: the session could not close)
                    logger.warning("scrutiny: %d result(s) awaited here were deleted from "
                                   "the database before they ended; no longer waiting for "
                                   "them", len(gone))
                    self._session._gone(gone, "its record was deleted from the database "
                                              "before this result ended")


