"""Deferred evaluation: claim leases on results, and feedback specs workers can load.

A database of the first release (tables made without Alembic, stamped 0001 when adopted:
see `scrutiny.core.storage._migrate`) already has `worker_id` and `lease_expires_at`: only
what is missing is added.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from scrutiny.core.storage._schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    inspector = sa.inspect(op.get_bind())
    results = f"{prefix}feedback_results"
    has = {c["name"] for c in inspector.get_columns(results)}
    added = [column for column in (sa.Column("worker_id", sa.String(255)),
                                   sa.Column("lease_token", sa.String(64)),
                                   sa.Column("lease_expires_at", UTCDateTime))
             if column.name not in has]
    if added:
        with op.batch_alter_table(results) as batch:
            for column in added:
                batch.add_column(column)
    if f"{prefix}ix_results_claim" not in {i["name"] for i in inspector.get_indexes(results)}:
        op.create_index(f"{prefix}ix_results_claim", results, ["status", "lease_expires_at"])
    definitions = f"{prefix}feedback_definitions"
    if "spec_json" not in {c["name"] for c in inspector.get_columns(definitions)}:
        with op.batch_alter_table(definitions) as batch:
            batch.add_column(sa.Column("spec_json", sa.Text))


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    op.drop_index(f"{prefix}ix_results_claim", f"{prefix}feedback_results")
    with op.batch_alter_table(f"{prefix}feedback_results") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("worker_id")
    with op.batch_alter_table(f"{prefix}feedback_definitions") as batch:
        batch.drop_column("spec_json")
