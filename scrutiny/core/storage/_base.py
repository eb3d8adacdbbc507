"""The storage interface: a handful of row operations, batched into one transaction."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import orjson

from scrutiny.core._errors import StorageError

__all__ = ["InsertRecord", "RecordIdTaken", "RecordQuery", "RenewLeases", "ResultNameTaken",
           "Row", "Store", "UpdateResult", "WriteOp", "json_escaped", "refuse_repeats",
           "search_matcher", "search_regex"]

Row = dict[str, Any]


@dataclass(slots=True)
class InsertRecord:
    """A record with its app, its feedback definitions and its first result rows."""

    app: Row
    record: Row
    definitions: list[Row] = field(default_factory=list)
    results: list[Row] = field(default_factory=list)


class RecordIdTaken(StorageError):
    """A record's id is another stored record's (another app's, or another call's): it is
    refused rather than merged into that one."""

    MARK = "scrutiny: record id taken by another record"

    def __init__(self, record_id: str, app_id: str, given_app_id: str | None = None) -> None:
        again = ("" if given_app_id not in (None, app_id) else
                 " If it is the same record given again (a script scoring a dataset run "
                 "again), give it the start_time it was stored with: without one a record "
                 "is dated when it is made, so made again it is another call")
        super().__init__(f"{self.MARK}: {record_id!r} is already the id of a record of app "
                         f"{app_id!r}; give each record an id of its own (uuid4) — or leave "
                         f"record_id out and Scrutiny makes one.{again}")


class ResultNameTaken(StorageError):
    """A stored record given again (another process, a script run again) with a feedback
    whose name it already has a result of: refused rather than stored beside it."""

    MARK = "scrutiny: the record already has a result of that feedback name"

    def __init__(self, record_id: str, feedback_name: str) -> None:
        super().__init__(
            f"{self.MARK}: record {record_id!r} has a result of {feedback_name!r} already "
            "(an earlier run, another process, or the same record given twice — a line "
            "repeated in a log); a second one under that name "
            "would hide the first. To score it again, store the new run under another "
            "app_version (or with new record ids), or delete the old records first "
            "(session.delete_records); a result that failed is evaluated again by "
            "session.retry_failed([feedback])")


def refuse_repeats(records: Sequence[Row], results: Sequence[Row]) -> None:
    """Refuse a batch that gives one record id to two different records, or one record two
    results of one feedback name (RecordIdTaken, ResultNameTaken: the writer then stores
    its items one by one, and the repeat is refused on its own).

    A store compares what it is given with what it holds; a repeat inside one batch — a
    line repeated in a log, ingested in one loop — passed that check: both results were
    stored, shown as "name (2)" and counted twice in every aggregate.
    """
    if len(records) > 1:
        first_of: dict[str, Row] = {}
        for row in records:
            first = first_of.setdefault(row["record_id"], row)
            if first is not row and (first["app_id"] != row["app_id"]
                                     or first.get("start_time") != row.get("start_time")):
                raise RecordIdTaken(row["record_id"], first["app_id"], row["app_id"])
    if len(results) > 1:
        named: dict[tuple[str, str], str] = {}
        for row in results:
            key = (row["record_id"], row["feedback_name"])
            if named.setdefault(key, row["result_id"]) != row["result_id"]:
                raise ResultNameTaken(*key)


@dataclass(slots=True)
class UpdateResult:
    """New values for one result row, applied only while its status is in `from_statuses`
    and, when `lease_token` is given, only while the row is still held with that token (a
    late result from a lease that expired cannot overwrite a newer claim's)."""

    result_id: str
    values: Row
    from_statuses: tuple[str, ...] = ("pending", "running")
    lease_token: str | None = None
    refused: bool = field(default=False, compare=False)
    """Set by the store's write: the update matched no row (the row had left those
    statuses, another holder had the lease, or it was deleted)."""
    stored: Row | None = field(default=None, compare=False)
    """With `refused`: the row as the database holds it instead (None: no such row)."""


@dataclass(slots=True)
class RenewLeases:
    """Extend the leases of the unfinished results a worker (or session) holds: those of
    `result_ids` (every one it holds when None).

    A row another transaction holds locked is skipped, not waited for (PostgreSQL: `FOR
    UPDATE SKIP LOCKED`): one row locked for good made every renewal fail or block, every
    other lease ran out, and workers took over results still being evaluated. The next
    renewal (a lease outlives two of them) tries it again."""

    worker_id: str
    expires_at: datetime
    result_ids: tuple[str, ...] | None = None


WriteOp = InsertRecord | UpdateResult | RenewLeases


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """Which records to read: filters and a page.

    Args:
        app_ids: app ids, or app names (a value no app has as its id). None: every app;
            empty: none (as for `app_versions` and `statuses`).
        app_versions: app versions.
        record_status: ``ok``, ``error`` or ``cancelled``.
        feedback_name: with `statuses` and/or a score range, keep records whose result of
            this feedback matches.
        statuses: result statuses of `feedback_name` to keep.
        min_score, max_score: score range (inclusive) of `feedback_name`.
        search: text the input or output contains (case-insensitive).
        limit, offset: the page.
    """

    app_ids: tuple[str, ...] | None = None
    app_versions: tuple[str, ...] | None = None
    record_status: str | None = None
    feedback_name: str | None = None
    statuses: tuple[str, ...] | None = None
    min_score: float | None = None
    max_score: float | None = None
    search: str | None = None
    limit: int = 50
    offset: int = 0


@runtime_checkable
class Store(Protocol):
    """Where records and results live. Implementations: SQL (SQLAlchemy) and in-memory."""

    url: str

    def write(self, ops: Sequence[WriteOp]) -> None:
        """Apply every operation in one transaction (all or nothing)."""

    def records_and_results(
        self,
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[Row], list[Row]]:
        """Record rows (newest first) and the result rows that belong to them."""
        ...

    def record(self, record_id: str) -> tuple[Row | None, list[Row]]:
        """One record row and its result rows."""
        ...

    def aggregates(self, *, app_ids: Sequence[str] | None = None
                   ) -> tuple[list[Row], list[Row]]:
        """Per app version (app_id, app_name, app_version, records, latency, total_tokens)
        and per app version, feedback and status (app_id, feedback_name, status, n, mean)."""
        ...

    def query_records(self, query: RecordQuery) -> tuple[list[Row], list[Row], int]:
        """A page of matching records (newest first), their results, and the total count."""
        ...

    def definitions(self) -> list[Row]:
        """Every feedback definition row."""
        ...

    def feedback_ids_of(self, names: Sequence[str], app_ids: Sequence[str]) -> list[Row]:
        """Which definitions the results of these feedback names have, per app id: each
        distinct (app_id, feedback_name, feedback_id) among results of `names` in apps
        `app_ids` (exact ids)."""
        ...

    def claim(self, *, worker_id: str, token: str, limit: int, lease_seconds: float,
              now: datetime, exclude_feedback_ids: Sequence[str] = ()) -> list[Row]:
        """Take up to `limit` claimable results: pending or running with no live lease,
        of any feedback but those in `exclude_feedback_ids`.

        Claimed rows are held by `worker_id` with `token` until `now + lease_seconds`,
        their `attempts` counted up; two callers never get the same row. They are `pending`
        (with no `started_at`) until their evaluation really starts: the holder stores
        `running`, with the time it started, itself. A claimed row is a pending one with a
        live lease, as the rows an app evaluates itself are from the start.
        """
        ...

    def release(self, result_ids: Sequence[str], *, token: str) -> int:
        """Give back claims still held with `token` (started or not): the results are
        `pending` again, free for any worker, their `attempts` as before the claim. Returns
        how many."""
        ...

    def results_by_ids(self, result_ids: Sequence[str]) -> list[Row]:
        """The current rows of these results."""
        ...

    def results_final(self, result_ids: Sequence[str]) -> tuple[list[Row], set[str]]:
        """The rows of those of these results that have an end state (done, failed,
        skipped), and the ids of those that are not stored (yet, or any more)."""
        ...

    def records_by_ids(self, record_ids: Sequence[str]) -> list[Row]:
        """The rows of these records."""
        ...

    def delete_records(self, *, before: datetime | None = None,
                       app_ids: Sequence[str] | None = None,
                       record_ids: Sequence[str] | None = None) -> int:
        """Delete records (and their results) older than `before`, of these apps and/or of
        these ids (the conditions given all hold)."""
        ...

    def reopen_failed(self, *, feedback_names: Sequence[str] | None = None,
                      app_ids: Sequence[str] | None = None, now: datetime) -> int:
        """Make `failed` results pending again, as if never tried (of these feedback names
        and apps; None: all); returns how many."""
        ...

    def count_results(self) -> dict[str, int]:
        """How many results have each status."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""


def json_escaped(text: str) -> str:
    """`text` as it is written inside a stored JSON string (its escapes, no quotes)."""
    return orjson.dumps(text).decode()[1:-1]


def search_regex(term: str) -> str:
    """A case-insensitive regular expression finding `term` in stored JSON text, and not
    inside an escape: searching "nhere" found "line\\nhere" (a newline, then "here"), and
    "u001b" any text holding an escape character. The term, escaped as JSON, must follow
    an even number of backslashes. (Python's and PostgreSQL's syntax alike.)"""
    return r"(?i)(?:^|[^\\])(?:\\\\)*" + re.escape(json_escaped(term))


def search_matcher(term: str) -> Callable[[str | None], bool]:
    """Whether stored JSON text holds `term` (see :func:`search_regex`)."""
    pattern = re.compile(search_regex(term))
    return lambda text: text is not None and pattern.search(text) is not None
