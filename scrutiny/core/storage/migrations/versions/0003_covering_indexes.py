"""Covering indexes for the leaderboard's aggregates (100k+ records stay interactive); the
status index goes, as the claim index (status, lease_expires_at) serves its queries.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Any

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    op.drop_index(f"{prefix}ix_results_app_feedback", f"{prefix}feedback_results")
    op.drop_index(f"{prefix}ix_results_status", f"{prefix}feedback_results")
    op.create_index(f"{prefix}ix_results_app_feedback_score", f"{prefix}feedback_results",
                    ["app_id", "feedback_name", "status", "score"])
    op.create_index(f"{prefix}ix_records_app_summary", f"{prefix}records",
                    ["app_id", "app_name", "app_version", "latency_s", "total_tokens"])


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    op.drop_index(f"{prefix}ix_records_app_summary", f"{prefix}records")
    op.drop_index(f"{prefix}ix_results_app_feedback_score", f"{prefix}feedback_results")
    op.create_index(f"{prefix}ix_results_app_feedback", f"{prefix}feedback_results",
                    ["app_id", "feedback_name", "status"])
    op.create_index(f"{prefix}ix_results_status", f"{prefix}feedback_results", ["status"])
