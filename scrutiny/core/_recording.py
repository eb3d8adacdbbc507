"""What a recorder's ``with`` block collects, shared by the framework integrations."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from scrutiny.core._errors import ConfigurationError, RecordingError, describe_error
from scrutiny.core._feedback import Feedback
from scrutiny.core._records import (
    LazyRecord,
    Record,
    _ResultSlot,
    check_app_label,
    materialized,
)
from scrutiny.core._results import FeedbackResult, FeedbackStatus
from scrutiny.core._runtime import exit_stage
from scrutiny.core._session import (
    FeedbackMode,
    ResultListener,
    Session,
    _mode,
    check_feedbacks,
    feedback_list,
)

__all__ = ["RecorderSettings", "Recording"]

logger = logging.getLogger("scrutiny")

_FINALIZE_TURNS = 50


class Recording:
    """The records made inside one ``with recorder as recording:`` block.

    Args:
        feedback_mode: the recorder's mode (None: the session's).
        open_hint: said when `get()` finds no record while calls are still open.
        empty_hint: said when `get()` finds no record at all.
    """

    def __repr__(self) -> str:
        with self._lock:
            made, still_open = len(self._records), self._open
        return f"Recording(records={made}, open_calls={still_open})"

    def __init__(self, feedback_mode: FeedbackMode | None, *, open_hint: str = "",
                 empty_hint: str = "") -> None:
        self.feedback_mode = feedback_mode
        self._records: list[Record | LazyRecord] = []
        self._open = 0  # recorded calls started in the block whose record is not made yet
        self._lost_calls = 0  # calls that ended but could not be recorded (logged)
        self._lock = threading.Lock()
        self._open_hint = open_hint
        self._empty_hint = empty_hint

    def _opened(self) -> None:
        with self._lock:
            self._open += 1

    def _add(self, record: Record | LazyRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._open = max(0, self._open - 1)

    def _lost(self) -> None:
        """A call started in the block ended, but recording it failed inside Scrutiny."""
        with self._lock:
            self._open = max(0, self._open - 1)
            self._lost_calls += 1

    @property
    def open_calls(self) -> int:
        """Recorded calls started in the block whose record is not made yet (e.g. a
        streamed answer that is still being consumed)."""
        with self._lock:
            return self._open

    @property
    def records(self) -> list[Record]:
        """Every record made in the block, in the order the calls ended."""
        with self._lock:
            records = list(self._records)
        return [materialized(r) for r in records]

    def get(self) -> Record:
        """The one record of the block.

        Raises:
            RecordingError: the block made no record, or several (use `.records`).
        """
        records = self.records
        if len(records) == 1:
            return records[0]
        if not records:
            still_open = self.open_calls
            if self._lost_calls:
                raise RecordingError(
                    f"no record: recording {self._lost_calls} call(s) of this block failed "
                    "inside Scrutiny (the error is in the log, logger 'scrutiny'; your calls "
                    "were not affected)")
            if still_open:
                raise RecordingError(
                    f"no record yet: {still_open} recorded call(s) started in this "
                    f"recording have not ended; {self._open_hint}".rstrip("; "))
            raise RecordingError(
                f"no record was made in this recording; {self._empty_hint}".rstrip("; "))
        raise RecordingError(
            f"this recording holds {len(records)} records; use recording.records or "
            "recording[i]")

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    # ------------------------------------------------------------------ leaving the block
    def finish(self, mode: FeedbackMode) -> None:
        """On leaving a ``with`` block: in mode `with_app`, wait for every result."""
        if mode is FeedbackMode.WITH_APP:
            for record in self.records:
                record.wait_for_feedback_results()

    async def afinish(self, mode: FeedbackMode) -> None:
        """On leaving an ``async with`` block.

        An async stream the consumer left early ends only when the event loop finalizes its
        generators, a few loop turns later: the loop gets those turns first, so the block's
        record is there when it is left. In mode `with_app`, then waits for every result
        without blocking the loop.
        """
        for _ in range(_FINALIZE_TURNS):
            if self.open_calls == 0:
                break
            await asyncio.sleep(0)
        if mode is FeedbackMode.WITH_APP:
            await asyncio.gather(*(r.await_feedback_results() for r in self.records))


class RecorderSettings:
    """What every recorder knows about its app, shared by the framework integrations.

    Args:
        app_name, app_version: what the records belong to.
        feedbacks: evaluated on every record; checked here (wired, and loadable by a
            worker when the mode is deferred).
        session: where records go; None means the session created last, looked up when
            a record is made. A session given explicitly is kept even once closed: records
            made then are logged and dropped, never sent to another database.
        feedback_mode: overrides the session's mode.
        tags, metadata: added to every record.

    Raises:
        ConfigurationError: an empty app name, an unknown mode, a feedback that cannot run.
    """

    def __init__(self, app_name: str, app_version: str, *, feedbacks: Sequence[Feedback],
                 session: Session | None, feedback_mode: FeedbackMode | str | None,
                 tags: Sequence[str], metadata: dict[str, Any] | None) -> None:
        if not isinstance(app_name, str):
            hint = (": the app itself goes to ChainRecorder(app, app_name=...) or "
                    "LlamaIndexRecorder(app, app_name=...)" if not isinstance(
                        app_name, int | float) else "")
            raise ConfigurationError(f"app_name is text, e.g. app_name='qa'; got "
                                     f"{type(app_name).__name__}{hint}")
        if not app_name:
            raise ConfigurationError("a recorder needs a non-empty app_name")
        if session is not None and not isinstance(session, Session):
            hint = (" (a database URL? pass session=Session(url))"
                    if isinstance(session, str) else "")
            raise ConfigurationError(f"session= takes a Session, not a "
                                     f"{type(session).__name__}{hint}")
        if isinstance(tags, str | bytes):  # (kept as its characters: ['p', 'r', 'o', 'd'])
            raise ConfigurationError(f"tags is a list of strings, e.g. tags=[{tags!r}]")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ConfigurationError(f"metadata is a dict, e.g. metadata={{'env': 'prod'}}; "
                                     f"got {type(metadata).__name__}")
        if not isinstance(app_version, str) or not app_version:
            raise ConfigurationError("app_version must be a non-empty string")
        check_app_label(app_name, app_version)
        self.app_name = app_name
        self.app_version = app_version
        self.feedback_mode = None if feedback_mode is None else _mode(feedback_mode)
        self.explicit_session = session
        self.feedbacks: list[Feedback] = []
        self.set_feedbacks(feedbacks)
        self.tags = list(tags)
        self.metadata = dict(metadata or {})
        self._warned_closed = False
        self.prepared = False
        """Whether :meth:`prepare` has started a session's threads (checked per call)."""

    def set_feedbacks(self, feedbacks: Sequence[Feedback]) -> None:
        """Check and set the feedbacks (wired; loadable by a worker in deferred mode)."""
        # The session it will use: the one given, else the one created last (none yet: a
        # default session, whose mode is the default).
        session = self.explicit_session or Session.latest()
        mode = self.feedback_mode or (session.feedback_mode if session is not None
                                      else FeedbackMode.WITH_APP_THREAD)
        given = feedback_list(feedbacks)
        check_feedbacks(given, _mode(mode))
        self.feedbacks = given

    @property
    def session(self) -> Session:
        """The session given, else the session created last."""
        return self.explicit_session if self.explicit_session is not None \
            else Session.current()

    def uses(self, session: Session) -> bool:
        """Whether its records go to `session` (without creating a default one)."""
        given = self.explicit_session
        return given is session if given is not None else Session.latest() is session

    def prepare(self) -> None:
        """(A recorded call begins.) Have the session start its threads now, if they are
        not running yet: see ``Session._warm``. Never raises."""
        try:
            self.session._warm(self.feedback_mode)
        except Exception:
            logger.debug("scrutiny: preparing the session failed", exc_info=True)
        self.prepared = True

    def mode(self, recording: Recording | None = None) -> FeedbackMode:
        """The mode in force: the block's, else the recorder's, else the session's."""
        if recording is not None and recording.feedback_mode is not None:
            return recording.feedback_mode
        return self.feedback_mode or self.session.feedback_mode

    def ingest(self, record: Record | LazyRecord, recording: Recording | None,
               listeners: Sequence[ResultListener] = (), dispose: object = None) -> None:
        """Hand a finished record to the session (never raises into the app).

        `dispose`: something the caller no longer needs (a record it stopped keeping),
        freed on the session's writer thread instead of the application's.
        """
        try:
            session = self.session
        except Exception as exc:  # (no default session to be had: Session.current said
            # why, once)
            logger.debug("scrutiny: record %s not stored: no session", record.record_id,
                         exc_info=True)
            _unevaluated(record, self.feedbacks, "not evaluated: there is no session to store "
                         f"the record in ({describe_error(exc)}); see the log")
            return
        if exit_stage() == 2 or sys.is_finalizing():  # ended as the interpreter tore down
            # (a session started now would wait forever for its threads to start)
            if not self._warned_closed:
                self._warned_closed = True
                logger.error("scrutiny: a call of app %r ended as the interpreter shut down, "
                             "after the sessions were closed; its record is not stored",
                             self.app_name)
            return
        if session.closed and not self._warned_closed:
            # (given to it all the same: its feedbacks then end `failed`, saying so —
            # returned with no results at all, a test gating on every score passed)
            self._warned_closed = True
            logger.warning(
                "scrutiny: the session of app %r (%s) is closed; its records are not "
                "stored (the application is not affected). Create a new Session — a "
                "recorder without session= uses the one created last — or pass "
                "session= to the recorder", self.app_name, session._redacted_url())
        mode = recording.feedback_mode if recording is not None else None
        try:
            session._ingest(record, self.feedbacks, _mode(mode or self.feedback_mode
                                                          or session.feedback_mode),
                            listeners, dispose)
        except Exception:
            logger.exception("scrutiny: could not accept record %s; the application is "
                             "not affected", record.record_id)


