"""The session: where records go, how their feedback is evaluated, and how to read them back.

The application's thread only calls :meth:`Session.ingest`, which queues the record and
returns: the writer thread stores the record together with one pending result row per
feedback, then the dispatch policy starts evaluation; each end state is stored before its
future resolves and before any callback runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from scrutiny.core import _rows
from scrutiny.core._dispatch import (
    BackgroundDispatch,
    DeferredDispatch,
    DispatchPolicy,
    EvaluationLoop,
    Job,
    NoDispatch,
)
from scrutiny.core._errors import ConfigurationError, StorageError
from scrutiny.core._feedback import Feedback, remember_defined
from scrutiny.core._ids import new_hex_id
from scrutiny.core._mask import Mask, mask_record
from scrutiny.core._reading import RecordPage, SessionReading, as_names
from scrutiny.core._records import (
    LazyRecord,
    Record,
    _ResultSlot,
    materialized,
    on_a_thread_of_its_own,
)
from scrutiny.core._refs import NotReferenceable
from scrutiny.core._results import FeedbackResult, FeedbackStatus
from scrutiny.core._runtime import (
    Notifier,
    exit_stage,
    install_process_hooks,
    interrupted_at_exit,
    live_sessions,
    open_call_counters,
    settle_callbacks,
    wait_limit,
)
from scrutiny.core._writer import StorageWriter, WriteItem
from scrutiny.core.storage import (
    InsertRecord,
    MemoryStore,
    MigratePolicy,
    RenewLeases,
    Row,
    SQLStore,
    Store,
    UpdateResult,
    WriteOp,
    redact_url,
)

__all__ = ["DEFAULT_DATABASE_URL", "FeedbackMode", "RecordPage", "ResultListener", "Session"]

if TYPE_CHECKING:
    from scrutiny.dashboard._server import DashboardHandle

logger = logging.getLogger("scrutiny")

_R = TypeVar("_R", bound="Record | LazyRecord")

DEFAULT_DATABASE_URL = "sqlite:///scrutiny.sqlite"
ENV_DATABASE_URL = "SCRUTINY_DATABASE_URL"

MAX_SHED_KEPT = 100_000
"""The most feedbacks of results left pending over the backlog kept for this process's
own workers (`resume_pending()`); a worker loads older ones from their stored spec."""
RUNNING_AFTER = 0.25
"""Seconds an evaluation runs before its `running` status is stored."""

ResultListener = Callable[[FeedbackResult, Record], object]
"""Called with each stored end state (done, failed, skipped) and its record."""


MANY_OPEN = 8
"""Started sessions open at once beyond which a warning says to reuse or close them."""
_warned_many = False


_warned_urls: set[str] = set()


def _warn_if_many_open() -> None:
    """A session started and never closed keeps its threads (a writer, an evaluation loop,
    a sync pool of max_concurrency threads) for the life of the process: one per request
    without close() grew a server by some 35 threads a request."""
    global _warned_many
    sessions = [s for s in list(live_sessions) if not s.closed]
    open_now = len(sessions)
    urls = [s.store.url for s in sessions if "://" in s.store.url and
            not s.store.url.startswith("memory://")]  # (each memory session is its own)
    again = {url for url in urls if urls.count(url) > 1} - _warned_urls
    if again:
        # (a notebook cell that makes the session, run again: each run left one open)
        _warned_urls.update(again)
        logger.warning(
            "scrutiny: %d sessions are open in this process on %s, each with its own "
            "threads: reuse the one you have (it is thread-safe) or close() it before "
            "making another — a notebook cell that makes a Session leaves one more open "
            "each time it runs", urls.count(next(iter(again))),
            redact_url(next(iter(again))))
    if open_now > MANY_OPEN and not _warned_many:
        _warned_many = True
        logger.warning(
            "scrutiny: %d sessions are open in this process, each with its own threads; "
            "reuse one Session (it is thread-safe) or close() each when done — `with "
            "Session(...) as s:` does", open_now)


def _unstored_end(final: FeedbackResult) -> FeedbackResult:
    """What waiters are told when an end state could not be stored: not the end state
    itself (that would claim a stored result), but `failed` with what it was; the row stays
    unfinished in the database, and its lease, no longer renewed, runs out: then a worker or
    Session.resume_pending() evaluates it again (see `Session._heartbeat`)."""
    outcome = final.status.value + (f" with score {final.result:g}"
                                    if final.result is not None else "")
    return final.evolve(
        status=FeedbackStatus.FAILED, result=None,
        error=f"evaluated ({outcome}) but storing the result failed (see the log); the "
              f"database still holds it as pending, for a worker to evaluate again once "
              f"its lease runs out")


def feedback_list(feedbacks: Iterable[Feedback] | None) -> list[Feedback]:
    """The feedbacks given, as a list: a generator or another iterable was used up by the
    checks, and the record went on with no feedback at all (a session that counted one
    in-flight ingest for good, so that its waits never ended)."""
    if isinstance(feedbacks, (list, tuple)):
        return list(feedbacks)
    if feedbacks is None or isinstance(feedbacks, (Feedback, str)):
        raise ConfigurationError(
            f"feedbacks must be a list of Feedback objects, got {feedbacks!r}: pass "
            "[feedback] for one, or [] (the default) for none")
    try:
        return list(feedbacks)
    except TypeError:
        raise ConfigurationError(
            f"feedbacks must be a list of Feedback objects, got {type(feedbacks).__name__} "
            f"{feedbacks!r}") from None


def check_feedbacks(feedbacks: Sequence[Feedback], mode: FeedbackMode) -> None:
    """Raise :class:`ConfigurationError` unless `feedbacks` can run together in `mode`:
    each wired, each loadable by a worker in deferred mode, and no two with one name (the
    results table has one column per name: one of the two would be hidden)."""
    from scrutiny.core._frames import REASON_SUFFIX, RESERVED_NAMES, STATUS_SUFFIX

    if isinstance(feedbacks, Feedback):
        raise ConfigurationError("feedbacks must be a list of Feedback: pass [feedback]")
    seen: dict[str, Feedback] = {}
    for fb in feedbacks:
        if not isinstance(fb, Feedback):
            # (a plain function failed deep inside with "'function' object has no
            # attribute 'name'")
            what = getattr(fb, "__name__", None) or type(fb).__name__
            hint = (f"wrap it: Feedback({what}).on_output() (or .on_input(), .on(...))"
                    if callable(fb) else "make one with Feedback(fn).on_output()")
            raise ConfigurationError(f"feedbacks must be Feedback objects, got {fb!r}: {hint}")
        if fb.name in RESERVED_NAMES or fb.name.endswith((STATUS_SUFFIX, REASON_SUFFIX)):
            raise ConfigurationError(
                f"a feedback cannot be named {fb.name!r}: the records table and the "
                f"leaderboard have a column of that name (and '<name>{STATUS_SUFFIX}' and "
                f"'<name>{REASON_SUFFIX}' are each feedback's status and reason columns); "
                f"choose another name=")
        fb.check_wired()
        if mode is FeedbackMode.DEFERRED:
            fb.check_referenceable()
        if fb.name in seen:
            hint = (" (a lambda's name is 'feedback', whatever it does)"
                    if fb.name == "feedback" else "")
            raise ConfigurationError(
                f"two feedbacks are named {fb.name!r}{hint}: results are stored and shown "
                f"by name, so one would hide the other; give each its own name, e.g. "
                f"Feedback(fn, name='...')")
        seen[fb.name] = fb
    remember_defined(list(seen.values()))  # (their results left pending resume here)


class FeedbackMode(str, enum.Enum):
    """When feedback is evaluated."""

    WITH_APP_THREAD = "with_app_thread"
    """In the background; the application never waits (default)."""
    WITH_APP = "with_app"
    """In the background, and leaving a recording waits for its results."""
    NONE = "none"
    """Not at all: results are stored as `skipped` with the reason."""
    DEFERRED = "deferred"
    """By workers (`scrutiny worker`, `session.start_worker()`): the app only stores the
    record and its pending results."""

    def __str__(self) -> str:
        return self.value


_last_session: Session | None = None
_default_failure: tuple[float, Exception] | None = None
"""When creating the default session last failed, and why (see Session.current)."""
DEFAULT_SESSION_RETRY = 30.0
"""Seconds before a default session that could not be created is tried again."""
_OPEN_CALLS_WAIT = 1.0
"""Seconds `aclose` gives recorded calls still open to end before it closes."""


_RECORD_IDS_KEPT = 10_000
"""How many ids of records built by hand a session remembers (see _check_id_is_its_own)."""
_HURRIED_SECONDS = 2.0
"""What a close told to hurry still gives the rest: releasing the unfinished, storing."""


def _mask_before_use(record: Record | LazyRecord, mask: Mask) -> None:
    """Mask `record` before anything stores or judges it: a built one now, a lazy one as
    it is built (whichever thread builds it first)."""
    if isinstance(record, Record):
        mask_record(record, mask)
        return
    with record._lock:
        build = record._build
        if build is None:  # (built already: by a caller who looked at it first)
            assert record._record is not None
            mask_record(record._record, mask)
            return

        def masked_build(record_id: str) -> Record:
            built = build(record_id)
            mask_record(built, mask)
            return built

        record._build = masked_build


class Session(SessionReading):
    """Stores records and evaluates their feedback.

    Args:
        database_url: a SQLAlchemy URL. Default: the `SCRUTINY_DATABASE_URL` environment
            variable, else ``sqlite:///scrutiny.sqlite`` in the working directory.
            ``"memory://"`` keeps everything in this process only.
        store: a ready :class:`Store` instead of a URL (e.g. a shared ``MemoryStore``).
        feedback_mode: the default :class:`FeedbackMode` of recorders using this session.
        max_concurrency: the most feedback calls running at once.
        thread_pool_size: threads for plain (sync) feedback functions (default:
            `max_concurrency`).
        executor: run feedback calls on this `concurrent.futures.Executor` instead (e.g.
            ``distributed.Client(...).get_executor()``); results are still stored and
            announced by this process.
        feedback_timeout: seconds one feedback attempt may take unless the feedback sets
            its own `timeout`.
        flush_timeout: the longest `close()` (and interpreter exit) waits for unfinished
            work; what is left stays `pending` in the database for a worker.
        lease_seconds: how long the results this process evaluates stay reserved for it
            without a heartbeat; if it dies, workers take them over after this.
        max_queue_size: records and updates that may wait for the database; beyond it new
            ones are dropped, counted in :meth:`stats` and logged (the app is never blocked).
        max_backlog: the most evaluations this process holds, waiting or running (each
            keeps its record in memory); beyond it, the results of new records are stored
            `pending` and left to workers or :meth:`resume_pending` — memory stays bounded
            when feedbacks are slower than the traffic. Counted in :meth:`stats` and logged.
        max_payload_bytes: the largest stored input, output, context list, tag list,
            metadata, explanation or error; larger ones are cut, with an explicit
            truncation marker after what is kept.
        table_prefix: prefix of every table name.
        migrate: ``"upgrade"`` (default) brings an older database to the current schema;
            ``"refuse"`` raises instead (run ``scrutiny db upgrade`` yourself).
        on_result: listeners called with each stored end state and its record.
        mask: ``fn(text) -> text``, applied to every text of every record before it is
            stored or judged (input, output, contexts, error, tags, metadata, and each
            span's name, inputs, outputs, error, tags and metadata; other objects in their
            JSON form) and to its results' explanations and errors before they are stored,
            told or logged; see :mod:`scrutiny.core._mask`. E.g. a function replacing card
            numbers and e-mail addresses with placeholders.

    Raises:
        ConfigurationError: an invalid option or database URL.
    """

    def __repr__(self) -> str:
        state = ", closed" if self._state == "closed" else ""
        return (f"Session({self._redacted_url()!r}, "
                f"feedback_mode={self.feedback_mode.value!r}{state})")

    def __init__(
        self,
        database_url: str | None = None,
        *,
        store: Store | None = None,
        feedback_mode: FeedbackMode | str = FeedbackMode.WITH_APP_THREAD,
        max_concurrency: int = 32,
        thread_pool_size: int | None = None,
        executor: concurrent.futures.Executor | None = None,
        feedback_timeout: float | None = 120.0,
        flush_timeout: float = 10.0,
        lease_seconds: float = 60.0,
        max_queue_size: int = 100_000,
        max_backlog: int = 20_000,
        max_payload_bytes: int = 1_000_000,
        table_prefix: str = "scrutiny_",
        migrate: MigratePolicy = "upgrade",
        on_result: Sequence[ResultListener] | ResultListener = (),
        mask: Mask | None = None,
    ) -> None:
        global _last_session, _default_failure
        if database_url is not None and store is not None:
            raise ConfigurationError("give either database_url= or store=, not both")
        for name, whole in (("max_concurrency", max_concurrency),
                            ("thread_pool_size", thread_pool_size),
                            ("max_queue_size", max_queue_size),
                            ("max_backlog", max_backlog),
                            ("max_payload_bytes", max_payload_bytes)):
            if whole is not None and (isinstance(whole, bool) or not isinstance(whole, int)):
                raise ConfigurationError(
                    f"{name} must be a whole number, got {whole!r} ({type(whole).__name__})")
        for name, seconds in (("feedback_timeout", feedback_timeout),
                              ("flush_timeout", flush_timeout),
                              ("lease_seconds", lease_seconds)):
            if seconds is not None and (isinstance(seconds, bool)
                                        or not isinstance(seconds, int | float)
                                        or not math.isfinite(seconds)
                                        or seconds > threading.TIMEOUT_MAX):
                # (past TIMEOUT_MAX, every thread wait on it raised OverflowError)
                raise ConfigurationError(
                    f"{name} must be a finite number of seconds, at most "
                    f"{threading.TIMEOUT_MAX:.0f}, got {seconds!r}")
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if thread_pool_size is not None and thread_pool_size < 1:
            raise ConfigurationError(f"thread_pool_size must be >= 1, got {thread_pool_size}")
        if feedback_timeout is not None and feedback_timeout <= 0:
            raise ConfigurationError("feedback_timeout must be > 0 seconds (or None)")
        if flush_timeout < 0:
            raise ConfigurationError("flush_timeout must be >= 0 seconds")
        if lease_seconds < 1:
            raise ConfigurationError("lease_seconds must be >= 1")
        if max_backlog < 1:
            raise ConfigurationError(f"max_backlog must be >= 1, got {max_backlog}")
        if max_queue_size < 1 or max_payload_bytes < 1024:
            raise ConfigurationError("max_queue_size must be >= 1 and max_payload_bytes "
                                     ">= 1024")
        if migrate not in ("upgrade", "refuse"):
            raise ConfigurationError("migrate must be 'upgrade' or 'refuse'")
        if executor is not None and not hasattr(executor, "submit"):
            raise ConfigurationError("executor must be a concurrent.futures.Executor")
        if mask is not None and not callable(mask):
            raise ConfigurationError(f"mask must be a function taking a text and returning "
                                     f"a text, got {type(mask).__name__}")
        self.mask = mask
        self.feedback_mode = _mode(feedback_mode)
        self.max_concurrency = max_concurrency
        self.thread_pool_size = thread_pool_size or max_concurrency
        self.executor = executor
        self.feedback_timeout = feedback_timeout
        self.flush_timeout = flush_timeout
        self.lease_seconds = lease_seconds
        self.max_queue_size = max_queue_size
        self.max_backlog = max_backlog
        self._shed = 0  # results left pending because the backlog was full
        self._shed_open = 0  # of those, left since the last resume_pending() that ended
        # Their feedbacks, by result id, for a worker of this process (resume_pending()):
        # one not loadable elsewhere (a lambda, a closure) failed "cannot be loaded".
        self._shed_feedbacks: collections.OrderedDict[str, Feedback] = \
            collections.OrderedDict()
        self.max_payload_bytes = max_payload_bytes
        # The ids of the records built by hand this session was given lately, with their
        # app and start (see _check_id_is_its_own).
        self._record_ids: collections.OrderedDict[str, tuple[str, float]] = (
            collections.OrderedDict())
        self._record_ids_lock = threading.Lock()
        # (one listener given alone: `on_result=print` failed with "not iterable")
        self._listeners: list[ResultListener] = (
            [on_result] if callable(on_result) else list(on_result))
        if store is None:
            url = database_url or os.environ.get(ENV_DATABASE_URL) or DEFAULT_DATABASE_URL
            store = MemoryStore() if url == "memory://" else SQLStore(
                url, table_prefix=table_prefix, migrate=migrate)
        self.store: Store = store
        self._compress_spans = getattr(getattr(store, "engine", None), "name", None) == "sqlite"
        """Long span trees are stored compressed (see _rows.COMPRESS_SPANS_OVER)."""
        self._lock = threading.Lock()
        self._inflight: dict[str, Job] = {}
        # Of those, the ones evaluated in this process (they hold a lease: a deferred result
        # only waited on here holds none). Workers size their claims by it.
        self._evaluating = 0
        self._left_pending = 0  # results close() left unfinished (pending in the database)
        self._hurried = False  # close() told to stop waiting (see _cut_close_short)
        self._settled = False  # close() settled what it left: later jobs are not held
        self._exit_deadline: float | None = None  # (see _drain)
        self._exit_began: float | None = None
        self._deleted_said = -math.inf  # (see _overtaken)
        self._retry_feedbacks: dict[str, Feedback] = {}  # (see retry_failed)
        self._warmed = False  # its threads started ahead of its first record (see _warm)
        self._unstored_ends = 0  # end states told to waiters but not stored (see _finish)
        self._unmaterialized = 0  # accepted records whose results are not made yet
        # On the evaluation loop only: evaluations started, not ended, running not stored.
        self._started: dict[Job, tuple[float, datetime]] = {}
        self._running_sweep: asyncio.TimerHandle | None = None
        self._outstanding_lock = threading.RLock()  # the condition's: C-level `with` on hot paths
        self._outstanding_cond = threading.Condition(self._outstanding_lock)
        self._state = "unstarted"  # -> started -> closed
        self._pid = os.getpid()
        self._new_identity()
        self._writer: StorageWriter | None = None
        self._loop: EvaluationLoop | None = None
        self._notifier: Notifier | None = None
        self._watcher: Any = None
        self._workers: list[Any] = []
        self._higher_is_better: dict[str, bool] = {}
        self._policies: dict[FeedbackMode, DispatchPolicy] = {
            FeedbackMode.WITH_APP_THREAD: BackgroundDispatch(self._evaluation_loop,
                                                             "with_app_thread"),
            FeedbackMode.WITH_APP: BackgroundDispatch(self._evaluation_loop, "with_app"),
            FeedbackMode.NONE: NoDispatch(),
            FeedbackMode.DEFERRED: DeferredDispatch(self._watch),
        }
        _last_session = self
        _default_failure = None

    def _new_identity(self) -> None:
        self.owner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._token = uuid.uuid4().hex

    @property
    def database_url(self) -> str:
        """The database's URL as it may be shown: a password in it (or a ``?password=``)
        is ``***``, as in SQLAlchemy's ``str(engine.url)`` (it was returned in clear, and
        printed, logged or shown by whatever showed it)."""
        url = self.store.url
        if "://" not in url:
            return url
        shown = self._redacted_url()
        return shown if "***" in shown else url  # (nothing hidden: the URL as given)

    @classmethod
    def current(cls) -> Session:
        """The session created last in this process (a default one is created if none was).

        Once that session is closed it stays the current one — recorders that use it
        store nothing and say so — rather than a fresh default session quietly taking
        over, on whatever database the default is.
        """
        last = _last_session
        if last is not None:
            return last
        global _default_failure
        failed = _default_failure
        if failed is not None and time.monotonic() - failed[0] < DEFAULT_SESSION_RETRY:
            raise failed[1].with_traceback(None)
        try:
            return cls()
        except Exception as exc:
            # Every recorded call made it again, on the app's thread (a web server's event
            # loop): an unreachable database cost each call its connect timeout, twice.
            _default_failure = (time.monotonic(), exc)
            logger.error("scrutiny: the default session could not be created (%s); calls "
                         "recorded meanwhile are not stored, and it is tried again in %g s. "
                         "The application is not affected", exc, DEFAULT_SESSION_RETRY)
            raise

    @staticmethod
    def latest() -> Session | None:
        """The session created last in this process, if any (None: none yet)."""
        return _last_session

    # ------------------------------------------------------------------ lifecycle
    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def _start(self) -> StorageWriter:
        if self._pid != os.getpid():
            self._after_fork()
        writer = self._writer
        if writer is not None:
            return writer
        with self._lock:
            if self._writer is None:
                if self._state == "closed":
                    raise RuntimeError("session is closed")
                if sys.is_finalizing():  # (a thread started now never runs: start() hangs)
                    raise RuntimeError("the interpreter is shutting down: the session can "
                                       "no longer start")
                install_process_hooks()
                self._notifier = Notifier()
                self._writer = StorageWriter(
                    self.store, max_queue=self.max_queue_size,
                    idle_interval=self.lease_seconds / 3, on_idle=self._heartbeat)
                self._state = "started"
                live_sessions.add(self)
                _warn_if_many_open()
            return self._writer

    def _warm(self, mode: FeedbackMode | None) -> None:
        """Start the threads its records will need (the writer, the callback thread and,
        unless they are left to workers, the evaluation loop) when a recorded call begins,
        ahead of its record: a call still open when the interpreter exits is ended and
        stored then, when Python 3.12+ starts no new thread, and a session whose first
        record that was lost it with a traceback. Never raises."""
        if self._warmed or self._state == "closed" or sys.is_finalizing():
            return
        try:
            self._start()
            if _mode(mode or self.feedback_mode) in (FeedbackMode.WITH_APP_THREAD,
                                                     FeedbackMode.WITH_APP):
                self._evaluation_loop()
            self._warmed = True
        except Exception:
            logger.debug("scrutiny: starting the session's threads early failed",
                         exc_info=True)

    def _evaluation_loop(self) -> EvaluationLoop:
        loop = self._loop
        if loop is not None:
            return loop
        self._start()
        with self._lock:
            if self._loop is None:
                self._loop = EvaluationLoop(
                    max_concurrency=self.max_concurrency,
                    thread_pool_size=self.thread_pool_size,
                    default_timeout=self.feedback_timeout, executor=self.executor,
                    on_running=self._on_running, on_final=self._on_final, mask=self.mask)
            return self._loop

    def _heartbeat(self) -> list[WriteOp]:
        """Keep the leases of the results this process evaluates (runs on the writer).

        Only those it still waits for here: a result whose end state the writer gave up
        storing (see `StorageWriter`) is let go, and stays `pending` in the database. Its
        lease, renewed with every other one, kept it from any worker until the process
        exited; now it runs out (within `lease_seconds`) and a worker evaluates it again."""
        if not self._evaluating:  # (the jobs here that hold a lease)
            return []
        with self._outstanding_lock:
            held = tuple(result_id for result_id, job in self._inflight.items()
                         if result_id and job.lease_token is not None)
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.lease_seconds)
        return [RenewLeases(self.owner_id, expires, held)]

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's threads, work and connections."""
        self._pid = os.getpid()
        self._record_ids_lock = threading.Lock()
        self._new_identity()
        self._writer = None
        self._loop = None
        self._warmed = False
        self._notifier = None
        # The parent's evaluations go on in the parent: a wait on one of its records in
        # this child waited for good. It ends now with the result pending, as the database
        # keeps it until the parent stores its end (their callbacks stay the parent's).
        self._resolve_pending(list(self._inflight.values()), released=False)
        self._watcher = None
        self._workers = []
        self._inflight = {}
        self._evaluating = 0
        self._unstored_ends = 0
        self._unmaterialized = 0
        self._started = {}
        self._running_sweep = None
        self._outstanding_lock = threading.RLock()  # the condition's: C-level `with` on hot paths
        self._outstanding_cond = threading.Condition(self._outstanding_lock)
        self._lock = threading.Lock()
        if self._state == "started":
            self._state = "unstarted"
        after_fork = getattr(self.store, "after_fork", None)
        if after_fork is not None:
            after_fork()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float | None = None) -> bool:
        """:meth:`close` for code on an event loop (a web app's shutdown, a notebook):
        it waits on a thread of its own, so the loop goes on meanwhile — ``close()`` there
        held the loop for up to `timeout` while evaluations finished.

        First it gives recorded calls still open up to a second (within `timeout`) to end:
        a server's shutdown cancels its requests' tasks and runs its own shutdown code
        (this) before they have run their cancellation, and their `cancelled` records,
        made a moment later, found the session closed and were lost.
        """
        limit = self.flush_timeout if timeout is None else wait_limit(timeout)
        began = time.monotonic()
        deadline = began + min(_OPEN_CALLS_WAIT, limit / 2)
        await asyncio.sleep(0)  # (the calls' tasks run their cancellation now, mostly)
        while time.monotonic() < deadline:  # (they end on any thread: counted, not awaited)
            if not self._open_calls():
                break
            await asyncio.sleep(0.005)
        left = max(0.0, limit - (time.monotonic() - began))
        return await on_a_thread_of_its_own(self.close, left)

    def _open_calls(self) -> int:
        """Recorded calls under way whose record comes to this session."""
        total = 0
        for count in open_call_counters:
            try:
                total += count(self)
            except Exception:  # (a handler's dict changed meanwhile: a count, not a promise)
                logger.debug("scrutiny: counting open calls failed", exc_info=True)
        return total

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record and update is stored; False on timeout."""
        writer = self._writer
        return True if writer is None else writer.flush(wait_limit(timeout))

    def wait_for_feedback(self, timeout: float | None = None) -> bool:
        """Wait until every feedback accepted so far has a stored end state, and the
        callbacks, listeners and feedback events of those results have run.

        In deferred mode this waits for the workers. Returns True when all are done;
        False when the timeout ran out first (what is left stays pending or running and
        will still be stored), when :meth:`close` left some unfinished, when some were
        left pending over `max_backlog` (until :meth:`resume_pending` evaluated them), or
        when some end
        state (or its record) could not be stored (a full queue, a refused write: see
        :meth:`stats`) — those results are still `pending` in the database.
        """
        timeout = wait_limit(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_outstanding(deadline) or self._left_pending:
            return False
        if self._unstored_ends or self._shed_open:
            return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.flush(remaining):
            return False
        # Their callbacks, listeners and feedback events have run too (queued once their
        # end was stored, before the flush returned): a script that waited, then exited,
        # lost what its forwarders had not sent yet.
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return settle_callbacks(self._notifier, remaining)

    def _drain(self, began: float | None = None) -> None:
        """(At interpreter exit, before executors stop taking work and the app's threads
        are joined.) Store what is queued and let this process's evaluations under way
        finish, within `flush_timeout` from `began` (when the exit began: every session
        drains within the same span, not one after another); the session stays open for
        what the app's threads still do (:meth:`close` follows once they ended)."""
        writer = self._writer
        if writer is None or self._state != "started" or self._pid != os.getpid():
            return
        began = self._exit_began = time.monotonic() if began is None else began
        deadline = self._exit_deadline = began + _exit_wait(self.flush_timeout)
        writer.flush(max(0.0, deadline - time.monotonic()))
        if self._loop is not None and self._watcher is None:  # (not workers' results)
            self._wait_outstanding(deadline)
        writer.flush(max(0.0, deadline - time.monotonic()))

    def _exit_timeout(self) -> float | None:
        """The timeout of the close at exit: what is left of `flush_timeout` after the
        drain (see :meth:`_drain`), with a second or so for what the app's threads did
        since (the same stuck evaluation was waited for twice: exit took twice as
        long)."""
        if self._exit_deadline is None:
            return None
        return max(min(1.0, self.flush_timeout), self._exit_deadline - time.monotonic())

    def close(self, timeout: float | None = None) -> bool:
        """Finish or hand over everything, then release threads and connections.

        Waits about `timeout` seconds (default: `flush_timeout`) at most in all (a backlog
        of thousands of evaluations adds a fraction of a second to hand them over).
        Records are stored first; evaluations still unfinished near the deadline are
        cancelled and their results released as `pending` in the database, for any worker
        or a later :meth:`resume_pending`. Idempotent.

        Results callbacks, listeners and feedback events queued by then run within the
        same `timeout`.

        Returns:
            True when nothing was left unfinished, every write was stored and every
            callback ran (False also when the database refused writes or the queue dropped
            some: see :meth:`stats`).
        """
        with self._lock:
            if self._state == "closed":
                return True
            started = self._state == "started" and self._pid == os.getpid()
            self._state = "closed"
        live_sessions.discard(self)
        timeout = self.flush_timeout if timeout is None else wait_limit(timeout)
        began = time.monotonic()
        deadline = began + timeout
        clean = True
        still_open = self._open_calls()
        if still_open:
            clean = False
            logger.warning(
                "scrutiny: %d recorded call(s) were still running when the session (%s) "
                "closed: their records will not be stored. Close it once the app's calls "
                "have ended (a web server's shutdown: after its requests)", still_open,
                self._redacted_url())
        workers = list(self._workers)
        for worker in workers:
            worker.stop_claiming()
        # A worker thread may be between a claim and handing the rows to the evaluation
        # loop: wait for it (bounded) before the loop closes, so that what it claimed is
        # either in flight here (finished or released below) or given back by the worker.
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if started and self._writer is not None:
            writer = self._writer
            clean = writer.flush(max(0.0, deadline - time.monotonic()))
            left: list[Job] = []  # unfinished here: their waits end with them pending
            if self._watcher is not None:  # deferred results are the workers' business
                left += self._watcher.stop()
            # What is unfinished at the deadline is cancelled and released as pending: keep
            # part of the time for that (it ran up to a second and a half past the timeout).
            reserve = min(1.0, timeout / 4)
            clean = self._wait_outstanding(deadline - reserve) and clean
            if self._hurried:  # what is left is released now, not at the deadline
                deadline = min(deadline, time.monotonic() + _HURRIED_SECONDS)
            if self._loop is not None:
                self._loop.close(max(0.05, (deadline - time.monotonic()) / 2))
            with self._outstanding_cond:
                unfinished = list(self._inflight.values())
            left += unfinished
            released = [job for job in unfinished if job.lease_token is not None]
            if released:
                writer.submit(WriteItem(lambda: [_release(job) for job in released]))
            if unfinished:
                clean = False
                logger.warning(
                    "scrutiny: %d feedback result(s) had no stored end state after %.1fs%s "
                    "(the evaluation unfinished, or its end still queued for the database); "
                    "those whose end is not stored stay pending in %s for a worker or "
                    "Session.resume_pending()",
                    len(unfinished), time.monotonic() - (self._exit_began or began),
                    " (told to stop again)" if self._hurried and exit_stage() == 0 else "",
                    self._redacted_url())
            clean = writer.close(max(0.1, deadline - time.monotonic())) and clean
            if writer.failed or writer.dropped:  # stored nothing of those: not clean
                clean = False
            # Records stored after the list above was taken — given to the session while
            # it closed (a web server's requests still running), or queued before and
            # written late — with the loop closed: their evaluations never started and
            # their waits never ended. Records written from now on are not held (see
            # _materialized): they are stored pending, free for a worker.
            seen = {id(job) for job in unfinished}
            with self._outstanding_cond:
                self._settled = True
                late = [job for job in self._inflight.values() if id(job) not in seen]
            if late:
                clean = False
                left += late
                logger.warning(
                    "scrutiny: %d record(s) were stored while the session closed (given to "
                    "it meanwhile, or queued before and written late) with their feedbacks "
                    "pending; a worker or Session.resume_pending() takes them once their "
                    "lease (%g s) runs out", len(late), self.lease_seconds)
            queued = writer.backlog
            if queued:
                clean = False
                logger.warning(
                    "scrutiny: close() ran out of time after %.1fs with %d write(s) still "
                    "queued for %s: they are stored in the background while the process "
                    "runs (their feedbacks pending, free for a worker or "
                    "Session.resume_pending()); what is not stored when it exits is lost. "
                    "Give close() (or flush_timeout, for the close at exit) more time",
                    time.monotonic() - began, queued, self._redacted_url())
            self._left_pending = len(left)
            self._settle_unfinished(left)
            if self._notifier is not None:  # (what is left of the timeout: it gave the
                # callbacks half a second at most, and dropped the rest without a word)
                owed = self._notifier.close(max(0.05, deadline - time.monotonic()))
                if owed:
                    clean = False
                    logger.warning(
                        "scrutiny: close() ran out of time after %.1fs with %d callback(s) "
                        "not yet run (results callbacks, listeners, feedback events): they "
                        "run in the background while the process runs, and are lost when "
                        "it exits. Keep callbacks short, or give close() (or flush_timeout, "
                        "for the close at exit) more time", time.monotonic() - began, owed)
        self.store.close()
        return clean

    def _settle_unfinished(self, jobs: list[Job]) -> None:
        """(Closing, once their release is stored.) Nothing in this process will finish
        these any more: their records' waits and callbacks get them as they are in the
        database, `pending` (a wait without a timeout blocked for ever)."""
        with self._outstanding_cond:
            for job in jobs:
                self._let_go(job.pending.result_id or "")
            self._outstanding_cond.notify_all()
        self._resolve_pending(jobs, released=True)

    def _resolve_pending(self, jobs: list[Job], *, released: bool) -> None:
        """End the waits on `jobs` with their results as the database keeps them, `pending`
        (`released`: the claim's attempt given back, as `_release` stores it)."""
        self._tell(jobs, [job.pending.evolve(status=FeedbackStatus.PENDING,
                                             attempts=max(0, job.pending.attempts - 1))
                          if released else job.pending for job in jobs])

    def _tell(self, jobs: list[Job], ends: list[FeedbackResult]) -> None:
        """End the waits on `jobs` (held here no longer) with `ends`."""
        notifier = self._notifier
        for job, end in zip(jobs, ends, strict=True):
            slot = job.record._slots.get(job.feedback)
            if slot is None:
                continue
            for fn in slot.finish(end):
                if notifier is not None:
                    notifier.call(fn)

    def _hold(self, job: Job) -> None:
        """(Under `_outstanding_cond`.) Wait here for `job`'s end state, in place of any
        job of the same result."""
        key = job.pending.result_id or ""
        old = self._inflight.get(key)
        self._inflight[key] = job
        self._evaluating += ((job.lease_token is not None)
                             - (old is not None and old.lease_token is not None))

    def _let_go(self, result_id: str, job: Job | None = None) -> Job | None:
        """(Under `_outstanding_cond`.) Stop waiting for this result here — only when the
        job waited for is `job`, if given (a worker of this session may have taken it
        over). Returns the job let go."""
        held = self._inflight.get(result_id)
        if held is None or (job is not None and held is not job):
            return None
        del self._inflight[result_id]
        if held.lease_token is not None:
            self._evaluating -= 1
        return held

    def _wait_outstanding(self, deadline: float | None) -> bool:
        try:
            with self._outstanding_cond:
                while self._inflight or self._unmaterialized:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if (remaining is not None and remaining <= 0) or self._hurried:
                        return False
                    self._outstanding_cond.wait(remaining)
        except KeyboardInterrupt:  # (Ctrl-C while closing: what is left is released now)
            self._hurried = True
            if exit_stage() == 0 and not _exiting():
                raise
            interrupted_at_exit()  # (at exit: no caller to reach; every session hurries)
            return False
        return True

    def _cut_close_short(self) -> None:
        """Make a :meth:`close` under way stop waiting for unfinished evaluations: they are
        cancelled and released as `pending` now, not at its deadline (a worker told to
        stop a second time). Safe to call from a signal handler."""
        self._hurried = True
        with self._outstanding_cond:
            self._outstanding_cond.notify_all()

    def _redacted_url(self) -> str:
        from scrutiny.core.storage import redact_url

        return redact_url(self.store.url) if "://" in self.store.url else self.store.url

    # ------------------------------------------------------------------ listeners
    def add_listener(self, listener: ResultListener) -> None:
        """Call `listener(result, record)` with every stored end state from now on (on
        the session's callback thread, in turn with its other callbacks: keep it short; an
        ``async def`` is run to its end there)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ResultListener) -> None:
        self._listeners.remove(listener)

    def stats(self) -> dict[str, int]:
        """Counters: queued writes, dropped and failed writes, unfinished evaluations."""
        w = self._writer
        return {
            "write_backlog": w.backlog if w else 0,
            "dropped_writes": w.dropped if w else 0,
            "failed_writes": w.failed if w else 0,
            "unfinished_feedback": len(self._inflight),
            "left_pending_over_backlog": self._shed,
        }

    # ------------------------------------------------------------------ ingest
    def check_feedbacks(self, feedbacks: Sequence[Feedback],
                        mode: FeedbackMode | str | None = None) -> None:
        """Raise :class:`ConfigurationError` if a feedback cannot run in `mode`.

        Recorders call this when they are created: every feedback must be wired, and in
        deferred mode each must be loadable by a worker (no lambdas or closures).
        """
        check_feedbacks(feedbacks, _mode(mode or self.feedback_mode))

    def ingest(
        self,
        record: _R,
        feedbacks: Iterable[Feedback] = (),
        *,
        mode: FeedbackMode | str | None = None,
        listeners: Sequence[ResultListener] = (),
    ) -> _R:
        """Store `record` and evaluate `feedbacks` on it; returns at once.

        It only creates the pending results in memory and queues the record for the writer
        thread (an integration may hand over a :class:`LazyRecord`, assembled there too).

        Raises:
            ConfigurationError: the feedbacks cannot run together (two with one name, one
                not wired, a closure in deferred mode) — checked before anything is
                queued. Past that check it never raises: a failure inside Scrutiny is
                logged and the caller carries on.
        """
        if not isinstance(record, Record | LazyRecord):  # (a dict failed on the writer
            # thread, or raised AttributeError 'record_id', and was not stored)
            raise ConfigurationError(
                f"session.ingest takes a Record, e.g. Record(app_name='qa', "
                f"app_version='v1', input=..., output=...); got {type(record).__name__}"
                + (": Record(**row) makes one of a dict with those keys"
                   if isinstance(record, Mapping) else ""))
        if sys.is_finalizing():  # (from a __del__ as the interpreter tears down)
            logger.error("scrutiny: record %s was given as the interpreter shuts down: the "
                         "session can no longer store it", record.record_id)
            return record
        resolved = _mode(mode or self.feedback_mode)
        feedbacks = feedback_list(feedbacks)
        check_feedbacks(feedbacks, resolved)
        if isinstance(record, Record) and (record._slots or record._pending_init):
            slots = record._result_slots()
            had = {str(getattr(fb, "name", "")): slot.current for fb, slot in slots.items()}
            again = sorted(set(had) & {fb.name for fb in feedbacks})
            if again:
                failed = all(had[name].status is FeedbackStatus.FAILED for name in again)
                raise ConfigurationError(
                    f"record {record.record_id} already has a result of {again}: give it "
                    "only feedbacks it has not been evaluated with (a second result under "
                    "one name would hide the first)" + (
                        "; a result that failed is evaluated again, in place, by "
                        "session.retry_failed([feedback])" if failed else ""))
        if isinstance(record, Record):
            self._check_id_is_its_own(record)
        try:
            if isinstance(record, Record):
                record._hold_values()
            self._ingest(record, feedbacks, resolved, listeners)
        except Exception:
            logger.exception("scrutiny: could not accept record %s; the application is "
                             "not affected", record.record_id)
        return record

    def _check_id_is_its_own(self, record: Record) -> None:
        """Refuse a record whose id this session was given for another record (a request id
        used again on a retry, say): the store kept the first, dropped the second without a
        word and stored the second's scores under the first. The same record given again
        (to add feedbacks; also as read back from storage) is the same app and start."""
        seen = self._record_ids
        mine = (record.app_id, record.start_time)
        with self._record_ids_lock:
            known = seen.setdefault(record.record_id, mine)
            if known is mine and len(seen) > _RECORD_IDS_KEPT:
                seen.popitem(last=False)
        if known[0] != mine[0] or abs(known[1] - mine[1]) > 1e-3:
            raise ConfigurationError(
                f"record_id {record.record_id!r} was already given to this session for "
                f"another record (app {known[0]!r}); it keeps the first: give each record "
                "an id of its own (or leave record_id out for a fresh one)")

    def _ingest(self, record: Record | LazyRecord, feedbacks: Sequence[Feedback],
                mode: FeedbackMode, listeners: Sequence[ResultListener],
                dispose: object = None) -> None:
        """(`dispose`: an object whose last reference the caller hands over, to be freed
        on the writer thread rather than the application's.)"""
        # A session closed before it ever started has no writer to refuse the record:
        # its results end as a started-then-closed session's do (they were not there).
        unstarted_closed = self._writer is None and self._state == "closed"
        writer = None if unstarted_closed else self._start()
        if self.mask is not None:
            _mask_before_use(record, self.mask)
        ingest = _Ingest(self, record, feedbacks, mode, listeners, dispose)
        if feedbacks:
            if isinstance(record, LazyRecord):
                record.on_build(ingest.attach)
            elif record._pending_init is None:
                record._pending_init = ingest.materialize
            else:  # the same record given again, before its first results were made
                record._pending_init = _BothInits(record, record._pending_init,
                                                  ingest.materialize)
            with self._outstanding_lock:
                self._unmaterialized += 1
        if writer is None:
            logger.error("scrutiny: the session (%s) is closed; record %s given to it is not "
                         "stored. The application is not affected.", self._redacted_url(),
                         record.record_id)
            ingest.after_commit(False)
            return
        if writer.submit(WriteItem(ingest.prepare, ingest.after_commit)) and feedbacks:
            # evaluation may start before the writer gets to the record (its updates are
            # queued behind the record's insert, so nothing is stored out of order)
            self._policies[mode].start_soon(ingest.start)

    def _materialized(self, jobs: list[Job]) -> bool:
        """An ingest made its jobs (on whichever thread asked first). False when the
        session has closed and settled what it left unfinished: nothing here evaluates
        them any more, and they are not held (a record still queued when close() ran out,
        written since: a wait on it blocked for ever)."""
        with self._outstanding_cond:
            self._unmaterialized -= 1
            self._outstanding_cond.notify_all()
            if self._settled:
                return False
            for job in jobs:
                self._hold(job)
        return True

    def _backlog_full(self, adding: int) -> bool:
        """Whether `adding` more evaluations would hold more than `max_backlog` (read
        without the lock: a bound, not an exact count)."""
        return len(self._inflight) + adding > self.max_backlog

    def _leave_pending(self, jobs: list[Job]) -> None:
        """(The backlog is full.) These stay `pending` in the database for a worker; their
        waits and callbacks get them so at once."""
        with self._outstanding_lock:
            self._shed += len(jobs)
            self._shed_open += len(jobs)
            shed = self._shed
            kept = self._shed_feedbacks
            for job in jobs:
                kept[job.pending.result_id or ""] = job.feedback
            while len(kept) > MAX_SHED_KEPT:  # (the oldest: a worker loads theirs by spec)
                kept.popitem(last=False)
        if shed == len(jobs) or shed // 1000 != (shed - len(jobs)) // 1000:
            logger.warning(
                "scrutiny: evaluation is falling behind: %d evaluations are waiting or "
                "running in this process (max_backlog=%d), so the results of new records "
                "are stored pending and left for a worker (scrutiny worker, for importable "
                "feedbacks) or session.resume_pending() — %d so far. Raise max_concurrency "
                "or max_backlog, or run workers. The app is not affected.",
                len(self._inflight), self.max_backlog, shed)
        self._resolve_pending(jobs, released=False)

    def _shed_feedback(self, result_ids: list[str]) -> dict[str, Feedback]:
        """The feedbacks of these results, for those left pending here over the backlog
        (each once: a claim takes it)."""
        with self._outstanding_lock:
            kept = self._shed_feedbacks
            if not kept:
                return {}
            return {rid: fb for rid in result_ids if (fb := kept.pop(rid, None)) is not None}

    # ------------------------------------------------------------------ results (loop side)
    def _on_running(self, job: Job, started_at: datetime) -> None:
        """Runs on the evaluation loop when an evaluation gets its slot. Its `running` status
        is stored once it has run RUNNING_AFTER seconds: quick ones go straight from pending
        to their end state without a write in between. One sweep timer serves every
        evaluation in flight (a timer each cost more than a quick evaluation itself).
        A row a worker claimed is `pending` until then too (held by its lease): a worker
        claims more than it evaluates at once, and those waiting for a slot have not
        started."""
        if self._writer is None:
            return
        self._started[job] = (time.monotonic(), started_at)  # start order = insertion order
        if self._running_sweep is None:
            self._running_sweep = asyncio.get_running_loop().call_later(
                RUNNING_AFTER, self._sweep_running)

    def _sweep_running(self) -> None:
        """On the loop: store `running` for the evaluations started RUNNING_AFTER ago."""
        self._running_sweep = None
        now = time.monotonic()
        started = self._started
        while started:
            job, (began, started_at) = next(iter(started.items()))
            if now - began < RUNNING_AFTER:
                self._running_sweep = asyncio.get_running_loop().call_later(
                    began + RUNNING_AFTER - now, self._sweep_running)
                return
            del started[job]
            # (a claimed row keeps its count of claims: max_claims reads it)
            self._store_running(job, job.pending.evolve(
                status=FeedbackStatus.RUNNING, started_at=started_at,
                attempts=max(1, job.pending.attempts)))

    def _store_running(self, job: Job, running: FeedbackResult) -> None:
        writer = self._writer
        if writer is None:
            return
        slot = job.record._slots.get(job.feedback)
        writer.submit(WriteItem(
            lambda: [UpdateResult(running.result_id or "",
                                  _rows.result_update_values(running, max_bytes=1_000_000),
                                  from_statuses=(FeedbackStatus.PENDING.value,),
                                  lease_token=job.lease_token)],
            lambda ok: slot.update(running) if slot is not None and ok else None,
        ))

    def _on_final(self, job: Job, final: FeedbackResult, *, evaluated: bool = True) -> None:
        """Store `final` (then tell). `evaluated=False`: a claim ended without evaluating
        (abandoned, its feedback or record missing): only earlier claims count as attempts."""
        self._started.pop(job, None)
        if job.pending.attempts:  # claimed by a worker: count earlier claims too
            final = final.evolve(attempts=job.pending.attempts - 1 + (
                max(final.attempts, 1) if evaluated else 0))
        writer = self._writer
        if writer is None:
            self._finish(job, final)
            return
        max_bytes = self.max_payload_bytes
        written: list[UpdateResult] = []

        def prepare() -> list[UpdateResult]:
            written[:] = [UpdateResult(final.result_id or "",
                                       _rows.result_update_values(final, max_bytes=max_bytes),
                                       lease_token=job.lease_token)]
            return written

        def after_commit(ok: bool) -> None:
            if not ok:
                self._finish(job, _unstored_end(final), stored=False)
            elif written and written[0].refused:
                self._overtaken(job, final, written[0].stored)
            else:
                self._finish(job, final)

        writer.submit(WriteItem(prepare, after_commit))

    def _overtaken(self, job: Job, final: FeedbackResult, row: Row | None) -> None:
        """(After the commit.) This end state was not stored: its row had been taken over
        (the lease ran out while this process evaluated it: paused, or too busy for
        `lease_seconds`, and a worker claimed it) or deleted. Waiters are told what the
        database holds, never what it refused."""
        with self._outstanding_cond:
            if self._inflight.get(job.pending.result_id or "") is not job:
                return  # (its record was refused: its waiters were told so)
        if row is None:
            # (once a minute, then at debug: a retention run during a big batch logged a
            # line per result)
            now = time.monotonic()
            loud = now - self._deleted_said >= 60.0
            if loud:
                self._deleted_said = now
            (logger.warning if loud else logger.debug)(
                "scrutiny: feedback %r of record %s was not stored: its record was deleted "
                "from the database meanwhile (said once a minute; the others at debug)",
                final.feedback_name, final.record_id)
            self._gone([job], "its record was deleted from the database before this result "
                              "was stored")
            return
        stored = _rows.result_from_row(row)
        logger.warning(
            "scrutiny: the lease on feedback %r of record %s ran out while this process "
            "evaluated it (paused, or busier than lease_seconds=%s allows) and another "
            "process took it over; its result (%s) is kept, this one (%s) is not stored",
            final.feedback_name, final.record_id, self.lease_seconds, stored.status.value,
            final.status.value)
        if stored.is_final:
            self._finish(job, stored)
        else:  # (still being evaluated there: follow it as a deferred result)
            self._watch([job])

    def _gone(self, jobs: list[Job], why: str) -> None:
        """Stop waiting for these results: their rows are no longer in the database. Their
        waits end with them `pending`, saying why (not an end state nobody stored)."""
        with self._outstanding_cond:
            for job in jobs:
                self._let_go(job.pending.result_id or "", job)
            self._outstanding_cond.notify_all()
        notifier = self._notifier
        for job in jobs:
            slot = job.record._slots.get(job.feedback)
            if slot is None:
                continue
            for fn in slot.finish(job.pending.evolve(status=FeedbackStatus.PENDING,
                                                     error=why)):
                if notifier is not None:
                    notifier.call(fn)

    def _finish(self, job: Job, final: FeedbackResult, *, stored: bool = True) -> None:
        """Runs after the end state is stored: resolve the future, then notify (once).

        `stored=False`: it could not be stored (nor the record, maybe); waiters are told
        so and no longer wait, but :meth:`wait_for_feedback` says False from now on."""
        with self._outstanding_cond:
            if self._let_go(job.pending.result_id or "") is None:
                return  # already finished (e.g. failed because its record was not stored)
            if not stored:
                self._unstored_ends += 1
            self._outstanding_cond.notify_all()
        slot = job.record._slots.get(job.feedback)
        record_listeners = slot.finish(final) if slot is not None else []
        notifier = self._notifier
        if notifier is None:
            return
        for fn in record_listeners:
            notifier.call(fn)
        for listener in [*self._listeners, *job.listeners]:
            notifier.call(listener, final, job.record)

    # ------------------------------------------------------------------ deferred & workers
    def _watch(self, jobs: list[Job]) -> None:
        from scrutiny.core._worker import ResultWatcher

        with self._lock:
            if self._watcher is None:
                self._watcher = ResultWatcher(self)
        self._watcher.add(jobs)

    def start_worker(self, *, poll_interval: float = 0.5, batch_size: int = 50,
                     max_claims: int = 5) -> Any:
        """Evaluate pending results from the database in this process, in the background.

        Claims pending results (those of deferred recorders, and those left by processes
        that died or exited early) with a lease, evaluates them with this session's
        evaluation loop and stores them. Returns a :class:`Worker`; `worker.stop()` ends it.

        Raises:
            RuntimeError: the session is closed.
        """
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ConfigurationError(f"poll_interval must be > 0 seconds, got {poll_interval}")
        if batch_size < 1 or max_claims < 1:
            raise ConfigurationError("batch_size and max_claims must be >= 1")
        from scrutiny.core._worker import Worker

        self._open_for_workers("start_worker()")
        worker = Worker(self, poll_interval=poll_interval, batch_size=batch_size,
                        max_claims=max_claims)
        self._workers.append(worker)
        worker.start()
        return worker

    def resume_pending(self, timeout: float | None = None, *, max_claims: int = 5) -> int:
        """Evaluate every result that is pending and free in the database now, and wait.

        This session's own queued records and results are stored first (within `timeout`),
        so the pending results of a deferred recording just made are among them. Claims as
        they can be evaluated (at most about twice `max_concurrency` at a time)
        until nothing is left or `timeout` runs out, then waits for what it claimed within
        what is left of `timeout`.

        Returns:
            how many results were claimed (they are stored when this returns, unless the
            timeout ran out first).

        Raises:
            RuntimeError: the session is closed.
            StorageError: the database refused the claim (unreachable; on SQLite, its file
                locked by another process past its busy timeout, which this waits for
                beyond `timeout`).
        """
        from scrutiny.core._worker import Worker

        timeout = wait_limit(timeout)
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self._open_for_workers("resume_pending()")
        # This session's own records and pending results first: still queued for the
        # writer, they were not in the database yet, and a deferred app that called this
        # right after recording claimed nothing and left them all pending.
        self.flush(self.flush_timeout if deadline is None
                   else max(0.0, deadline - time.monotonic()))
        worker = Worker(self, poll_interval=0.0, batch_size=100, max_claims=max_claims,
                        in_app=True)
        self._workers.append(worker)  # (close() from another thread stops it)
        with self._outstanding_lock:
            shed_before = self._shed
        try:
            claimed = worker.drain(deadline)
        except SQLAlchemyError as exc:  # (the raw driver error reached the caller)
            reason = str(getattr(exc, "orig", None) or exc).strip()
            raise StorageError(f"could not claim the pending results in "
                               f"{self._redacted_url()}: {reason}") from exc
        finally:
            self._workers.remove(worker)
        if deadline is None or time.monotonic() < deadline:  # (it took all that was free)
            with self._outstanding_lock:
                self._shed_open = self._shed - shed_before  # (only what was shed since)
        self.wait_for_feedback(None if deadline is None
                               else max(0.0, deadline - time.monotonic()))
        return claimed

    def retry_failed(self, feedbacks: Sequence[Feedback] | None = None, *,
                     app_ids: Sequence[str] | None = None,
                     timeout: float | None = None) -> int:
        """Evaluate again the stored results that `failed` — after a judge's outage, a
        bug fixed in a feedback — and wait for them: they are made pending, then
        :meth:`resume_pending` runs (which takes every other pending result too).

        Args:
            feedbacks: the feedbacks whose failed results to retry (by name), as they are
                now: a fixed function under the same name and wiring is used for them.
                None: every failed result (each evaluated by the feedback of its id this
                process defines, or by its stored reference).
            app_ids: apps whose results to retry (None: every app), as in
                :meth:`get_records_and_feedback`.
            timeout: as in :meth:`resume_pending`.

        Returns:
            how many results were made pending again. A result given a new score keeps
            its id: nothing is stored twice, and its failure is replaced.

        Raises:
            RuntimeError: the session is closed.
        """
        self._open_for_workers("retry_failed()")
        given = None if feedbacks is None else feedback_list(feedbacks)
        if given is not None:
            check_feedbacks(given, FeedbackMode.WITH_APP_THREAD)  # (wired; noted as defined)
        self.flush(self.flush_timeout if timeout is None else timeout)
        reopened = self.store.reopen_failed(
            feedback_names=None if given is None else [fb.name for fb in given],
            app_ids=as_names(app_ids, "app_ids"), now=datetime.now(timezone.utc))
        if given is not None:  # (the function as it is now, whatever id it was stored under)
            with self._outstanding_lock:
                self._retry_feedbacks = {fb.name: fb for fb in given}
        try:
            if reopened:
                self.resume_pending(timeout)
        finally:
            with self._outstanding_lock:
                self._retry_feedbacks = {}
        return reopened

    def _open_for_workers(self, what: str) -> None:
        """Start the evaluation loop, or raise when the session is closed."""
        if self.closed:
            raise RuntimeError(f"session is closed: {what} needs an open session (create a "
                               "new Session)")
        self._evaluation_loop()

    def delete_records(self, *, before: datetime | None = None,
                       app_ids: Sequence[str] | None = None,
                       record_ids: Sequence[str] | None = None) -> int:
        """Delete stored records (and their results, spans and feedback calls): older than
        `before`, of apps and/or with these ids — every condition given holds.

        Deleted rows are overwritten in an SQLite file and its write-ahead log is emptied
        (best effort while another connection reads it), so erased text is not left
        readable on disk.

        Args:
            before: delete records that started before this (timezone-aware) time.
            app_ids: apps whose records to delete (an empty list: none; None with
                `before`: every app's). A value is an app id when an app in the
                database has that id, otherwise an app name (all its versions):
                ``"team:qa"`` is app ``"team"`` version ``"qa"`` while that app exists.
            record_ids: the records to delete, e.g. one user's, found with
                ``query_records(...)`` or in ``get_records_and_feedback()``'s table.

        Returns:
            how many records were deleted.
        """
        app_ids = as_names(app_ids, "app_ids")  # ("qa" meant app "qa", not "q" and "a")
        record_ids = as_names(record_ids, "record_ids")
        if before is None and app_ids is None and record_ids is None:
            raise ConfigurationError("delete_records needs before=, app_ids= and/or "
                                     "record_ids=; refusing to delete everything")
        if before is not None and not isinstance(before, datetime):
            raise ConfigurationError(
                f"before= is a timezone-aware datetime, e.g. datetime(2026, 1, 1, "
                f"tzinfo=timezone.utc); got {before!r}")
        if before is not None and before.tzinfo is None:
            raise ConfigurationError("before= must be timezone-aware (e.g. UTC)")
        self.flush(self.flush_timeout)
        deleted = self.store.delete_records(before=before, app_ids=app_ids,
                                            record_ids=record_ids)
        if deleted:  # (their ids are free again: a run scored again after deleting the
            # last one was refused, "already given to this session ... it keeps the first")
            with self._record_ids_lock:
                self._record_ids.clear()
        return deleted

    def run_dashboard(self, *, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None) -> DashboardHandle:
        """Serve the web dashboard of this session's database in the background.

        Args:
            host: the address to bind; anything but loopback requires `token`.
            port: the port; 0 picks a free one.
            token: an access token the page and API require (``?token=`` or a header).

        Returns:
            A handle with `.url` and `.stop()`. Needs the extra: ``pip install
            'scrutiny[dashboard]'``.
        """
        try:
            from scrutiny.dashboard import start_dashboard
        except ModuleNotFoundError as exc:  # (its message names the extra, once)
            raise ConfigurationError(
                str(exc) if "scrutiny[dashboard]" in str(exc) else
                f"the dashboard needs the extra: pip install 'scrutiny[dashboard]' ({exc})"
            ) from exc
        return start_dashboard(self, host=host, port=port, token=token)


class _BothInits:
    """The pending results of two ingests of one record, made on first look."""

    __slots__ = ("first", "record", "second")

    def __init__(self, record: Record, first: Callable[[], object],
                 second: Callable[[], object]) -> None:
        self.record, self.first, self.second = record, first, second

    def __call__(self) -> None:
        self.first()
        self.second()
        if self.record._pending_init is self:
            self.record._pending_init = None


class _Ingest:
    """One accepted record: its pending results are made lazily, by the writer thread when
    it stores the record or by the application when it first looks at them — so the
    application's thread pays only for queueing the record."""

    __slots__ = ("_lock", "dispose", "feedbacks", "initial", "jobs", "listeners", "mode",
                 "refused", "session", "shed", "source", "started")

    def __init__(self, session: Session, record: Record | LazyRecord,
                 feedbacks: Sequence[Feedback], mode: FeedbackMode,
                 listeners: Sequence[ResultListener], dispose: object = None) -> None:
        self.session = session
        self.source = record
        self.dispose = dispose  # freed with this object, on the writer thread
        self.feedbacks = feedbacks
        self.mode = mode
        self.listeners = listeners
        self.jobs: list[Job] | None = None
        self.initial: list[FeedbackResult] = []
        self.started = False
        self.shed = False
        """The backlog was full: its results stay pending for a worker (see max_backlog)."""
        self.refused = False  # (the writer did not store it: see after_commit)
        self._lock = threading.Lock()

    @property
    def record(self) -> Record:
        return materialized(self.source)

    def attach(self, record: Record) -> None:
        """A lazy record was just built: its results are made on first look."""
        record._pending_init = self.materialize

    def materialize(self) -> list[Job]:
        """Make the pending results and their jobs once (thread-safe, idempotent)."""
        with self._lock:
            if self.jobs is not None:
                return self.jobs
            session, record, mode = self.session, self.record, self.mode
            policy = session._policies[mode]
            token = session._token if policy.owns_rows else None
            jobs: list[Job] = []
            for fb in self.feedbacks:
                pending = FeedbackResult(
                    record_id=record.record_id, feedback_name=fb.name,
                    status=FeedbackStatus.PENDING, result_id=new_hex_id(),
                    feedback_id=fb.feedback_id)
                slot = record._slots[fb] = _ResultSlot(pending)
                slot.elsewhere = not policy.owns_rows  # (deferred: the workers')
                job = Job(fb, record, pending, self.listeners, token)
                jobs.append(job)
                first = policy.initial(job)
                if mode is FeedbackMode.DEFERRED:
                    try:
                        fb.spec()
                    except NotReferenceable as exc:
                        first = pending.evolve(
                            status=FeedbackStatus.FAILED, ended_at=pending.created_at,
                            error=f"cannot be evaluated by a worker: {exc}")
                self.initial.append(first)
            self.jobs = jobs
            if record._pending_init == self.materialize:  # (not another ingest's)
                record._pending_init = None
            live = [job for job, first in zip(jobs, self.initial, strict=True)
                    if not first.status.is_final]
            if live and mode in (FeedbackMode.WITH_APP_THREAD, FeedbackMode.WITH_APP) \
                    and session._backlog_full(len(live)):  # (deferred: workers evaluate)
                self.shed = True
                session._materialized([j for j in jobs if j not in live])
                session._leave_pending(live)
            elif jobs and not session._materialized(jobs):
                # (the session closed meanwhile: stored pending, free for a worker or
                # resume_pending(), and its waits end with them so — unless the writer
                # refused the record: then they end failed, see after_commit)
                self.shed = True
                if self.refused:  # (as after_commit ends the others)
                    with session._outstanding_cond:
                        session._unstored_ends += len(live)
                    session._tell(live, [_unstored(job.pending) for job in live])
                else:
                    session._resolve_pending(live, released=False)
            return jobs

    def start(self) -> list[Job]:
        """Make the jobs and start evaluating them, once: on the evaluation loop as soon
        as it sees the record, or on the writer thread when it stores the record first."""
        jobs = self.materialize()
        with self._lock:
            if self.started:
                return jobs
            self.started = True
        to_run = [job for job, first in zip(jobs, self.initial, strict=True)
                  if not first.status.is_final]
        if to_run and not self.shed:
            self.session._policies[self.mode].dispatch(to_run)
        return jobs

    def prepare(self) -> list[InsertRecord]:
        """On the writer thread: the rows to insert (evaluation has started by now: every
        update of these results is queued behind this insert, so nothing is announced
        before it is stored, and the evaluation does not wait for the commit)."""
        session, record = self.session, self.record
        jobs = self.start()
        token = jobs[0].lease_token if jobs and not self.shed else None  # (shed: free)
        lease = None if token is None else (
            session.owner_id, token,
            datetime.now(timezone.utc) + timedelta(seconds=session.lease_seconds))
        for fb in self.feedbacks:
            session._higher_is_better[fb.feedback_id] = fb.higher_is_better
        op = InsertRecord(
            app=_rows.app_row(record),
            record=_rows.record_row(record, max_bytes=session.max_payload_bytes,
                                    compress_spans=session._compress_spans),
            definitions=[_rows.definition_row(j.feedback) for j in jobs],
            results=[_rows.result_row(record, r, None if r.is_final else lease,
                                      max_bytes=session.max_payload_bytes)
                     for r in self.initial],
        )
        return [op]

    def after_commit(self, stored: bool) -> None:
        session = self.session
        self.refused = not stored
        jobs = self.materialize()
        if not stored:
            for job in jobs:
                session._finish(job, _unstored(job.pending), stored=False)
            return
        for job, first in zip(jobs, self.initial, strict=True):
            if first.status.is_final:
                session._finish(job, first)


def _release(job: Job) -> UpdateResult:
    """Give an unfinished result back to the pool: pending, unheld, claimable at once.

    The claim's attempt is given back too (as `SQLStore.release` does): a process that
    stops on purpose is not one that died, and five graceful stops of workers while a
    long feedback ran ended it `failed: abandoned after 5 claims`. (A worker's job starts
    from the claimed row, whose count includes this claim; the app's own starts at 0.)"""
    return UpdateResult(
        job.pending.result_id or "",
        {"status": FeedbackStatus.PENDING.value, "worker_id": None, "lease_token": None,
         "lease_expires_at": None, "started_at": None,
         "attempts": max(0, job.pending.attempts - 1),
         "updated_at": datetime.now(timezone.utc)},
        lease_token=job.lease_token)


def _unstored(pending: FeedbackResult) -> FeedbackResult:
    return FeedbackResult(
        record_id=pending.record_id, feedback_name=pending.feedback_name,
        status=FeedbackStatus.FAILED, result_id=pending.result_id,
        feedback_id=pending.feedback_id, created_at=pending.created_at,
        error="not evaluated: the record could not be stored (see the log)")


def _mode(value: FeedbackMode | str) -> FeedbackMode:
    if type(value) is FeedbackMode:  # the common case, on the app's thread: no Enum call
        return value
    try:
        return FeedbackMode(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in FeedbackMode)
        raise ConfigurationError(f"unknown feedback mode {value!r}; choose one of {choices}") \
            from None


KERNEL_EXIT_WAIT = 1.0
"""Under a Jupyter kernel, the most seconds the exit waits for evaluations under way
before they are released as `pending` (see :func:`_exit_wait`)."""


def _exit_wait(flush_timeout: float) -> float:
    """How long the exit waits for evaluations under way. Jupyter's "Restart kernel" and
    "Shut down" give the kernel 2.5 s, then kill it with SIGTERM (no exit handlers run):
    waiting `flush_timeout` (10 s) left the results `running`, held by the dead kernel's
    lease; within the 2.5 s they are released as `pending`, which the notebook resumes."""
    if "ipykernel" in sys.modules:
        return min(flush_timeout, KERNEL_EXIT_WAIT)
    return flush_timeout


def _exiting() -> bool:
    """Whether the interpreter is past the app's main code (threading's exit hooks or
    atexit run): an interrupt there has no caller to reach."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False)) or sys.is_finalizing()
