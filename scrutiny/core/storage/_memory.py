"""An in-memory store: the fake for tests and for sessions that keep nothing."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

from scrutiny.core.storage._base import InsertRecord, Row, UpdateResult, WriteOp

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
                    if row is not None and row["status"] in op.from_statuses:
                        results[op.result_id] = {**row, **op.values}
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

    def close(self) -> None:
        return None


def _wanted(row: Row, app_ids: Sequence[str] | None) -> bool:
    return not app_ids or row["app_id"] in app_ids or row["app_name"] in app_ids
