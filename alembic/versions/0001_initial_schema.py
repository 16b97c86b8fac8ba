"""Initial schema: backfill_jobs, insight_feedback, system_metrics (monthly partitions).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)

# Creates the month partition holding ``ts`` if it is missing. Serialised by an
# advisory lock so that two workers meeting a new month at once do not race on
# CREATE TABLE; names and bounds go through format(%I, %L), never concatenation.
ENSURE_PARTITION = """
CREATE FUNCTION ensure_system_metrics_partition(ts timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_naive timestamp := date_trunc('month', ts AT TIME ZONE 'UTC');
    partition_name text := format('system_metrics_y%sm%s',
                                  to_char(month_naive, 'YYYY'), to_char(month_naive, 'MM'));
BEGIN
    IF to_regclass(format('%I', partition_name)) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ensure_system_metrics_partition'));
    -- Not to_regclass again: its cached "no such relation" can outlive a concurrent
    -- creator's commit (the advisory lock does not refresh the catalog cache), while
    -- CREATE ... IF NOT EXISTS looks the name up after locking the schema, which does.
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF system_metrics FOR VALUES FROM (%L) TO (%L)',
        partition_name,
        month_naive AT TIME ZONE 'UTC',
        (month_naive + interval '1 month') AT TIME ZONE 'UTC');
    RETURN partition_name;
END;
$$;
"""


def upgrade() -> None:
    op.create_table(
        "backfill_jobs",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("job_type", sa.String(50), nullable=False),
        sa.Column("start_block", sa.Integer(), nullable=False),
        sa.Column("end_block", sa.Integer(), nullable=False),
        sa.Column("current_block", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("progress_percentage", sa.Numeric(5, 2), nullable=False),
        sa.Column("estimated_completion", TZ),
        sa.Column("error_message", sa.Text()),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("completed_at", TZ),
        sa.Column("created_by", sa.String(100)),
        sa.Column("status_event_at", TZ, nullable=False),
        sa.Column("status_event_key", sa.LargeBinary(), nullable=False),
        sa.Column("first_event_key", sa.LargeBinary(), nullable=False),
        sa.Column("completing_event_key", sa.LargeBinary()),
        sa.CheckConstraint(
            "0 <= start_block AND start_block <= current_block AND current_block <= end_block",
            name="ck_backfill_jobs_blocks_in_order",
        ),
        sa.CheckConstraint(
            "status IN ('running', 'paused', 'completed', 'failed')",
            name="ck_backfill_jobs_status_known",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_jobs"),
    )
    op.create_index("idx_backfill_status", "backfill_jobs", ["status"])
    op.create_index("idx_backfill_started", "backfill_jobs", [sa.text("started_at DESC")])
    op.create_index("idx_backfill_job_type", "backfill_jobs", ["job_type"])

    op.create_table(
        "insight_feedback",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("insight_id", sa.String(100), nullable=False),
        sa.Column("user_id", sa.String(100), nullable=False),
        sa.Column("rating", sa.Integer()),
        sa.Column("comment", sa.Text()),
        sa.Column("flag_type", sa.String(50)),
        sa.Column("flag_reason", sa.Text()),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("event_key", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("rating BETWEEN 1 AND 5", name="ck_insight_feedback_rating_range"),
        sa.CheckConstraint(
            "flag_type IS NULL OR flag_type IN ('inaccurate', 'misleading', 'spam', 'other')",
            name="ck_insight_feedback_flag_type_known",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_insight_feedback"),
        sa.UniqueConstraint("insight_id", "user_id", name="uq_insight_feedback_insight_user"),
    )
    op.create_index("idx_feedback_insight", "insight_feedback", ["insight_id"])
    op.create_index("idx_feedback_user", "insight_feedback", ["user_id"])
    op.create_index("idx_feedback_created", "insight_feedback", [sa.text("created_at DESC")])

    op.create_table(
        "system_metrics",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("service_name", sa.String(100), nullable=False),
        sa.Column("metric_type", sa.String(50), nullable=False),
        sa.Column("metric_value", sa.Double(), nullable=False),
        sa.Column("unit", sa.String(20), nullable=False),
        sa.Column("timestamp", TZ, nullable=False),
        sa.Column("metadata", postgresql.JSONB()),
        sa.PrimaryKeyConstraint("id", "timestamp", name="pk_system_metrics"),
        postgresql_partition_by="RANGE (timestamp)",
    )
    op.create_index(
        "idx_metrics_service_time", "system_metrics", ["service_name", sa.text('"timestamp" DESC')]
    )
    op.create_index(
        "idx_metrics_type_time", "system_metrics", ["metric_type", sa.text('"timestamp" DESC')]
    )
    op.create_table(
        "system_metric_ids",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("timestamp", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_system_metric_ids"),
    )
    op.execute(ENSURE_PARTITION)
    # The months around today exist from the start; later months appear on demand.
    op.execute(
        "SELECT ensure_system_metrics_partition(now() + make_interval(months => m))"
        " FROM generate_series(-1, 2) AS m"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS ensure_system_metrics_partition(timestamptz)")
    op.drop_table("system_metric_ids")
    op.drop_table("system_metrics")  # drops its partitions with it
    op.drop_table("insight_feedback")
    op.drop_table("backfill_jobs")
