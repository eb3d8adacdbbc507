"""The tables, built for a table prefix so Scrutiny can share a database with an app.

This is the schema at the newest migration (`migrations/versions`); the queries use it,
the migrations create it.

Payloads (inputs, outputs, spans, explanations' details) are stored as JSON *text*: it reads
back the same on SQLite and PostgreSQL, and escaped NUL bytes are legal in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import TypeDecorator

__all__ = ["HEAD_REVISION", "Tables", "UTCDateTime", "build_tables"]

HEAD_REVISION = "0006"
"""The newest migration; keep it equal to the last file in migrations/versions. Raise it
(with a migration, even one with nothing to change) for any change in what is stored, not
only in the tables: a release that meets a newer revision refuses the database, and one that
meets a format it does not know fails on every row holding it."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in, timezone-aware UTC datetimes out, on every backend.

    On SQLite the value is bound as the fixed-width text SQLAlchemy's own SQLite DATETIME
    stores (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), formatted here in one C call instead of
    SQLAlchemy's per-value Python formatting: the same bytes on disk, sortable as text.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_SQLiteUTCText())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Scrutiny stores UTC-aware datetimes")
        if dialect.name == "sqlite":
            return self.sqlite_text(value)
        return value.astimezone(timezone.utc) if value.utcoffset() else value

    @staticmethod
    def sqlite_text(value: datetime) -> str:
        """The stored text of an aware datetime on SQLite (UTC, fixed width)."""
        if value.tzinfo is timezone.utc:  # ours always are: no offset arithmetic
            return value.isoformat(" ", "microseconds")[:26]
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Scrutiny stores UTC-aware datetimes")
        if value.utcoffset():
            value = value.astimezone(timezone.utc)
        return value.isoformat(" ", "microseconds")[:26]  # C fast path; fixed width

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)


class _SQLiteUTCText(String):
    """DATETIME in the DDL (as before), plain text on the wire."""


@compiles(_SQLiteUTCText, "sqlite")
def _sqlite_utc_text_ddl(element: _SQLiteUTCText, compiler: Any, **kw: Any) -> str:
    return "DATETIME"


@dataclass(frozen=True)
class Tables:
    metadata: MetaData
    apps: Table
    records: Table
    definitions: Table
    results: Table


def build_tables(prefix: str = "scrutiny_") -> Tables:
    """The schema with every table (and index) name starting with `prefix`."""
    md = MetaData()
    apps = Table(
        f"{prefix}apps", md,
        Column("app_id", Text, primary_key=True),  # (any length: migration 0005)
        Column("app_name", Text, nullable=False),
        Column("app_version", Text, nullable=False),
        Column("metadata_json", Text),
        Column("created_at", UTCDateTime, nullable=False),
    )
    records = Table(
        f"{prefix}records", md,
        Column("record_id", Text, primary_key=True),
        Column("app_id", Text, ForeignKey(f"{prefix}apps.app_id"), nullable=False),
        Column("app_name", Text, nullable=False),
        Column("app_version", Text, nullable=False),
        Column("status", String(16), nullable=False),
        Column("input_json", Text),
        Column("output_json", Text),
        Column("error", Text),
        Column("start_time", UTCDateTime, nullable=False),
        Column("end_time", UTCDateTime, nullable=False),
        Column("latency_s", Float, nullable=False),
        Column("prompt_tokens", Integer),
        Column("completion_tokens", Integer),
        Column("total_tokens", Integer),
        Column("spans_json", Text),
        Column("contexts_json", Text),
        Column("tags_json", Text),
        Column("metadata_json", Text),
        Column("framework", Text),
        Column("root_run_id", Text),
        Column("created_at", UTCDateTime, nullable=False),
        Index(f"{prefix}ix_records_app_time", "app_id", "start_time"),
        Index(f"{prefix}ix_records_time", "start_time"),
        Index(f"{prefix}ix_records_app_summary", "app_id", "app_name", "app_version",
              "latency_s", "total_tokens"),
    )
    definitions = Table(
        f"{prefix}feedback_definitions", md,
        Column("feedback_id", String(64), primary_key=True),
        Column("name", Text, nullable=False),
        Column("higher_is_better", Boolean, nullable=False),
        Column("implementation", Text),
        Column("selectors_json", Text),
        Column("created_at", UTCDateTime, nullable=False),
        Column("spec_json", Text),
    )
    results = Table(
        f"{prefix}feedback_results", md,
        Column("result_id", String(64), primary_key=True),
        Column("record_id", Text,
               ForeignKey(f"{prefix}records.record_id", ondelete="CASCADE"), nullable=False),
        Column("app_id", Text, nullable=False),
        Column("feedback_id", String(64), nullable=False),
        Column("feedback_name", Text, nullable=False),
        Column("status", String(16), nullable=False),
        Column("score", Float),
        Column("explanation", Text),
        Column("error", Text),
        Column("attempts", Integer, nullable=False, default=0),
        Column("created_at", UTCDateTime, nullable=False),
        Column("started_at", UTCDateTime),
        Column("ended_at", UTCDateTime),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("cost_json", Text),
        Column("calls_json", Text),
        Column("worker_id", Text),
        Column("lease_token", String(64)),
        Column("lease_expires_at", UTCDateTime),
        Index(f"{prefix}ix_results_record", "record_id"),
        Index(f"{prefix}ix_results_app_feedback_score", "app_id", "feedback_name", "status",
              "score"),
        Index(f"{prefix}ix_results_claim", "status", "lease_expires_at"),
    )
    return Tables(md, apps, records, definitions, results)
