"""Storage: the interface, the SQL store and the in-memory fake."""

from __future__ import annotations

from scrutiny.core.storage._base import (
    InsertRecord,
    RecordQuery,
    RenewLeases,
    Row,
    Store,
    UpdateResult,
    WriteOp,
)
from scrutiny.core.storage._memory import MemoryStore
from scrutiny.core.storage._migrate import MigratePolicy, current_revision, upgrade
from scrutiny.core.storage._schema import HEAD_REVISION, Tables, UTCDateTime, build_tables
from scrutiny.core.storage._sql import SQLStore, redact_url

__all__ = [
    "HEAD_REVISION",
    "InsertRecord",
    "MemoryStore",
    "MigratePolicy",
    "RecordQuery",
    "RenewLeases",
    "Row",
    "SQLStore",
    "Store",
    "Tables",
    "UTCDateTime",
    "UpdateResult",
    "WriteOp",
    "build_tables",
    "current_revision",
    "redact_url",
    "upgrade",
]
