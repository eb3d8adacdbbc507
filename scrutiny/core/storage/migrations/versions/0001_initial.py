"""The first schema: apps, records (with their spans), feedback definitions and results.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from scrutiny.core.storage._schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    op.create_table(
        f"{prefix}apps",
        sa.Column("app_id", sa.String(512), primary_key=True),
        sa.Column("app_name", sa.String(255), nullable=False),
        sa.Column("app_version", sa.String(255), nullable=False),
        sa.Column("metadata_json", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        f"{prefix}records",
        sa.Column("record_id", sa.String(64), primary_key=True),
        sa.Column("app_id", sa.String(512), sa.ForeignKey(f"{prefix}apps.app_id"),
                  nullable=False),
        sa.Column("app_name", sa.String(255), nullable=False),
        sa.Column("app_version", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input_json", sa.Text),
        sa.Column("output_json", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("start_time", UTCDateTime, nullable=False),
        sa.Column("end_time", UTCDateTime, nullable=False),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("total_tokens", sa.Integer),
        sa.Column("spans_json", sa.Text),
        sa.Column("contexts_json", sa.Text),
        sa.Column("tags_json", sa.Text),
        sa.Column("metadata_json", sa.Text),
        sa.Column("framework", sa.String(64)),
        sa.Column("root_run_id", sa.String(128)),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index(f"{prefix}ix_records_app_time", f"{prefix}records", ["app_id", "start_time"])
    op.create_index(f"{prefix}ix_records_time", f"{prefix}records", ["start_time"])
    op.create_table(
        f"{prefix}feedback_definitions",
        sa.Column("feedback_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("higher_is_better", sa.Boolean, nullable=False),
        sa.Column("implementation", sa.Text),
        sa.Column("selectors_json", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        f"{prefix}feedback_results",
        sa.Column("result_id", sa.String(64), primary_key=True),
        sa.Column("record_id", sa.String(64),
                  sa.ForeignKey(f"{prefix}records.record_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("app_id", sa.String(512), nullable=False),
        sa.Column("feedback_id", sa.String(64), nullable=False),
        sa.Column("feedback_name", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("explanation", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("ended_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("cost_json", sa.Text),
        sa.Column("calls_json", sa.Text),
    )
    op.create_index(f"{prefix}ix_results_record", f"{prefix}feedback_results", ["record_id"])
    op.create_index(f"{prefix}ix_results_status", f"{prefix}feedback_results", ["status"])
    op.create_index(f"{prefix}ix_results_app_feedback", f"{prefix}feedback_results",
                    ["app_id", "feedback_name", "status"])


def downgrade(prefix: str = "scrutiny_", **_: Any) -> None:
    for table in ("feedback_results", "feedback_definitions", "records", "apps"):
        op.drop_table(f"{prefix}{table}")
