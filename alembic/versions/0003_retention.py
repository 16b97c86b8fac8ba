"""Retention: archive_chunks, and the indexes retention reads in order.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Room for "retention:<table>", an operator's run of one table.
    op.alter_column("maintenance_runs", "task", type_=sa.String(50), existing_nullable=False)
    op.create_table(
        "archive_chunks",
        sa.Column("object_key", sa.Text(), nullable=False),
        sa.Column("table_name", sa.String(63), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("first_key", sa.Text(), nullable=False),
        sa.Column("last_key", sa.Text(), nullable=False),
        sa.Column("first_at", TZ, nullable=False),
        sa.Column("last_at", TZ, nullable=False),
        sa.Column("run", sa.Text(), nullable=False),
        sa.Column("archived_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("object_key", name="pk_archive_chunks"),
        sa.CheckConstraint(
            "state IN ('exported', 'archived')", name="ck_archive_chunks_state_known"
        ),
    )
    op.create_index("idx_archive_chunks_table_time", "archive_chunks", ["table_name", "first_at"])
    op.create_index("idx_metric_ids_timestamp", "system_metric_ids", ["timestamp"])
    op.create_index("idx_feedback_updated", "insight_feedback", ["updated_at", "id"])
    op.create_index(
        "idx_backfill_finished",
        "backfill_jobs",
        ["status_event_at", "id"],
        postgresql_where=sa.text("status IN ('completed', 'failed')"),
    )


def downgrade() -> None:
    op.drop_index("idx_backfill_finished", table_name="backfill_jobs")
    op.drop_index("idx_feedback_updated", table_name="insight_feedback")
    op.drop_index("idx_metric_ids_timestamp", table_name="system_metric_ids")
    op.drop_index("idx_archive_chunks_table_time", table_name="archive_chunks")
    op.drop_table("archive_chunks")
    op.alter_column("maintenance_runs", "task", type_=sa.String(20), existing_nullable=False)
