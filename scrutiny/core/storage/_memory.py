"""An in-memory store: the fake for tests and for sessions that keep nothing."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from scrutiny.core.storage._base import (
    InsertRecord,
    RecordIdTaken,
    RecordQuery,
    RenewLeases,
    ResultNameTaken,
    Row,
    UpdateResult,
    WriteOp,
    search_matcher,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps rows in dicts, with the same all-or-nothing batches as the SQL store."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._lock = threading.Lock()
        self._apps: dict[str, Row] = {}
        self._records: dict[str, Row] = {}
        self._definitions: dict[str, Row] = {}
        self._results: dict[str, Row] = {}

    def write(self, ops: Sequence[WriteOp]) -> None:
        with self._lock:
            results = dict(self._results)  # apply to a copy: all or nothing
            records = dict(self._records)
            for op in ops:
                if isinstance(op, InsertRecord):
                    self._apps.setdefault(op.app["app_id"], dict(op.app))
                    for d in op.definitions:  # (the latest says the direction, options)
                        self._definitions.setdefault(d["feedback_id"], dict(d)).update(
                            higher_is_better=d["higher_is_better"],
                            spec_json=d.get("spec_json"))
                    record_id = op.record["record_id"]
                    held = records.get(record_id)
                    if held is None:
                        records[record_id] = dict(op.record)
                    else:  # given again: kept, as SQLStore keeps it (see refuse_repeats)
                        _same_record(held, op.record)
                        named = {r["feedback_name"]: r["result_id"] for r in results.values()
                                 if r["record_id"] == record_id}
                        for r in op.results:
                            if named.get(r["feedback_name"], r["result_id"]) != r["result_id"]:
                                raise ResultNameTaken(record_id, r["feedback_name"])
                    for r in op.results:
                        results[r["result_id"]] = dict(r)
                elif isinstance(op, UpdateResult):
                    row = results.get(op.result_id)
                    op.refused = not (row is not None and row["status"] in op.from_statuses and (
                        op.lease_token is None or row.get("lease_token") == op.lease_token))
                    op.stored = None if row is None or not op.refused else dict(row)
                    if not op.refused:
                        results[op.result_id] = {**row, **op.values}  # type: ignore[dict-item]
                elif isinstance(op, RenewLeases):
                    ids = list(results) if op.result_ids is None else op.result_ids
                    for rid in ids:
                        row = results.get(rid)
                        if row is not None and row.get("worker_id") == op.worker_id and \
                                row["status"] in ("pending", "running"):
                            results[rid] = {**row, "lease_expires_at": op.expires_at}
            self._records, self._results = records, results

    reads_columns = True
    """As SQLStore's: `records_and_results` and `query_records` take `record_columns` /
    `result_columns` (None: every column), and `records_and_results_in_pages`."""

    def records_and_results(
        self,
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None,
    ) -> tuple[list[Row], list[Row]]:
        with self._lock:
            wanted = self._app_matcher(app_ids)
            rows = [r for r in self._records.values() if wanted(r)]
            rows.sort(key=lambda r: r["start_time"], reverse=True)
            rows = rows[offset: None if limit is None else offset + limit]
            ids = {r["record_id"] for r in rows}
            results = sorted((r for r in self._results.values() if r["record_id"] in ids),
                             key=lambda r: (r["created_at"], r["result_id"]))  # (as SQL's)
            return (copy.deepcopy(_only(rows, record_columns)),
                    copy.deepcopy(_only(results, result_columns)))

    def records_and_results_in_pages(
        self,
        each: Callable[[list[Row], list[Row]], object],
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        record_columns: Sequence[str] | None = None,
        result_columns: Sequence[str] | None = None,
        page: int = 5000,
    ) -> None:
        """As SQLStore's (here: one page, read at once)."""
        each(*self.records_and_results(app_ids=app_ids, limit=limit, offset=offset,
                                       record_columns=record_columns,
                                       result_columns=result_columns))

    def record(self, record_id: str) -> tuple[Row | None, list[Row]]:
        with self._lock:
            row = self._records.get(record_id)
            results = sorted((r for r in self._results.values() if r["record_id"] == record_id),
                             key=lambda r: (r["created_at"], r["result_id"]))  # (as SQL's)
            return copy.deepcopy(row), copy.deepcopy(results)

    def aggregates(self, *, app_ids: Sequence[str] | None = None
                   ) -> tuple[list[Row], list[Row]]:
        with self._lock:
            apps: dict[str, Row] = {}
            wanted = self._app_matcher(app_ids)
            for r in self._records.values():
                if not wanted(r):
                    continue
                a = apps.setdefault(r["app_id"], {
                    "app_id": r["app_id"], "app_name": r["app_name"],
                    "app_version": r["app_version"], "records": 0, "_lat": [], "_tok": []})
                a["records"] += 1
                a["_lat"].append(r["latency_s"])
                if r.get("total_tokens") is not None:
                    a["_tok"].append(r["total_tokens"])
            for a in apps.values():
                lat, tok = a.pop("_lat"), a.pop("_tok")
                a["latency"] = sum(lat) / len(lat)
                a["total_tokens"] = sum(tok) / len(tok) if tok else None
            groups: dict[tuple[str, str, str], list[float | None]] = {}
            for res in self._results.values():
                if res["app_id"] in apps:
                    key = (res["app_id"], res["feedback_name"], res["status"])
                    groups.setdefault(key, []).append(res.get("score"))
            results = []
            for (app, name, status), scores in groups.items():
                present = [s for s in scores if s is not None]
                results.append({"app_id": app, "feedback_name": name, "status": status,
                                "n": len(scores),
                                "mean": math.fsum(v / len(present) for v in present)
                                if present else None})  # (1e308 and 1.5e308: no inf)
            return list(apps.values()), results

    def query_records(self, query: RecordQuery, *,
                      record_columns: Sequence[str] | None = None,
                      result_columns: Sequence[str] | None = None
                      ) -> tuple[list[Row], list[Row], int]:
        with self._lock:
            by_record: dict[str, list[Row]] = {}
            for res in self._results.values():
                by_record.setdefault(res["record_id"], []).append(res)

            wanted = self._app_matcher(query.app_ids)

            found = search_matcher(query.search or "")

            def keep(r: Row) -> bool:
                if not wanted(r):
                    return False
                if query.app_versions is not None and \
                        r["app_version"] not in query.app_versions:
                    return False
                if query.record_status and r["status"] != query.record_status:
                    return False
                if query.search and not (found(r.get("input_json"))
                                         or found(r.get("output_json"))):
                    return False
                if query.statuses is not None or (query.feedback_name and (
                        query.min_score is not None or query.max_score is not None)):
                    return any(_result_matches(res, query)
                               for res in by_record.get(r["record_id"], []))
                return True

            rows = sorted((r for r in self._records.values() if keep(r)),
                          key=lambda r: (-r["start_time"].timestamp(), r["record_id"]))
            page = rows[query.offset: query.offset + query.limit]
            results = sorted((res for r in page for res in by_record.get(r["record_id"], [])),
                             key=lambda r: (r["created_at"], r["result_id"]))  # (as SQL's)
            return (copy.deepcopy(_only(page, record_columns)),
                    copy.deepcopy(_only(results, result_columns)), len(rows))

    def definitions(self) -> list[Row]:
        with self._lock:
            return copy.deepcopy(list(self._definitions.values()))

    def feedback_ids_of(self, names: Sequence[str], app_ids: Sequence[str]) -> list[Row]:
        wanted, apps = set(names), set(app_ids)
        with self._lock:
            found = {(r["app_id"], r["feedback_name"], r["feedback_id"])
                     for r in self._results.values()
                     if r["feedback_name"] in wanted and r["app_id"] in apps}
        return [{"app_id": a, "feedback_name": n, "feedback_id": f} for a, n, f in found]

    def claim(self, *, worker_id: str, token: str, limit: int, lease_seconds: float,
              now: datetime, exclude_feedback_ids: Sequence[str] = ()) -> list[Row]:
        excluded = set(exclude_feedback_ids)
        with self._lock:
            claimable = sorted(
                (r for r in self._results.values() if r["status"] in ("pending", "running")
                 and (r.get("lease_expires_at") is None or r["lease_expires_at"] < now)
                 and r.get("feedback_id") not in excluded),
                key=lambda r: r["created_at"])[:limit]
            claimed = []
            for r in claimable:
                r.update(status="pending", worker_id=worker_id, lease_token=token,
                         lease_expires_at=now + timedelta(seconds=lease_seconds),
                         attempts=(r.get("attempts") or 0) + 1, started_at=None, updated_at=now)
                claimed.append(dict(r))
            return claimed

    def release(self, result_ids: Sequence[str], *, token: str) -> int:
        released = 0
        with self._lock:
            for result_id in result_ids:
                r = self._results.get(result_id)
                if r is None or r["status"] not in ("pending", "running") or r.get(
                        "lease_token") != token:
                    continue
                r.update(status="pending", worker_id=None, lease_token=None,
                         lease_expires_at=None, started_at=None,
                         attempts=max(0, (r.get("attempts") or 1) - 1))
                released += 1
        return released

    def results_by_ids(self, result_ids: Sequence[str]) -> list[Row]:
        with self._lock:
            return [dict(self._results[i]) for i in result_ids if i in self._results]

    def results_final(self, result_ids: Sequence[str]) -> tuple[list[Row], set[str]]:
        rows = self.results_by_ids(result_ids)
        missing = set(result_ids) - {r["result_id"] for r in rows}
        return [r for r in rows if r["status"] in ("done", "failed", "skipped")], missing

    def records_by_ids(self, record_ids: Sequence[str]) -> list[Row]:
        with self._lock:
            return [dict(self._records[i]) for i in record_ids if i in self._records]

    def delete_records(self, *, before: datetime | None = None,
                       app_ids: Sequence[str] | None = None,
                       record_ids: Sequence[str] | None = None) -> int:
        with self._lock:
            wanted = self._app_matcher(app_ids)
            ids = None if record_ids is None else set(record_ids)
            doomed = {rid for rid, r in self._records.items()
                      if (before is None or r["start_time"] < before) and wanted(r)
                      and (ids is None or rid in ids)}
            self._records = {k: v for k, v in self._records.items() if k not in doomed}
            self._results = {k: v for k, v in self._results.items()
                             if v["record_id"] not in doomed}
            return len(doomed)

    def reopen_failed(self, *, feedback_names: Sequence[str] | None = None,
                      app_ids: Sequence[str] | None = None, now: datetime) -> int:
        with self._lock:
            wanted = self._app_matcher(app_ids)
            names = None if feedback_names is None else set(feedback_names)
            reopened = 0
            for rid, r in list(self._results.items()):
                record = self._records.get(r["record_id"])
                if r["status"] != "failed" or (names is not None and
                                               r["feedback_name"] not in names) or (
                        record is None or not wanted(record)):
                    continue
                self._results[rid] = {
                    **r, "status": "pending", "score": None, "explanation": None,
                    "error": None, "attempts": 0, "started_at": None, "ended_at": None,
                    "updated_at": now, "cost_json": None, "calls_json": None,
                    "worker_id": None, "lease_token": None, "lease_expires_at": None}
                reopened += 1
            return reopened

    def count_results(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for r in self._results.values():
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            return counts

    def close(self) -> None:
        return None

    def _app_matcher(self, app_ids: Sequence[str] | None) -> Callable[[Row], bool]:
        """Whether a record is of these apps, by the SQL store's rule: a value is an app
        id when some app has that id, and otherwise an app name (all its versions)."""
        if app_ids is None:
            return lambda row: True
        ids = {v for v in app_ids if v in self._apps}  # (none given: none selected)
        names = {v for v in app_ids if v not in self._apps}
        return lambda row: row["app_id"] in ids or row["app_name"] in names


def _result_matches(res: Row, query: RecordQuery) -> bool:
    if query.feedback_name and res["feedback_name"] != query.feedback_name:
        return False
    if query.statuses is not None and res["status"] not in query.statuses:
        return False
    score = res.get("score")
    if query.min_score is not None and (score is None or score < query.min_score):
        return False
    return not (query.max_score is not None and (score is None or score > query.max_score))


def _only(rows: list[Row], columns: Sequence[str] | None) -> list[Row]:
    """`rows` with only these columns (all of them for None)."""
    if columns is None:
        return rows
    return [{c: r.get(c) for c in columns} for r in rows]


def _same_record(held: Row, given: Row) -> None:
    """A record id given again must be the same record (the same app and start)."""
    if held["app_id"] != given["app_id"] or held.get("start_time") != given.get("start_time"):
        raise RecordIdTaken(given["record_id"], held["app_id"], given["app_id"])
