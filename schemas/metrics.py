"""``metrics`` payload (one sample or a batch) and the metric read models."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, StrictFloat, field_validator

from schemas.common import Payload, Response, StorableText, Timestamp

MAX_SAMPLES_PER_MESSAGE = 1000
MAX_METADATA_BYTES = 4096
MAX_FUTURE = timedelta(hours=24)


class MetricSample(Payload):
    event_id: UUID | None = None
    service_name: Annotated[StorableText, Field(min_length=1, max_length=100)]
    metric_type: Annotated[StorableText, Field(min_length=1, max_length=50)]
    metric_value: StrictFloat
    unit: Annotated[StorableText, Field(min_length=1, max_length=20)]
    timestamp: Timestamp | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise ValueError("metadata must be finite JSON (no NaN or Infinity)") from None
        if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        return value

    @field_validator("timestamp")
    @classmethod
    def _not_far_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value > datetime.now(UTC) + MAX_FUTURE:
            raise ValueError("timestamp is more than 24 h in the future")
        return value


class MetricsBatch(Payload):
    metrics: Annotated[list[MetricSample], Field(min_length=1, max_length=MAX_SAMPLES_PER_MESSAGE)]


class MetricPoint(Response):
    """One stored sample, as the read path returns it (newest first)."""

    timestamp: datetime
    metric_value: float
    unit: str
    metadata: dict[str, Any] | None


class MetricRecord(Response):
    id: UUID
    service_name: str
    metric_type: str
    metric_value: float
    unit: str
    timestamp: datetime
    metadata: dict[str, Any] | None


class MetricAggregate(Response):
    bucket: datetime
    interval: Literal["hour", "day"]
    avg: float
    min: float
    max: float
    count: int
