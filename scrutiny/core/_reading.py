"""Reading what a session stored: the tables users read, pages, summaries, one record.

Every reader (the dashboard and the command line included) goes through these methods, so
no two views can disagree. Each first waits, bounded, for writes already queued, so a record
whose call has returned is in the next table read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import pandas as pd

from scrutiny.core import _rows
from scrutiny.core._errors import ConfigurationError
from scrutiny.core._frames import (
    FRAME_REASON_COLUMNS,
    FRAME_RECORD_COLUMNS,
    FRAME_RESULT_COLUMNS,
    RecordsFrame,
    leaderboard_frame,
    records_frame,
)
from scrutiny.core._records import Record, RecordStatus, _ResultSlot
from scrutiny.core._results import FeedbackStatus
from scrutiny.core.storage import RecordQuery, Row, Store

MAX_OFFSET = 2 ** 62
MAX_SEARCH = 1000
"""Characters of a search text (SQLite refuses LIKE patterns over 50,000 bytes)."""

__all__ = ["RecordPage", "SessionReading"]

logger = logging.getLogger("scrutiny")



def _whole(value: object) -> bool:
    """An int (numpy's too), not a bool: `limit="2"` failed comparing a str with an int, and
    `limit=1.5` was taken as it was."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_names(value: str | Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    """A filter's names as a tuple; one name may be given as a plain string (which used to
    be read letter by letter: app_ids="qa" matched apps "q" and "a")."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigurationError(f"{what} must be names (strings); got {bad[:3]!r}")
    return names

LIST_RECORD_COLUMNS = (
    "record_id", "app_id", "app_name", "app_version", "status", "input_json", "output_json",
    "error", "start_time", "end_time", "latency_s", "prompt_tokens", "completion_tokens",
    "total_tokens", "tags_json", "framework", "root_run_id", "created_at",
)
"""The record columns a page read with ``details=False`` reads: not the span trees,
retrieved contexts and metadata (megabytes each; the dashboard's list read and decoded them
all for previews: 3.4 s for 50 records with 3.5 MB span trees)."""


class _ColumnReads(Protocol):
    """A store whose reads take the columns to read (SQLStore, MemoryStore): `reads_columns`
    says so. Other stores are read whole."""

    def records_and_results(
        self, *, app_ids: Sequence[str] | None = None, limit: int | None = None,
        offset: int = 0, record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None) -> tuple[list[Row], list[Row]]: ...

    def query_records(self, query: RecordQuery, *,
                      record_columns: Sequence[str] | None = None,
                      result_columns: Sequence[str] | None = None
                      ) -> tuple[list[Row], list[Row], int]: ...

    def records_and_results_in_pages(
        self, each: Callable[[list[Row], list[Row]], object], *,
        app_ids: Sequence[str] | None = None, limit: int | None = None, offset: int = 0,
        record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None, page: int = 5000) -> None: ...


def _column_reads(store: Store) -> _ColumnReads | None:
    return cast(_ColumnReads, store) if getattr(store, "reads_columns", False) is True \
        else None


