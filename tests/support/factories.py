"""Builders of valid payloads and events, overridable field by field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.backfill import BackfillProgressEvent
from schemas.feedback import FeedbackEvent
from schemas.metrics import MetricSample

# Six days ago at 10:00 UTC, never a fixed date: ingestion refuses events older than
# their table's retention window (``expired``), and a fixed date would age into it.
T0 = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0) - timedelta(days=6)
T0_TEXT = T0.isoformat().replace("+00:00", "Z")
"""``T0`` as RFC 3339 text, as payloads carry it."""


def at(minutes: float) -> datetime:
    """``T0`` plus ``minutes``: readable event times."""
    return T0 + timedelta(minutes=minutes)


def backfill_payload(**changes: Any) -> dict[str, Any]:
    """The example of CONTRACT.md, as decoded JSON."""
    payload: dict[str, Any] = {
        "job_id": "5d0e6f7a-3c1b-4f7e-9a55-1f1f7f1d2c3b",
        "job_type": "blocks",
        "start_block": 800000,
        "end_block": 810000,
        "current_block": 805000,
        "status": "running",
        "error_message": None,
        "estimated_completion": None,
        "created_by": "admin",
        "occurred_at": T0_TEXT,
    }
    payload.update(changes)
    return payload


def feedback_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "insight_id": "insight_123",
        "user_id": "user_456",
        "rating": 5,
        "comment": "Great insight!",
        "flag_type": None,
        "flag_reason": None,
        "occurred_at": T0_TEXT,
    }
    payload.update(changes)
    return payload


def metric_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "event_id": "0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11",
        "service_name": "web-api",
        "metric_type": "cpu",
        "metric_value": 45.5,
        "unit": "percent",
        "timestamp": T0_TEXT,
        "metadata": {"host": "a"},
    }
    payload.update(changes)
    return payload


def progress(
    job_id: uuid.UUID,
    *,
    occurred_at: datetime,
    current_block: int,
    status: str = "running",
    job_type: str = "blocks",
    start_block: int = 100,
    end_block: int = 200,
    **changes: Any,
) -> BackfillProgressEvent:
    """A backfill event of job ``job_id`` (blocks 100..200 unless told)."""
    return BackfillProgressEvent.model_validate(
        {
            "job_id": job_id,
            "job_type": job_type,
            "start_block": start_block,
            "end_block": end_block,
            "current_block": current_block,
            "status": status,
            "occurred_at": occurred_at,
            **changes,
        }
    )


def feedback(
    insight_id: str, user_id: str, *, occurred_at: datetime, **changes: Any
) -> FeedbackEvent:
    """A feedback event (rating 3 unless told)."""
    fields: dict[str, Any] = {"rating": 3}
    fields.update(changes)
    return FeedbackEvent.model_validate(
        {"insight_id": insight_id, "user_id": user_id, "occurred_at": occurred_at, **fields}
    )


def sample(
    *,
    service_name: str = "web-api",
    metric_type: str = "cpu",
    metric_value: float = 45.5,
    unit: str = "percent",
    timestamp: datetime | None = T0,
    **changes: Any,
) -> MetricSample:
    return MetricSample.model_validate(
        {
            "service_name": service_name,
            "metric_type": metric_type,
            "metric_value": metric_value,
            "unit": unit,
            "timestamp": timestamp,
            **changes,
        }
    )
