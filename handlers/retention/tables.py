"""What retention knows of each table: its window, its order, its archive line.

A table's rows leave oldest first, in the order of ``(age column, id)``; a chunk is a
run of consecutive rows in that order, and its first and last keys name its object.
Archive lines are the read API's shapes plus what an exact restore needs (ids, merge
keys): a restored row is the row that left.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from worker.config import Settings


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _parse_bytes(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


@dataclass(frozen=True)
class TableSpec:
    """One table under retention."""

    name: str
    window_setting: str
    age_column: str
    # Only these rows ever leave (finished backfill jobs); "TRUE" for every row.
    eligible: str
    columns: tuple[str, ...]
    # One archive line per row, built by PostgreSQL (COPY streams it: no per-row Python).
    line_sql: str
    from_line: Callable[[dict[str, Any]], tuple[Any, ...]]

    def window_days(self, settings: Settings) -> int:
        return int(getattr(settings, self.window_setting))

    def column_list(self) -> str:
        return ", ".join(f'"{c}"' for c in self.columns)


def edge_key(at: datetime, row_id: UUID) -> str:
    """A chunk edge's name: the age (UTC, to the microsecond) and the id's first part."""
    return f"{at.strftime('%Y%m%dT%H%M%S%fZ')}_{row_id.hex[:8]}"


def _feedback_row(line: dict[str, Any]) -> tuple[Any, ...]:
    return (
        UUID(line["id"]),
        line["insight_id"],
        line["user_id"],
        line["rating"],
        line["comment"],
        line["flag_type"],
        line["flag_reason"],
        _parse_time(line["created_at"]),
        _parse_time(line["updated_at"]),
        _parse_bytes(line["event_key"]),
    )


FEEDBACK = TableSpec(
    name="insight_feedback",
    window_setting="feedback_retention_days",
    age_column="updated_at",
    eligible="TRUE",
    columns=(
        "id",
        "insight_id",
        "user_id",
        "rating",
        "comment",
        "flag_type",
        "flag_reason",
        "created_at",
        "updated_at",
        "event_key",
    ),
    line_sql="""json_build_object('id', id, 'insight_id', insight_id, 'user_id', user_id,
        'rating', rating, 'comment', comment, 'flag_type', flag_type,
        'flag_reason', flag_reason, 'created_at', created_at, 'updated_at', updated_at,
        'event_key', encode(event_key, 'base64'))""",
    from_line=_feedback_row,
)


def _job_row(line: dict[str, Any]) -> tuple[Any, ...]:
    return (
        UUID(line["job_id"]),
        line["job_type"],
        line["start_block"],
        line["end_block"],
        line["current_block"],
        line["status"],
        line["progress_percentage"],
        _parse_time(line["estimated_completion"]),
        line["error_message"],
        _parse_time(line["started_at"]),
        _parse_time(line["completed_at"]),
        line["created_by"],
        _parse_time(line["status_event_at"]),
        _parse_bytes(line["status_event_key"]),
        _parse_bytes(line["first_event_key"]),
        _parse_bytes(line["completing_event_key"]),
    )


BACKFILL = TableSpec(
    name="backfill_jobs",
    window_setting="backfill_retention_days",
    # The time of the event that set a finished job's status: its last update.
    age_column="status_event_at",
    eligible="status IN ('completed', 'failed')",
    columns=(
        "id",
        "job_type",
        "start_block",
        "end_block",
        "current_block",
        "status",
        "progress_percentage",
        "estimated_completion",
        "error_message",
        "started_at",
        "completed_at",
        "created_by",
        "status_event_at",
        "status_event_key",
        "first_event_key",
        "completing_event_key",
    ),
    line_sql="""json_build_object('job_id', id, 'job_type', job_type,
        'start_block', start_block, 'end_block', end_block, 'current_block', current_block,
        'status', status, 'progress_percentage', progress_percentage,
        'estimated_completion', estimated_completion, 'error_message', error_message,
        'started_at', started_at, 'completed_at', completed_at, 'created_by', created_by,
        'status_event_at', status_event_at,
        'status_event_key', encode(status_event_key, 'base64'),
        'first_event_key', encode(first_event_key, 'base64'),
        'completing_event_key', encode(completing_event_key, 'base64'))""",
    from_line=_job_row,
)


def _metric_row(line: dict[str, Any]) -> tuple[Any, ...]:
    metadata = line["metadata"]
    return (
        UUID(line["id"]),
        line["service_name"],
        line["metric_type"],
        line["metric_value"],
        line["unit"],
        _parse_time(line["timestamp"]),
        None if metadata is None else json.dumps(metadata),
    )


METRICS = TableSpec(
    name="system_metrics",
    window_setting="metrics_retention_days",
    age_column="timestamp",
    eligible="TRUE",
    columns=("id", "service_name", "metric_type", "metric_value", "unit", "timestamp", "metadata"),
    line_sql="""json_build_object('id', id, 'service_name', service_name,
        'metric_type', metric_type, 'timestamp', "timestamp", 'metric_value', metric_value,
        'unit', unit, 'metadata', metadata)""",
    from_line=_metric_row,
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (METRICS, FEEDBACK, BACKFILL)}
"""Every table under retention, by name (CONTRACT.md, Retention and archives)."""


def spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; retention knows {', '.join(TABLES)}") from None
