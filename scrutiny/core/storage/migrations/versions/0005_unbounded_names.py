"""Names and ids of any length on PostgreSQL: app names, versions and ids, record ids,
the framework, the root run id and the worker id become TEXT.

They were VARCHAR(255), (512), (64), (128): SQLite stores any length, PostgreSQL refused
the whole row of a longer one — an app whose version was a long description (a prompt
template, a configuration) lost every record on PostgreSQL and kept them on SQLite.
VARCHAR(n) to TEXT is binary coercible on PostgreSQL: no table or index is rewritten.
On SQLite there is nothing to do (it ignores the lengths). The downgrade leaves them TEXT:
values longer than the old lengths may be stored by then.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WIDENED = {
    "apps": ("app_id", "app_name", "app_version"),
    "records": ("record_id", "app_id", "app_name", "app_version", "framework",
                "root_run_id"),
    "feedback_results": ("record_id", "app_id", "worker_id"),
}
"""Per table (without the prefix), the columns that become TEXT."""


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in WIDENED.items():
        for column in columns:
            op.alter_column(f"{prefix}{table}", column, type_=sa.Text())


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    """The columns stay TEXT (values longer than the old lengths may be stored by now)."""
