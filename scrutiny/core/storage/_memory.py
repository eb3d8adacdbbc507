"""An in-memory store: the fake for tests and for sessions that keep nothing."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

from scrutiny.core.storage._base import InsertRecord, RenewLeases, Row, UpdateResult, WriteOp

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
                    for d in op.definitions:
                        self._definitions.setdefault(d["feedback_id"], dict(d))
                    records[op.record["record_id"]] = dict(op.record)
                    for r in op.results:
                        results[r["result_id"]] = dict(r)
                elif isinstance(op, UpdateResult):
                    row = results.get(op.result_id)
                    if row is not None and row["status"] in op.from_statuses and (
                            op.lease_token is None or row.get("lease_token") == op.lease_token):
                        results[op.result_id] = {**row, **op.values}
                elif isinstance(op, RenewLeases):
                    for rid, row in results.items():
                        if row.get("worker_id") == op.worker_id and row["status"] in (
                                "pending", "running"):
                            results[rid] = {**row, "lease_expires_at": op.expires_at}
            self._records, self._results = records, results

    def records_and_results(
        self,
        *,
        app_ids: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[Row], list[Row]]:
        with self._lock:
            rows = [r for r in self._records.values() if _wanted(r, app_ids)]
            rows.sort(key=lambda r: r["start_time"], reverse=True)
            rows = rows[offset: None if limit is None else offset + limit]
            ids = {r["record_id"] for r in rows}
            results = [r for r in self._results.values() if r["record_id"] in ids]
            return copy.deepcopy(rows), copy.deepcopy(results)

    def record(self, record_id: str) -> tuple[Row | None, list[Row]]:
        with self._lock:
            row = self._records.get(record_id)
            results = [r for r in self._results.values() if r["record_id"] == record_id]
            return copy.deepcopy(row), copy.deepcopy(results)

    def summary(self, *, app_ids: Sequence[str] | None = None) -> tuple[list[Row], list[Row]]:
        with self._lock:
            records = [
                {k: r[k] for k in ("record_id", "app_id", "app_name", "app_version",
                                   "latency_s", "total_tokens")}
                for r in self._records.values() if _wanted(r, app_ids)
            ]
            apps = {r["app_id"] for r in records}
            results = [
                {k: r[k] for k in ("app_id", "feedback_id", "feedback_name", "status", "score")}
                for r in self._results.values() if r["app_id"] in apps
            ]
            return records, results

    def definitions(self) -> list[Row]:
        with self._lock:
            return copy.deepcopy(list(self._definitions.values()))

    def claim(self, *, worker_id: str, token: str, limit: int, lease_seconds: float,
              now: datetime) -> list[Row]:
        with self._lock:
            claimable = sorted(
                (r for r in self._results.values() if r["status"] in ("pending", "running")
                 and (r.get("lease_expires_at") is None or r["lease_expires_at"] < now)),
                key=lambda r: r["created_at"])[:limit]
            claimed = []
            for r in claimable:
                r.update(status="running", worker_id=worker_id, lease_token=token,
                         lease_expires_at=now + timedelta(seconds=lease_seconds),
                         attempts=(r.get("attempts") or 0) + 1, started_at=now, updated_at=now)
                claimed.append(dict(r))
            return claimed

    def results_by_ids(self, result_ids: Sequence[str]) -> list[Row]:
        with self._lock:
            return [dict(self._results[i]) for i in result_ids if i in self._results]

    def results_final(self, result_ids: Sequence[str]) -> list[Row]:
        return [r for r in self.results_by_ids(result_ids)
                if r["status"] in ("done", "failed", "skipped")]

    def records_by_ids(self, record_ids: Sequence[str]) -> list[Row]:
        with self._lock:
            return [dict(self._records[i]) for i in record_ids if i in self._records]

    def delete_records(self, *, before: datetime | None = None,
                       app_ids: Sequence[str] | None = None) -> int:
        with self._lock:
            doomed = {rid for rid, r in self._records.items()
                      if (before is None or r["start_time"] < before)
                      and (not app_ids or _wanted(r, app_ids))}
            self._records = {k: v for k, v in self._records.items() if k not in doomed}
            self._results = {k: v for k, v in self._results.items()
                             if v["record_id"] not in doomed}
            return len(doomed)

    def count_results(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for r in self._results.values():
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            return counts

    def close(self) -> None:
        return None


def _wanted(row: Row, app_ids: Sequence[str] | None) -> bool:
    return not app_ids or row["app_id"] in app_ids or row["app_name"] in app_ids