class SessionReading:
    """The read side of :class:`Session` (a mixin: the session supplies these members).

    A read the database refuses (it is down, a lock past its timeout) raises
    :class:`~scrutiny.StorageError` saying what could not be read where, with the
    driver's error as its cause."""

    store: Store
    flush_timeout: float
    _higher_is_better: dict[str, bool]
    """Per feedback id, the direction this process last stored (over the definitions)."""

    if TYPE_CHECKING:  # provided by Session
        def flush(self, timeout: float | None = None) -> bool: ...

        def wait_for_feedback(self, timeout: float | None = None) -> bool: ...

        def stats(self) -> dict[str, int]: ...

        @property
        def closed(self) -> bool: ...

    def _still_open(self) -> bool:
        return not self.closed

    def _settle(self, timeout: float, what: str, *, wait: bool = False) -> None:
        """Before a read: wait (bounded) for the writes queued so far, and with `wait` for
        the feedback accepted so far. When writes are still queued at the end (the
        database holds them back: another process's lock, an outage), says how many are
        not in what is read: the table was read without them and nothing said so (1 row
        of 6, the other 5 stored moments later)."""
        done = self.wait_for_feedback(timeout) if wait else self.flush(timeout)
        if done:
            return
        queued = self.stats().get("write_backlog", 0)
        if queued:
            # (a dashboard polling while the database holds writes back reads every few
            # seconds: a warning a minute, the rest at debug level)
            now = time.monotonic()
            last = getattr(self, "_held_read_said", None)
            said_lately = last is not None and now - last < 60.0
            if not said_lately:
                self._held_read_said = now
            (logger.debug if said_lately else logger.warning)(
                "scrutiny: %d write(s) (records, results, status changes) were still "
                "queued after %.1fs (the database has not taken them yet); they are not "
                "in this %s. Read again once they are stored (Session.flush()).",
                queued, timeout, what)

    def get_records_and_feedback(
        self,
        app_ids: Sequence[str] | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
        limit: int | None = None,
        offset: int = 0,
        reasons: bool = False,
    ) -> tuple[pd.DataFrame, list[str]]:
        """Records with their feedback, newest first.

        Args:
            app_ids: apps to keep, None for all (an empty list keeps none). A value is an
                app id (``"name:version"``,
                a ``":"`` or ``"\\"`` inside the name or version escaped with a ``"\\"``)
                when an app in the database has that id (even one whose records were
                deleted), and otherwise an app name (all its versions): ``"team:qa"`` is
                app ``"team"`` version ``"qa"``, not app ``"team:qa"`` (whose ids are
                ``"team\\:qa:<version>"``).
            wait: first wait for every feedback accepted so far (bounded by `timeout`).
            timeout: the most seconds to wait (for queued writes, and with `wait=True` for
                feedback); default `flush_timeout`.
            limit, offset: a page of records.
            reasons: add beside each status a ``"<name> reason"`` column: why a result
                failed or was skipped, or a judge's explanation of its score.

        Returns:
            `(frame, feedback_columns)`: per feedback a score column (float; NaN unless
            done) and beside it a ``"<name> status"`` column with pending, running, done,
            failed or skipped — or ``n/a`` where the record was not evaluated with that
            feedback at all (a table of several apps).
        """
        if not (limit is None or _whole(limit)) or not _whole(offset):
            raise ConfigurationError(f"limit and offset are whole numbers; got limit={limit!r}, "
                                     f"offset={offset!r}")
        if (limit is not None and limit < 1) or offset < 0 or offset > MAX_OFFSET:
            raise ConfigurationError(f"limit must be >= 1 (or None for all) and offset "
                                     f"0..{MAX_OFFSET}; got limit={limit}, offset={offset}")
        timeout = self.flush_timeout if timeout is None else timeout
        self._settle(timeout, "table", wait=wait)
        names = as_names(app_ids, "app_ids")
        lean = _column_reads(self.store)
        if lean is not None:  # (only what the table shows, a page at a time: no span trees)
            table = RecordsFrame(reasons=reasons)
            lean.records_and_results_in_pages(
                table.add, app_ids=names, limit=limit, offset=offset,
                record_columns=FRAME_RECORD_COLUMNS, result_columns=FRAME_RESULT_COLUMNS
                + (FRAME_REASON_COLUMNS if reasons else ()))
            return table.build()
        records, results = self.store.records_and_results(app_ids=names, limit=limit,
                                                          offset=offset)
        return records_frame(records, results, reasons=reasons)

    def get_leaderboard(self, app_ids: Sequence[str] | None = None, *,
                        timeout: float | None = None) -> pd.DataFrame:
        """Mean score per app version per feedback, best first, with counts by status.

        `app_ids` are app ids or names as in :meth:`get_records_and_feedback`: an app's id
        when some app has it, otherwise an app name.
        """
        self._settle(self.flush_timeout if timeout is None else timeout, "leaderboard")
        records, results = self.store.aggregates(app_ids=as_names(app_ids, "app_ids"))
        return leaderboard_frame(records, results, self._directions(results, records))

    def _directions(self, results: Sequence[Row],
                    apps: Sequence[Row]) -> dict[tuple[str, str], bool]:
        """Per (app id, feedback name) of `results`: whether higher is better, as that
        app's feedback of that name says.

        A name is not enough: two apps sharing a database may each have a "length" of
        their own, one wanting long answers and one short, and the definition written
        last decided for both. Where the definitions of a name agree (nearly always),
        that is the answer; otherwise the results say which definition each app used —
        the newest of those any version of the app used, for all its versions (a
        direction turned round in v2 ranks v1 by it too: one column, one direction).
        """
        app_names: dict[str, str] = {a["app_id"]: a["app_name"] for a in apps}
        by_id: dict[str, tuple[str, bool, Any]] = {
            d["feedback_id"]: (d["name"], bool(d["higher_is_better"]), d["created_at"])
            for d in self.store.definitions()}
        for feedback_id, higher in list(self._higher_is_better.items()):
            if feedback_id in by_id:
                name, _, created = by_id[feedback_id]
                by_id[feedback_id] = (name, higher, created)
        ways: dict[str, set[bool]] = {}
        for name, higher, _ in by_id.values():
            ways.setdefault(name, set()).add(higher)
        pairs = {(r["app_id"], r["feedback_name"]) for r in results}
        mixed = {name for _, name in pairs if len(ways.get(name, ())) > 1}
        out = {(app, name): next(iter(ways.get(name, {True})))
               for app, name in pairs if name not in mixed}
        if mixed:
            used: dict[tuple[str, str], list[tuple[str, bool, Any]]] = {}
            for row in self.store.feedback_ids_of(
                    sorted(mixed), sorted({app for app, name in pairs if name in mixed})):
                known = by_id.get(row["feedback_id"])
                if known is not None:
                    used.setdefault((row["app_id"], row["feedback_name"]), []).append(known)
            by_app_name: dict[tuple[str, str], list[tuple[str, bool, Any]]] = {}
            for (app, name), found in used.items():
                by_app_name.setdefault((app_names.get(app, app), name), []).extend(found)
            for app, name in pairs:
                if name in mixed:  # (several definitions in one app: the newest)
                    defined = by_app_name.get((str(app_names.get(app, app)), name))
                    out[app, name] = max(defined, key=lambda d: d[2])[1] if defined else True
        return out

    def get_record(self, record_id: str) -> Record | None:
        """One stored record with its results (as stored now), or None."""
        if not isinstance(record_id, str):
            if not isinstance(record_id, int | float | uuid.UUID) or \
                    isinstance(record_id, bool):
                raise TypeError(f"record_id is a string; got {type(record_id).__name__} "
                                f"{record_id!r}")
            record_id = str(record_id)  # (as a record made with it stored it)
        if not record_id.isascii():
            try:
                record_id.encode("utf-8")
            except UnicodeEncodeError:  # (no record has one: it is refused when made)
                return None
        self._settle(self.flush_timeout, "read of one record")
        row, result_rows = self.store.record(record_id)
        return None if row is None else _stored_record(row, result_rows, self.store,
                                                       self._still_open)

    def query_records(
        self,
        *,
        app_ids: Sequence[str] | None = None,
        app_versions: Sequence[str] | None = None,
        record_status: str | None = None,
        feedback_name: str | None = None,
        statuses: Sequence[str] | None = None,
        min_score: float | None = None,
        max_score: float | None = None,
        search: str | None = None,
        limit: int = 50,
        offset: int = 0,
        details: bool = True,
    ) -> RecordPage:
        """A page of stored records (newest first) with their results, filtered.

        Args:
            app_ids: app ids or app names, as in :meth:`get_records_and_feedback` (a value
                is an app's id when some app has it, otherwise an app name).
            app_versions: app versions.
            record_status: ``ok``, ``error`` or ``cancelled``.
            feedback_name: with `statuses` and/or `min_score`/`max_score`, keep records
                whose result of this feedback matches. `statuses` without it: records
                with a result of any feedback in one of them (every record with a failed
                result); a score range needs it.
            search: text that the input or the output contains (case-insensitive).
            limit, offset: the page (limit at most 1000).
            details: False to leave out what a list of records does not show: their
                span trees, retrieved contexts and metadata are not read (the records'
                `spans` and `contexts` are empty, `metadata` {}; :meth:`get_record` reads
                one whole).
        """
        if not 1 <= limit <= 1000 or not 0 <= offset <= MAX_OFFSET:
            raise ConfigurationError(f"limit must be 1..1000 and offset 0..{MAX_OFFSET}")
        if record_status is not None and record_status not in {m.value for m in RecordStatus}:
            raise ConfigurationError(f"unknown record_status {record_status!r}; use "
                                     f"{[m.value for m in RecordStatus]}")
        if search is not None and len(search) > MAX_SEARCH:
            raise ConfigurationError(f"the search text has {len(search)} characters; at most "
                                     f"{MAX_SEARCH} are searched for")
        for name, bound in (("min_score", min_score), ("max_score", max_score)):
            if bound is not None and not math.isfinite(bound):
                raise ConfigurationError(f"{name} must be a finite number, got {bound}")
        if min_score is not None and max_score is not None and min_score > max_score:
            raise ConfigurationError(f"min_score {min_score} is above max_score {max_score}")
        app_ids, app_versions = as_names(app_ids, "app_ids"), as_names(app_versions,
                                                                      "app_versions")
        statuses = as_names(statuses, "statuses")
        bad = [st for st in statuses or () if st not in {m.value for m in FeedbackStatus}]
        if bad:
            raise ConfigurationError(f"unknown status(es) {bad}; use "
                                     f"{[m.value for m in FeedbackStatus]}")
        if (min_score is not None or max_score is not None) and not feedback_name:
            raise ConfigurationError("a score range needs feedback_name=: the feedback whose "
                                     "scores to filter (statuses alone match any feedback)")
        self._settle(self.flush_timeout, "page of records")
        query = RecordQuery(
            app_ids=app_ids, app_versions=app_versions,
            record_status=record_status, feedback_name=feedback_name,
            statuses=statuses, min_score=min_score, max_score=max_score,
            search=search or None, limit=limit, offset=offset)
        lean = None if details else _column_reads(self.store)
        if lean is not None:
            rows, result_rows, total = lean.query_records(query,
                                                          record_columns=LIST_RECORD_COLUMNS)
        else:
            rows, result_rows, total = self.store.query_records(query)
        by_record: dict[str, list[Row]] = {}
        for res in result_rows:
            by_record.setdefault(res["record_id"], []).append(res)
        records = [_stored_record(r, by_record.get(r["record_id"], []), self.store,
                                  self._still_open) for r in rows]
        return RecordPage(records, total, limit, offset)

    def get_apps(self) -> list[dict[str, Any]]:
        """Every app version with its record count, mean latency and tokens."""
        self._settle(self.flush_timeout, "list of apps")
        apps, _ = self.store.aggregates()
        return sorted(apps, key=lambda a: (a["app_name"], a["app_version"]))

    def get_feedback_summary(self, app_ids: Sequence[str] | None = None
                             ) -> list[dict[str, Any]]:
        """Per app version and feedback: counts by status, the mean of done scores and
        the feedback's direction (`higher_is_better`); `app_ids` as in
        :meth:`get_records_and_feedback`."""
        self._settle(self.flush_timeout, "feedback summary")
        apps, results = self.store.aggregates(app_ids=as_names(app_ids, "app_ids"))
        names = {a["app_id"]: (a["app_name"], a["app_version"]) for a in apps}
        directions = self._directions(results, apps)  # (as the leaderboard's)
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for res in results:
            key = (res["app_id"], res["feedback_name"])
            entry = out.setdefault(key, {
                "app_id": res["app_id"], "app_name": names[res["app_id"]][0],
                "app_version": names[res["app_id"]][1], "feedback_name": res["feedback_name"],
                "higher_is_better": directions[key], "mean": None,
                **{st.value: 0 for st in FeedbackStatus}})
            entry[res["status"]] = int(res["n"])
            if res["status"] == "done":
                entry["mean"] = res["mean"]
        return sorted(out.values(), key=lambda e: (e["app_name"], e["app_version"],
                                                   e["feedback_name"]))


