"""Records of older releases that had no times get the time they were stored; and the
revision marks a change in what is stored, so older releases refuse the database.

- Hand-built records given no times were stored dated 1970-01-01 (start and end 0) by
  releases before this one; now a record without times is dated when it is made. Upgraded,
  the old rows stayed at 1970: they sorted last in newest-first listings, and a retention
  run (``delete_records(before=30 days ago)``) deleted records stored minutes before. They
  get their `created_at` as start and end (their latency stays 0).
- A span tree over 8 KB is stored deflated on SQLite (``zlib:`` and base64; see
  `scrutiny.core._rows`). Releases at 0005 opened such a database without a word and
  failed on every record holding one — a worker retried its claim for ever, and the other
  results of the batch were never evaluated. At 0006 they refuse it at start, saying to
  upgrade the package. (Any change in what is stored raises the revision, not only a
  change of tables.)

Running it again changes nothing. The downgrade leaves the dates as they are.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

from scrutiny.core.storage._schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    records = sa.table(f"{prefix}records", sa.column("start_time", UTCDateTime),
                       sa.column("end_time", UTCDateTime), sa.column("created_at", UTCDateTime))
    op.get_bind().execute(
        sa.update(records)
        .where(records.c.start_time == _EPOCH, records.c.end_time == _EPOCH)
        .values(start_time=records.c.created_at, end_time=records.c.created_at))


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    """The dates stay (the epoch was no one's time)."""
