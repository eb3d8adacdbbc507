"""The storage interface: a handful of row operations, batched into one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["InsertRecord", "Row", "Store", "UpdateResult", "WriteOp"]

Row = dict[str, Any]


@dataclass(slots=True)
class InsertRecord:
    """A record with its app, its feedback definitions and its first result rows."""

    app: Row
    record: Row
    definitions: list[Row] = field(default_factory=list)
    results: list[Row] = field(default_factory=list)


@dataclass(slots=True)
class UpdateResult:
    """New values for one result row, applied only while its status is in `from_statuses`."""

    result_id: str
    values: Row
    from_statuses: tuple[str, ...] = ("pending", "running")


WriteOp = InsertRecord | UpdateResult


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

    def summary(self, *, app_ids: Sequence[str] | None = None) -> tuple[list[Row], list[Row]]:
        """Light rows for aggregates: records (record_id, app_id, app_name, app_version,
        latency_s, total_tokens) and results (app_id, feedback_id, feedback_name, status,
        score)."""
        ...

    def definitions(self) -> list[Row]:
        """Every feedback definition row."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
