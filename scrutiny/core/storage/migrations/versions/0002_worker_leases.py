"""Deferred evaluation: claim leases on results, and feedback specs workers can load.

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
    with op.batch_alter_table(f"{prefix}feedback_results") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(255)))
        batch.add_column(sa.Column("lease_token", sa.String(64)))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime))
    op.create_index(f"{prefix}ix_results_claim", f"{prefix}feedback_results",
                    ["status", "lease_expires_at"])
    with op.batch_alter_table(f"{prefix}feedback_definitions") as batch:
        batch.add_column(sa.Column("spec_json", sa.Text))


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    op.drop_index(f"{prefix}ix_results_claim", f"{prefix}feedback_results")
    with op.batch_alter_table(f"{prefix}feedback_results") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("worker_id")
    with op.batch_alter_table(f"{prefix}feedback_definitions") as batch:
        batch.drop_column("spec_json")