@dataclasses.dataclass(frozen=True)
class RecordPage:
    """One page of :meth:`Session.query_records`."""

    records: list[Record]
    total: int
    limit: int
    offset: int


def _stored_record(row: Row, result_rows: Sequence[Row], store: Store | None = None,
                   alive: Callable[[], bool] | None = None) -> Record:
    """A record read back from storage, with its results attached as they are stored.

    With `store`, waits on it (blocking, async, or a callback) read its unfinished results
    again until they end: nothing else would finish them here (whoever evaluates them —
    this session, another process, a worker — stores them), and a wait blocked for good.
    `alive()` False (its session closed) ends such a wait with what was read last.
    """
    record = _rows.record_from_row(row)
    by_result: dict[str, _ResultSlot] = {}
    for res_row in result_rows:
        result = _rows.result_from_row(res_row)
        key = _StoredFeedback(result.feedback_name, result.feedback_id)
        slot = _ResultSlot(result)
        if result.is_final:
            slot.finish(result)
        elif result.result_id:
            by_result[result.result_id] = slot
        record._slots[key] = slot  # type: ignore[index]
    if store is not None and by_result:
        record._watch = _StoredWatch(store, record.record_id, by_result,
                                     alive or (lambda: True))
    return record


class _StoredWatch:
    """Reads a stored record's unfinished results again, backing off, until they end."""

    FIRST = 0.02
    LONGEST = 1.0

    def __init__(self, store: Store, record_id: str, slots: dict[str, _ResultSlot],
                 alive: Callable[[], bool]) -> None:
        self._store = store
        self._record_id = record_id
        self._slots = slots
        self._alive = alive
        self._lock = threading.Lock()  # one reader at a time; the others wait for it
        self._following = False

    def _read(self) -> bool:
        """Read the results once; True when every one has ended, or when the record is no
        longer stored (deleted: its results never end, and a callback's wait read it every
        second for the life of the session). Callbacks of results that ended run on a
        thread of their own, outside the lock (one that waited on this record again
        deadlocked)."""
        row, rows = self._store.record(self._record_id)
        if row is None:
            logger.warning("scrutiny: record %s was deleted from the database before its "
                           "results ended; no longer waiting for them", self._record_id)
            return True
        listeners: list[Callable[[], object]] = []
        for row in rows:
            slot = self._slots.get(row["result_id"])
            if slot is None:
                continue
            result = _rows.result_from_row(row)
            if result.is_final:
                listeners += slot.finish(result)
            else:
                slot.update(result)
        if listeners:
            threading.Thread(target=_call_all, args=(listeners,), daemon=True,
                             name="scrutiny-stored-callbacks").start()
        return all(slot.current.is_final for slot in self._slots.values())

    def follow(self, deadline: float | None, stop: threading.Event | None = None) -> None:
        """Read until every result has ended, `deadline` (monotonic) passes, `stop` is set
        or the session is closed."""
        pause = self.FIRST
        stop = stop or threading.Event()
        failing = False
        while self._alive() and not stop.is_set():
            with self._lock:
                try:
                    if self._read():
                        return
                    failing = False
                except Exception as exc:
                    if not self._passing(exc):
                        logger.exception("scrutiny: reading record %s's results again "
                                         "failed", self._record_id)
                        return
                    # A server restarting, a lock, a lost connection: one failed read
                    # ended the wait early, and a callback's wait for good (never called).
                    if not failing:
                        logger.warning("scrutiny: reading record %s's results again failed "
                                       "(%s); trying again", self._record_id, exc)
                    failing = True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            stop.wait(pause if left is None else min(pause, left))
            pause = min(pause * 2, self.LONGEST)

    def _passing(self, exc: Exception) -> bool:
        """Whether the read that failed with `exc` may succeed later: the store says so
        of the error, or the database does not answer at all."""
        transient = getattr(self._store, "transient", None)
        ping = getattr(self._store, "ping", None)
        try:
            return bool(transient is not None and transient(exc)) or (
                ping is not None and not ping())
        except Exception:
            return False

    def follow_in_background(self) -> None:
        """For a callback: read on a daemon thread until the results end (or the session
        closes); one such thread per record, however many callbacks wait on it."""
        with self._lock:
            if self._following:
                return
            self._following = True
        threading.Thread(target=self._follow_then_stop, daemon=True,
                         name="scrutiny-stored-wait").start()

    def _follow_then_stop(self) -> None:
        try:
            self.follow(None)
        finally:
            with self._lock:
                self._following = False


def _call_all(listeners: list[Callable[[], object]]) -> None:
    for listener in listeners:
        try:
            listener()
        except BaseException:
            logger.exception("scrutiny: a results callback failed")


class _StoredFeedback:
    """Stands for a feedback definition in records read back from the database."""

    __slots__ = ("feedback_id", "name")

    def __init__(self, name: str, feedback_id: str | None) -> None:
        self.name = name
        self.feedback_id = feedback_id

    def __repr__(self) -> str:
        return f"StoredFeedback({self.name!r})"