def block_mode(recording: Recording, settings: RecorderSettings) -> FeedbackMode | None:
    """The block's feedback mode; None (logged) when the session it would be read from
    cannot be had (a default session whose database does not answer): leaving the block
    raised that into the app, which had its answer."""
    try:
        return settings.mode(recording)
    except Exception as exc:  # (Session.current logged why, once per retry)
        logger.debug("scrutiny: leaving a recorder block: its session is not available "
                     "(%s); the block's records are not stored", exc)
        return None


_warned_elsewhere: set[str] = set()


def left_elsewhere(kind: str) -> None:
    """A block was left in a context it was not entered in (logged once; it raised into
    the app): FastAPI and Starlette run each step of a plain generator or dependency in a
    fresh copy of the context (`iterate_in_threadpool`, a `def` dependency with `yield`),
    so what one step set is not there in the next."""
    log = logger.debug if kind in _warned_elsewhere else logger.warning
    _warned_elsewhere.add(kind)
    log("scrutiny: a %s block was left in another context than the one it was entered in "
        "(a plain generator or `def` dependency with `yield` under FastAPI or Starlette "
        "runs each step in a fresh copy of the context). Calls that started inside the "
        "block were recorded; calls made between its steps were not: use an async "
        "generator or dependency, or pass config={'callbacks': [recorder]} (for "
        "LlamaIndex: open the block where the calls are made)", kind)


def _unevaluated(record: Record | LazyRecord, feedbacks: Sequence[Feedback], why: str) -> None:
    """(No session takes the record.) Its feedbacks end `failed`, saying why: a recorder
    whose session could not be made returned records with no results at all, and a test
    asserting every score passed with nothing evaluated."""
    def fail(built: Record) -> None:
        for fb in feedbacks:
            if fb not in built._slots:
                slot = built._slots[fb] = _ResultSlot(FeedbackResult(
                    record_id=built.record_id, feedback_name=fb.name,
                    status=FeedbackStatus.FAILED, feedback_id=fb.feedback_id, error=why))
                slot.finish(slot.current)

    if isinstance(record, LazyRecord):
        record.on_build(fail)
    else:
        fail(record)
