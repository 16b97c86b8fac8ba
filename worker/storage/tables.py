"""The tables of the design document, as SQLAlchemy Core metadata.

This is Alembic's target: ``alembic check`` compares the migrations with it, so a
column added here without a migration fails the test suite.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TZ = DateTime(timezone=True)

backfill_jobs = Table(
    "backfill_jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("job_type", String(50), nullable=False),
    Column("start_block", Integer, nullable=False),
    Column("end_block", Integer, nullable=False),
    Column("current_block", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("progress_percentage", Numeric(5, 2), nullable=False),
    Column("estimated_completion", TZ),
    Column("error_message", Text),
    Column("started_at", TZ, nullable=False),
    Column("completed_at", TZ),
    Column("created_by", String(100)),
    # Order keys of the merge (see handlers/backfill.py): the (occurred_at, event_key)
    # of the event that set status, of the earliest event, and of the completing one.
    Column("status_event_at", TZ, nullable=False),
    Column("status_event_key", LargeBinary, nullable=False),
    Column("first_event_key", LargeBinary, nullable=False),
    Column("completing_event_key", LargeBinary),
    CheckConstraint(
        "0 <= start_block AND start_block <= current_block AND current_block <= end_block",
        name="blocks_in_order",
    ),
    CheckConstraint("status IN ('running', 'paused', 'completed', 'failed')", name="status_known"),
    Index("idx_backfill_status", "status"),
    Index("idx_backfill_started", text("started_at DESC")),
    Index("idx_backfill_job_type", "job_type"),
    # Retention's order over finished jobs: oldest last update first.
    Index(
        "idx_backfill_finished",
        "status_event_at",
        "id",
        postgresql_where=text("status IN ('completed', 'failed')"),
    ),
)

insight_feedback = Table(
    "insight_feedback",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("insight_id", String(100), nullable=False),
    Column("user_id", String(100), nullable=False),
    Column("rating", Integer),
    Column("comment", Text),
    Column("flag_type", String(50)),
    Column("flag_reason", Text),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
    # Breaks ties between events with the same occurred_at, deterministically.
    Column("event_key", LargeBinary, nullable=False),
    UniqueConstraint("insight_id", "user_id", name="uq_insight_feedback_insight_user"),
    CheckConstraint("rating BETWEEN 1 AND 5", name="rating_range"),
    CheckConstraint(
        "flag_type IS NULL OR flag_type IN ('inaccurate', 'misleading', 'spam', 'other')",
        name="flag_type_known",
    ),
    Index("idx_feedback_insight", "insight_id"),
    Index("idx_feedback_user", "user_id"),
    Index("idx_feedback_created", text("created_at DESC")),
    # Retention's order: oldest update first.
    Index("idx_feedback_updated", "updated_at", "id"),
)

# Kept by triggers on insight_feedback, in the writing statement (migration 0004): a
# cache miss of an insight's stats reads one row, however many ratings it has.
insight_feedback_stats = Table(
    "insight_feedback_stats",
    metadata,
    Column("insight_id", String(100), nullable=False),
    Column("total_ratings", Integer, nullable=False, server_default=text("0")),
    Column("rating_sum", BigInteger, nullable=False, server_default=text("0")),
    *(
        Column(f"ratings_{n}", Integer, nullable=False, server_default=text("0"))
        for n in range(1, 6)
    ),
    Column("total_comments", Integer, nullable=False, server_default=text("0")),
    Column("total_flags", Integer, nullable=False, server_default=text("0")),
    *(
        Column(f"flags_{f}", Integer, nullable=False, server_default=text("0"))
        for f in ("inaccurate", "misleading", "spam", "other")
    ),
    PrimaryKeyConstraint("insight_id", name="pk_insight_feedback_stats"),
)

# Partitioned by month on "timestamp" (see the migration): the primary key must then
# include the partition key, so the identity of a sample is made unique across
# partitions by system_metric_ids below.
system_metrics = Table(
    "system_metrics",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False),
    Column("service_name", String(100), nullable=False),
    Column("metric_type", String(50), nullable=False),
    Column("metric_value", Double, nullable=False),
    Column("unit", String(20), nullable=False),
    Column("timestamp", TZ, nullable=False),
    Column("metadata", JSONB),
    PrimaryKeyConstraint("id", "timestamp", name="pk_system_metrics"),
    Index("idx_metrics_service_time", "service_name", text('"timestamp" DESC')),
    Index("idx_metrics_type_time", "metric_type", text('"timestamp" DESC')),
    postgresql_partition_by="RANGE (timestamp)",
)

system_metric_ids = Table(
    "system_metric_ids",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    # Kept so that retention can forget the identities of the samples it archived.
    Column("timestamp", TZ, nullable=False),
    Index("idx_metric_ids_timestamp", "timestamp"),
)


# One row per maintenance run (CONTRACT.md, maintenance): a run is (task, UTC day).
# The primary key is what makes "one run per task and day" hold across processes:
# a delivery claims the row in one statement, or finds who holds it.
maintenance_runs = Table(
    "maintenance_runs",
    metadata,
    # "backup", "retention", or "retention:<table>" (a run of one table, from the CLI).
    Column("task", String(50), nullable=False),
    Column("run_day", Date, nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("owner", String(200), nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("started_at", TZ, nullable=False),
    # Refreshed by the owner while it runs: a stale heartbeat means the owner died.
    Column("heartbeat_at", TZ, nullable=False),
    Column("finished_at", TZ),
    # [{"uri", "size_bytes", "sha256"}] of what the run wrote.
    Column("objects", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    # Rows per table the run dumped (backup) or archived (retention).
    Column("row_counts", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("error", Text),
    PrimaryKeyConstraint("task", "run_day", name="pk_maintenance_runs"),
    CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="status_known"),
    CheckConstraint("attempt >= 1", name="attempt_positive"),
)


# One row per archive object whose rows left their table: inserted in the transaction
# that deletes them (or drops their partition), so "the rows are gone" and "their
# object is the archive" commit together. An object in the store without a row here
# (or with ``state`` not ``archived``) was left by an interrupted run: its rows are
# still in their table, and the next run deletes it before anything else.
archive_chunks = Table(
    "archive_chunks",
    metadata,
    Column("object_key", Text, nullable=False),
    Column("table_name", String(63), nullable=False),
    Column("state", String(20), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("first_key", Text, nullable=False),
    Column("last_key", Text, nullable=False),
    Column("first_at", TZ, nullable=False),
    Column("last_at", TZ, nullable=False),
    Column("run", Text, nullable=False),
    Column("archived_at", TZ, nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("object_key", name="pk_archive_chunks"),
    CheckConstraint("state IN ('exported', 'archived')", name="state_known"),
    Index("idx_archive_chunks_table_time", "table_name", "first_at"),
)
