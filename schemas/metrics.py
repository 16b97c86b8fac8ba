"""``metrics`` payload (one sample or a batch) and the metric read models."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Required
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictFloat,
    TypeAdapter,
    field_validator,
    with_config,
)
from typing_extensions import TypedDict

from schemas.common import Payload, Response, StorableText, Timestamp

MAX_SAMPLES_PER_MESSAGE = 1000
MAX_METADATA_BYTES = 4096
MAX_FUTURE = timedelta(hours=24)


def future_limit() -> datetime:
    """now + 24 h: a timestamp after it is refused. Read once per message, not per
    sample (``handlers.metrics.message_rows``)."""
    return datetime.now(UTC) + MAX_FUTURE


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


_EXACT_LIMIT = 2.0**63
"""Integers beyond 64 bits reach us as doubles (orjson's decoding): any number this
large may have been one, no longer exact."""


def _has_huge_number(value: Any) -> bool:
    if isinstance(value, float):
        return abs(value) >= _EXACT_LIMIT
    if isinstance(value, dict):
        return any(_has_huge_number(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_number(v) for v in value)
    return False


def canonical_metadata(value: dict[str, Any]) -> str:
    """The metadata's canonical text (sorted keys, compact, UTF-8), once it is checked.

    Raises ``ValueError`` for what CONTRACT.md refuses: more than 4 KiB, NaN or
    Infinity, anything not JSON; and numbers of magnitude 2**63 or more (README).
    """
    try:
        encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as error:
        raise ValueError(f"must be JSON: {error}") from None
    # orjson writes NaN and Infinity as null: look closer only when a null is there
    # (decoded messages never hold them; objects built in Python might).
    if b"null" in encoded and not _all_finite(value):
        raise ValueError("must be finite JSON (no NaN or Infinity)")
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes")
    # Such a number is written with an exponent: look closer only when an "e" is there.
    # Refused rather than stored changed, and rather than letting two samples that
    # differ only in it share one identity.
    if b"e" in encoded and _has_huge_number(value):
        raise ValueError(
            "numbers of magnitude 2**63 or more are not kept exactly: send them as strings"
        )
    return encoded.decode("utf-8")


def _checked_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        canonical_metadata(value)
    return value


FUTURE_ERROR = "timestamp is more than 24 h in the future"

# The field types, shared by the model and by the message path's typed dict.
ServiceName = Annotated[StorableText, Field(min_length=1, max_length=100)]
MetricType = Annotated[StorableText, Field(min_length=1, max_length=50)]
Unit = Annotated[StorableText, Field(min_length=1, max_length=20)]
Samples = Field(min_length=1, max_length=MAX_SAMPLES_PER_MESSAGE)


class MetricSample(Payload):
    """One sample, every rule of CONTRACT.md checked (the service API's input)."""

    event_id: UUID | None = None
    service_name: ServiceName
    metric_type: MetricType
    metric_value: StrictFloat
    unit: Unit
    timestamp: Timestamp | None = None
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_checked_metadata)] = None

    @field_validator("timestamp")
    @classmethod
    def _not_far_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value > future_limit():
            raise ValueError(FUTURE_ERROR)
        return value


class MetricsBatch(Payload):
    metrics: Annotated[list[MetricSample], Samples]


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
class SampleFields(TypedDict, total=False):
    """A sample as the message path validates it: ``MetricSample``'s fields, checked
    wholly in pydantic's core into a plain dict.

    A message holds up to 1000 samples, and a model instance and two Python
    callbacks for each cost more than all the rest of their validation. The two
    rules left, the future limit and the metadata's, are checked per message by
    ``handlers.metrics`` (with ``future_limit`` and ``canonical_metadata``); a unit
    test holds both paths to the same verdicts.
    """

    event_id: UUID | None
    service_name: Required[ServiceName]
    metric_type: Required[MetricType]
    metric_value: Required[StrictFloat]
    unit: Required[Unit]
    timestamp: Timestamp | None
    metadata: dict[str, Any] | None


@with_config(ConfigDict(extra="forbid"))
class BatchFields(TypedDict):
    metrics: Annotated[list[SampleFields], Samples]


SAMPLE_FIELDS: TypeAdapter[SampleFields] = TypeAdapter(SampleFields)
BATCH_FIELDS: TypeAdapter[BatchFields] = TypeAdapter(BatchFields)


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
