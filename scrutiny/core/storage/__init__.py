"""Storage: the interface, the SQL store and the in-memory fake."""

from __future__ import annotations

from scrutiny.core.storage._base import InsertRecord, Row, Store, UpdateResult, WriteOp
from scrutiny.core.storage._memory import MemoryStore
from scrutiny.core.storage._schema import SCHEMA_VERSION, Tables, UTCDateTime, build_tables
from scrutiny.core.storage._sql import SQLStore, redact_url

__all__ = [
    "SCHEMA_VERSION",
    "InsertRecord",
    "MemoryStore",
    "Row",
    "SQLStore",
    "Store",
    "Tables",
    "UTCDateTime",
    "UpdateResult",
    "WriteOp",
    "build_tables",
    "redact_url",
]
