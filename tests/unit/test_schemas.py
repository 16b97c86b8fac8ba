"""CONTRACT.md "Payloads": what each payload model accepts and refuses.

Rejections go through ``handlers.events.validate``, the runtime's entry point, so each
case also checks that the detail (``dead_letter_detail``) names the offending field.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pydantic
import pytest
from asyncpg.pgproto import pgproto
from pydantic import BaseModel

from handlers.events import event_key, validate
from handlers.metric_identity import IDENTITY_NAMESPACE, sample_identity
from handlers.metrics import MetricsHandler, samples_message
from schemas.backfill import MAX_BLOCK, BackfillProgressEvent
from schemas.feedback import FeedbackEvent
from schemas.metrics import MetricSample, MetricsBatch
from tests.support.factories import T0, backfill_payload, feedback_payload, metric_payload
from worker.exceptions import SchemaViolationError

MISSING = object()
"""Marks a field to remove from the payload."""


def with_(payload: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = dict(payload)
    for name, value in changes.items():
        if value is MISSING:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def past_days(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat()


def future(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


BAD_TIMESTAMPS = [
    pytest.param("2026-11-21T10:00:00", id="naive"),
    pytest.param("2026-11-21", id="date-only"),
    pytest.param(1_795_000_000, id="int"),
    pytest.param(1_795_000_000.5, id="float"),
    pytest.param("2026-11-21T10:00Z", id="no-seconds"),
    pytest.param("21/11/2026 10:00:00Z", id="not-rfc3339"),
    pytest.param("2026-13-21T10:00:00Z", id="month-13"),
    pytest.param(datetime(2026, 11, 21, 10), id="naive-datetime"),
    pytest.param("", id="empty"),
]


def assert_rejected(model: type[BaseModel], payload: Any, names: str) -> None:
    with pytest.raises(SchemaViolationError) as caught:
        validate(model, payload)
    assert caught.value.reason == "schema_violation"
    assert names in caught.value.detail, caught.value.detail


def assert_message_rejected(payload: Any, names: str) -> None:
    """The metrics message path (typed dicts, then the handler's own checks) refuses
    what the models refuse, naming the same field."""
    with pytest.raises(SchemaViolationError) as caught:
        MetricsHandler().parse(payload, datetime.now(UTC))
    assert caught.value.reason == "schema_violation"
    assert names in caught.value.detail, caught.value.detail


# -- backfill-progress -------------------------------------------------------------------


def test_backfill_contract_example_is_valid() -> None:
    event = validate(BackfillProgressEvent, backfill_payload())
    assert event.job_id == uuid.UUID("5d0e6f7a-3c1b-4f7e-9a55-1f1f7f1d2c3b")
    assert (event.start_block, event.current_block, event.end_block) == (800000, 805000, 810000)
    assert event.status == "running"
    assert event.occurred_at == T0  # the example's time moved to six days ago
    assert event.error_message is None and event.estimated_completion is None
    assert event.created_by == "admin"


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"job_type": "é" * 50}, id="job_type-50-two-byte-chars"),
        pytest.param({"job_type": "😀" * 50}, id="job_type-50-astral-chars"),
        pytest.param({"job_type": "x"}, id="job_type-1-char"),
        pytest.param({"created_by": "😀" * 100}, id="created_by-100-astral-chars"),
        pytest.param({"error_message": "ü" * 10_000}, id="error_message-10000-chars"),
        pytest.param({"error_message": ""}, id="error_message-empty"),
        pytest.param({"start_block": 0, "current_block": 0, "end_block": 0}, id="blocks-all-zero"),
        pytest.param(
            {"start_block": 0, "current_block": MAX_BLOCK, "end_block": MAX_BLOCK},
            id="blocks-max",
        ),
        pytest.param({"current_block": 800000}, id="current-at-start"),
        pytest.param({"current_block": 810000, "status": "completed"}, id="current-at-end"),
        pytest.param({"status": "paused"}, id="paused"),
        pytest.param({"status": "failed", "error_message": "boom"}, id="failed"),
        pytest.param({"occurred_at": "2026-11-21T10:00:00+05:30"}, id="positive-offset"),
        pytest.param({"occurred_at": "2026-11-21T10:00:00-08:00"}, id="negative-offset"),
        pytest.param({"occurred_at": "2026-11-21t10:00:00z"}, id="lowercase-t-z"),
        pytest.param({"occurred_at": "2026-11-21T10:00:00.123456789Z"}, id="nanoseconds"),
        pytest.param({"estimated_completion": "2026-12-01T00:00:00Z"}, id="with-eta"),
        pytest.param(
            {"error_message": MISSING, "estimated_completion": MISSING, "created_by": MISSING},
            id="optionals-absent",
        ),
    ],
)
def test_backfill_valid(changes: dict[str, Any]) -> None:
    payload = with_(backfill_payload(), **changes)
    event = validate(BackfillProgressEvent, payload)
    for name, value in changes.items():
        if value is MISSING:
            assert getattr(event, name) is None
        elif name in ("job_type", "created_by", "error_message", "status"):
            assert getattr(event, name) == value  # stored as given, character for character


def test_backfill_timestamp_keeps_offset_and_instant() -> None:
    event = validate(
        BackfillProgressEvent, backfill_payload(occurred_at="2026-11-21T15:30:00.5+05:30")
    )
    assert event.occurred_at.utcoffset() == timedelta(hours=5, minutes=30)
    assert event.occurred_at == datetime(2026, 11, 21, 10, 0, 0, 500000, tzinfo=UTC)
    nanos = validate(
        BackfillProgressEvent, backfill_payload(occurred_at="2026-11-21T10:00:00.1234569Z")
    )
    assert nanos.occurred_at == datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "field",
    ["job_id", "job_type", "start_block", "end_block", "current_block", "status", "occurred_at"],
)
def test_backfill_required_field_missing(field: str) -> None:
    assert_rejected(BackfillProgressEvent, with_(backfill_payload(), **{field: MISSING}), field)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        pytest.param({"unexpected": 1}, "unexpected", id="unknown-field"),
        pytest.param({"progress_percentage": 50}, "progress_percentage", id="unknown-field-2"),
        pytest.param({"job_id": "not-a-uuid"}, "job_id", id="job_id-not-uuid"),
        pytest.param({"job_id": 5}, "job_id", id="job_id-int"),
        pytest.param({"job_type": ""}, "job_type", id="job_type-empty"),
        pytest.param({"job_type": "x" * 51}, "job_type", id="job_type-51"),
        pytest.param({"job_type": "é" * 51}, "job_type", id="job_type-51-multibyte"),
        pytest.param({"job_type": None}, "job_type", id="job_type-null"),
        pytest.param({"job_type": 7}, "job_type", id="job_type-int"),
        pytest.param({"job_type": "bl\x00cks"}, "job_type", id="job_type-nul"),
        pytest.param({"job_type": "bl\ud800cks"}, "job_type", id="job_type-lone-surrogate"),
        pytest.param({"created_by": "x" * 101}, "created_by", id="created_by-101"),
        pytest.param({"created_by": "😀" * 101}, "created_by", id="created_by-101-astral"),
        pytest.param({"created_by": "ad\x00min"}, "created_by", id="created_by-nul"),
        pytest.param({"error_message": "x" * 10_001}, "error_message", id="error-10001"),
        pytest.param({"error_message": "a\x00b"}, "error_message", id="error-nul"),
        pytest.param({"error_message": "\udfff"}, "error_message", id="error-lone-surrogate"),
        pytest.param({"start_block": -1}, "start_block", id="start-negative"),
        pytest.param(
            {"end_block": MAX_BLOCK + 1, "current_block": MAX_BLOCK + 1},
            "end_block",
            id="end-over-int4",
        ),
        pytest.param({"current_block": 2**63}, "current_block", id="current-huge"),
        pytest.param({"start_block": True}, "start_block", id="start-bool"),
        pytest.param({"current_block": "805000"}, "current_block", id="current-string"),
        pytest.param({"end_block": 810000.0}, "end_block", id="end-float"),
        pytest.param({"current_block": float("nan")}, "current_block", id="current-nan"),
        pytest.param({"current_block": float("inf")}, "current_block", id="current-inf"),
        pytest.param({"current_block": None}, "current_block", id="current-null"),
        pytest.param({"start_block": 810001}, "start_block", id="start-after-end"),
        pytest.param({"current_block": 799999}, "current_block", id="current-before-start"),
        pytest.param({"current_block": 810001}, "current_block", id="current-after-end"),
        pytest.param({"status": "done"}, "status", id="status-unknown"),
        pytest.param({"status": "RUNNING"}, "status", id="status-uppercase"),
        pytest.param({"status": None}, "status", id="status-null"),
        pytest.param(
            {"estimated_completion": "2026-12-01T00:00:00"}, "estimated_completion", id="eta-naive"
        ),
        pytest.param({"estimated_completion": 1}, "estimated_completion", id="eta-int"),
    ],
)
def test_backfill_rejected(changes: dict[str, Any], names: str) -> None:
    assert_rejected(BackfillProgressEvent, with_(backfill_payload(), **changes), names)


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
def test_backfill_bad_occurred_at(value: Any) -> None:
    assert_rejected(BackfillProgressEvent, backfill_payload(occurred_at=value), "occurred_at")


def test_backfill_not_an_object() -> None:
    assert_rejected(BackfillProgressEvent, [backfill_payload()], "payload")


# -- feedback ----------------------------------------------------------------------------


def test_feedback_contract_example_is_valid() -> None:
    event = validate(FeedbackEvent, feedback_payload())
    assert (event.insight_id, event.user_id) == ("insight_123", "user_456")
    assert event.rating == 5
    assert event.comment == "Great insight!"
    assert event.flag_type is None and event.flag_reason is None and event.event_id is None
    assert event.occurred_at == T0  # the example's time moved to six days ago


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"comment": None, "flag_type": None}, id="rating-only"),
        pytest.param({"rating": None, "flag_type": None}, id="comment-only"),
        pytest.param({"rating": None, "comment": None, "flag_type": "spam"}, id="flag-only"),
        pytest.param({"flag_type": "inaccurate", "flag_reason": "wrong"}, id="flag-with-reason"),
        pytest.param({"flag_type": "misleading"}, id="misleading"),
        pytest.param({"flag_type": "other", "flag_reason": "r" * 2000}, id="reason-2000"),
        pytest.param({"rating": 1}, id="rating-1"),
        pytest.param({"insight_id": "😀" * 100, "user_id": "é" * 100}, id="ids-100-multibyte"),
        pytest.param({"insight_id": "i", "user_id": "u"}, id="ids-1-char"),
        pytest.param({"comment": "😀" * 5000}, id="comment-5000-astral"),
        pytest.param({"comment": "  padded\n\t "}, id="comment-whitespace-kept"),
        pytest.param({"event_id": "0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11"}, id="event_id"),
        pytest.param(
            {"comment": MISSING, "flag_type": MISSING, "flag_reason": MISSING},
            id="optionals-absent",
        ),
    ],
)
def test_feedback_valid(changes: dict[str, Any]) -> None:
    event = validate(FeedbackEvent, with_(feedback_payload(), **changes))
    for name, value in changes.items():
        if value is MISSING:
            assert getattr(event, name) is None
        elif name == "event_id":
            assert event.event_id == uuid.UUID(value)
        else:
            assert getattr(event, name) == value


@pytest.mark.parametrize("field", ["insight_id", "user_id", "occurred_at"])
def test_feedback_required_field_missing(field: str) -> None:
    assert_rejected(FeedbackEvent, with_(feedback_payload(), **{field: MISSING}), field)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        pytest.param({"unexpected": 1}, "unexpected", id="unknown-field"),
        pytest.param({"insight_id": ""}, "insight_id", id="insight-empty"),
        pytest.param({"insight_id": "x" * 101}, "insight_id", id="insight-101"),
        pytest.param({"user_id": "😀" * 101}, "user_id", id="user-101-astral"),
        pytest.param({"user_id": ""}, "user_id", id="user-empty"),
        pytest.param({"user_id": 456}, "user_id", id="user-int"),
        pytest.param({"user_id": "u\x00"}, "user_id", id="user-nul"),
        pytest.param({"insight_id": "\ud83d"}, "insight_id", id="insight-lone-surrogate"),
        pytest.param({"rating": 0}, "rating", id="rating-0"),
        pytest.param({"rating": 6}, "rating", id="rating-6"),
        pytest.param({"rating": -1}, "rating", id="rating-negative"),
        pytest.param({"rating": True}, "rating", id="rating-bool"),
        pytest.param({"rating": "5"}, "rating", id="rating-string"),
        pytest.param({"rating": 4.5}, "rating", id="rating-float"),
        pytest.param({"rating": 5.0}, "rating", id="rating-integral-float"),
        pytest.param({"rating": float("nan")}, "rating", id="rating-nan"),
        pytest.param({"comment": "x" * 5001}, "comment", id="comment-5001"),
        pytest.param({"comment": "nul\x00here"}, "comment", id="comment-nul"),
        pytest.param({"comment": "bad \udc80 text"}, "comment", id="comment-lone-surrogate"),
        pytest.param({"comment": 5}, "comment", id="comment-int"),
        pytest.param({"flag_type": "rude"}, "flag_type", id="flag-unknown"),
        pytest.param({"flag_type": "Spam"}, "flag_type", id="flag-case"),
        pytest.param(
            {"flag_type": "spam", "flag_reason": "r" * 2001}, "flag_reason", id="reason-2001"
        ),
        pytest.param({"flag_type": "spam", "flag_reason": "\x00"}, "flag_reason", id="reason-nul"),
        pytest.param({"flag_reason": "why"}, "flag_reason", id="reason-without-flag"),
        pytest.param(
            {"rating": None, "comment": None, "flag_type": None},
            "at least one of rating, comment, flag_type",
            id="none-of-three-null",
        ),
        pytest.param(
            {"rating": MISSING, "comment": MISSING, "flag_type": MISSING, "flag_reason": MISSING},
            "at least one of rating, comment, flag_type",
            id="none-of-three-absent",
        ),
        pytest.param({"event_id": "nope"}, "event_id", id="event_id-not-uuid"),
    ],
)
def test_feedback_rejected(changes: dict[str, Any], names: str) -> None:
    assert_rejected(FeedbackEvent, with_(feedback_payload(), **changes), names)


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
def test_feedback_bad_occurred_at(value: Any) -> None:
    assert_rejected(FeedbackEvent, feedback_payload(occurred_at=value), "occurred_at")


# -- metrics -----------------------------------------------------------------------------


def anon_metric(**changes: Any) -> dict[str, Any]:
    """The contract's sample without its ``event_id``."""
    return with_(metric_payload(), event_id=MISSING, **changes)


def metadata_of_bytes(size: int) -> dict[str, str]:
    """A metadata object whose compact UTF-8 JSON is exactly ``size`` bytes."""
    overhead = len('{"k":""}')
    return {"k": "x" * (size - overhead)}


def test_metric_contract_example_is_valid() -> None:
    sample = validate(MetricSample, metric_payload())
    assert sample.event_id == uuid.UUID("0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11")
    assert (sample.service_name, sample.metric_type, sample.unit) == ("web-api", "cpu", "percent")
    assert sample.metric_value == 45.5
    assert sample.timestamp == T0  # the example's time moved to six days ago
    assert sample.metadata == {"host": "a"}


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(
            {"event_id": MISSING, "timestamp": MISSING, "metadata": MISSING}, id="minimal"
        ),
        pytest.param({"metric_value": 45}, id="integer-value"),
        pytest.param({"metric_value": -1e300}, id="huge-negative-value"),
        pytest.param({"metric_value": 0.0}, id="zero"),
        pytest.param({"metadata": metadata_of_bytes(4096)}, id="metadata-4096-bytes"),
        pytest.param({"metadata": {}}, id="metadata-empty"),
        pytest.param({"metadata": {"nested": {"a": [1, 2.5, None, True]}}}, id="metadata-nested"),
        pytest.param({"metadata": None}, id="metadata-null"),
        pytest.param({"timestamp": future(23)}, id="timestamp-23h-ahead"),
        pytest.param({"timestamp": past_days(89)}, id="timestamp-within-retention"),
        pytest.param(
            {"service_name": "😀" * 100, "metric_type": "é" * 50, "unit": "µ" * 20},
            id="lengths-at-limit-multibyte",
        ),
        pytest.param({"service_name": "s", "metric_type": "m", "unit": "u"}, id="lengths-1"),
    ],
)
def test_metric_valid(changes: dict[str, Any]) -> None:
    sample = validate(MetricSample, with_(metric_payload(), **changes))
    for name, value in changes.items():
        if value is MISSING:
            assert getattr(sample, name) is None
        elif name in ("service_name", "metric_type", "unit", "metadata", "metric_value"):
            assert getattr(sample, name) == value
    # The message path accepts it too, with the same identity, with or without event_id.
    published_at = datetime.now(UTC)
    for payload in (
        with_(metric_payload(), **changes),
        with_(with_(metric_payload(), **changes), event_id=MISSING),
    ):
        model = validate(MetricSample, payload)
        for message in (
            MetricsHandler().parse(payload, published_at),
            MetricsHandler().parse({"metrics": [payload]}, published_at),
        ):
            (row,) = message.rows
            assert row == samples_message([model], published_at).rows[0]
            assert row[0] == sample_identity(model)


@pytest.mark.parametrize("field", ["service_name", "metric_type", "metric_value", "unit"])
def test_metric_required_field_missing(field: str) -> None:
    assert_rejected(MetricSample, with_(metric_payload(), **{field: MISSING}), field)
    assert_message_rejected(with_(metric_payload(), **{field: MISSING}), field)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        pytest.param({"unexpected": 1}, "unexpected", id="unknown-field"),
        pytest.param({"service_name": ""}, "service_name", id="service-empty"),
        pytest.param({"service_name": "x" * 101}, "service_name", id="service-101"),
        pytest.param({"service_name": "w\x00b"}, "service_name", id="service-nul"),
        pytest.param({"metric_type": ""}, "metric_type", id="type-empty"),
        pytest.param({"metric_type": "é" * 51}, "metric_type", id="type-51-multibyte"),
        pytest.param({"unit": ""}, "unit", id="unit-empty"),
        pytest.param({"unit": "x" * 21}, "unit", id="unit-21"),
        pytest.param({"unit": "\ud800"}, "unit", id="unit-lone-surrogate"),
        pytest.param({"metric_value": float("nan")}, "metric_value", id="value-nan"),
        pytest.param({"metric_value": float("inf")}, "metric_value", id="value-inf"),
        pytest.param({"metric_value": float("-inf")}, "metric_value", id="value-minus-inf"),
        pytest.param({"metric_value": "45.5"}, "metric_value", id="value-string"),
        pytest.param({"metric_value": True}, "metric_value", id="value-bool"),
        pytest.param({"metric_value": None}, "metric_value", id="value-null"),
        pytest.param({"metadata": metadata_of_bytes(4097)}, "metadata", id="metadata-4097"),
        pytest.param({"metadata": {"k": "😀" * 1100}}, "metadata", id="metadata-over-in-bytes"),
        pytest.param({"metadata": {"v": float("nan")}}, "metadata", id="metadata-nan"),
        pytest.param({"metadata": {"v": [float("inf")]}}, "metadata", id="metadata-inf"),
        pytest.param({"metadata": ["a"]}, "metadata", id="metadata-list"),
        pytest.param({"metadata": "a"}, "metadata", id="metadata-string"),
        pytest.param({"timestamp": future(25)}, "timestamp", id="timestamp-25h-ahead"),
        pytest.param({"event_id": "nope"}, "event_id", id="event_id-not-uuid"),
    ],
)
def test_metric_rejected(changes: dict[str, Any], names: str) -> None:
    assert_rejected(MetricSample, with_(metric_payload(), **changes), names)
    assert_message_rejected(with_(metric_payload(), **changes), names)
    batch = {"metrics": [metric_payload(), with_(metric_payload(), **changes)]}
    assert_message_rejected(batch, f"metrics.1.{names}")


@pytest.mark.parametrize("value", BAD_TIMESTAMPS)
def test_metric_bad_timestamp(value: Any) -> None:
    assert_rejected(MetricSample, metric_payload(timestamp=value), "timestamp")
    assert_message_rejected(metric_payload(timestamp=value), "timestamp")


@pytest.mark.parametrize("count", [1, 1000])
def test_metrics_batch_sizes_accepted(count: int) -> None:
    batch = validate(MetricsBatch, {"metrics": [anon_metric()] * count})
    assert len(batch.metrics) == count
    message = MetricsHandler().parse({"metrics": [anon_metric()] * count}, datetime.now(UTC))
    assert len(message.rows) == count


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        pytest.param({"metrics": []}, "metrics", id="empty"),
        pytest.param({"metrics": [metric_payload()] * 1001}, "metrics", id="1001-samples"),
        pytest.param(
            {"metrics": [metric_payload(), metric_payload(metric_value=float("nan"))]},
            "metrics.1.metric_value",
            id="one-bad-sample",
        ),
        pytest.param({"metrics": [metric_payload()], "extra": 1}, "extra", id="unknown-field"),
        pytest.param({"metrics": metric_payload()}, "metrics", id="not-a-list"),
        pytest.param({}, "metrics", id="missing"),
    ],
)
def test_metrics_batch_rejected(payload: dict[str, Any], names: str) -> None:
    assert_rejected(MetricsBatch, payload, names)
    if "metrics" in payload:  # without it, a message is a single sample
        assert_message_rejected(payload, names)


# -- every payload -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "payload", "field", "value"),
    [
        (BackfillProgressEvent, backfill_payload(), "status", "failed"),
        (FeedbackEvent, feedback_payload(), "rating", 1),
        (MetricSample, metric_payload(), "metric_value", 1.0),
        (MetricsBatch, {"metrics": [metric_payload()]}, "metrics", []),
    ],
)
def test_models_are_frozen(
    model: type[BaseModel], payload: dict[str, Any], field: str, value: Any
) -> None:
    instance = model.model_validate(payload)
    before = getattr(instance, field)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(instance, field, value)
    assert getattr(instance, field) == before


# -- metric identity ---------------------------------------------------------------------


def test_sample_identity_is_the_event_id_when_given() -> None:
    sample = validate(MetricSample, metric_payload())
    assert sample_identity(sample) == uuid.UUID("0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11")
    other = validate(MetricSample, with_(metric_payload(), metric_value=99.0, timestamp=MISSING))
    assert sample_identity(other) == sample_identity(sample)


def test_sample_identity_without_event_id_is_a_deterministic_uuid5() -> None:
    a = validate(MetricSample, anon_metric())
    b = validate(MetricSample, anon_metric())
    assert a is not b
    identity = sample_identity(a)
    assert identity.version == 5
    assert identity == sample_identity(b)
    assert identity != uuid.UUID("0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11")
    # Fixed forever: a change of namespace or canonical form would re-identify old samples.
    assert uuid.UUID("4c0b6a58-5d8e-4f6b-9a1e-2b7f0c3d9e10") == IDENTITY_NAMESPACE


def test_sample_identity_same_instant_in_any_offset() -> None:
    utc = validate(MetricSample, anon_metric(timestamp="2026-11-21T10:00:00Z"))
    plus2 = validate(MetricSample, anon_metric(timestamp="2026-11-21T12:00:00+02:00"))
    aware = MetricSample.model_validate(
        metric_payload(
            event_id=None,
            timestamp=datetime(2026, 11, 21, 5, tzinfo=timezone(timedelta(hours=-5))),
        )
    )
    assert sample_identity(utc) == sample_identity(plus2) == sample_identity(aware)


def test_sample_identity_ignores_metadata_key_order() -> None:
    a = validate(MetricSample, anon_metric(metadata={"a": 1, "b": 2}))
    b = validate(MetricSample, anon_metric(metadata={"b": 2, "a": 1}))
    assert sample_identity(a) == sample_identity(b)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"metric_value": 45.6}, id="value"),
        pytest.param({"metric_value": -45.5}, id="value-sign"),
        pytest.param({"service_name": "web-api-2"}, id="service"),
        pytest.param({"metric_type": "memory"}, id="type"),
        pytest.param({"unit": "ratio"}, id="unit"),
        pytest.param({"timestamp": "2026-11-21T10:00:01Z"}, id="timestamp"),
        pytest.param({"timestamp": MISSING}, id="no-timestamp"),
        pytest.param({"metadata": {"host": "b"}}, id="metadata"),
        pytest.param({"metadata": MISSING}, id="no-metadata"),
    ],
)
def test_sample_identity_differs_when_the_sample_differs(changes: dict[str, Any]) -> None:
    base = validate(MetricSample, anon_metric())
    changed = validate(MetricSample, anon_metric(**changes))
    assert sample_identity(changed) != sample_identity(base)


# -- event order key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "payload"),
    [(BackfillProgressEvent, backfill_payload()), (FeedbackEvent, feedback_payload())],
)
def test_event_key_is_deterministic(model: type[BaseModel], payload: dict[str, Any]) -> None:
    a = model.model_validate(payload)
    b = model.model_validate(dict(reversed(list(payload.items()))))
    assert event_key(a) == event_key(b)
    assert event_key(a) == event_key(a.model_copy())
    assert isinstance(event_key(a), bytes) and len(event_key(a)) == 32


def test_event_key_is_the_hash_of_the_canonical_event() -> None:
    # Keys are stored (status_event_key, event_key) and compared with the keys of later
    # events, computed by other processes and releases: a change of definition is a
    # deliberate decision (stored keys would need recomputing), never an accident.
    event = validate(FeedbackEvent, feedback_payload(occurred_at="2026-11-21T10:00:00Z"))
    canonical = (
        b'{"comment":"Great insight!","event_id":null,"flag_reason":null,"flag_type":null,'
        b'"insight_id":"insight_123","occurred_at":"2026-11-21T10:00:00+00:00","rating":5,'
        b'"user_id":"user_456"}'
    )
    assert event_key(event) == hashlib.sha256(canonical).digest()


@pytest.mark.parametrize(
    ("model", "payload"),
    [
        (BackfillProgressEvent, backfill_payload()),
        (
            BackfillProgressEvent,
            with_(
                backfill_payload(),
                status="failed",
                error_message="node went away",
                estimated_completion="2026-11-22T01:02:03.456789-05:30",
                created_by="ops",
            ),
        ),
        (FeedbackEvent, feedback_payload()),
        (
            FeedbackEvent,
            with_(
                feedback_payload(),
                flag_type="spam",
                flag_reason="ads",
                event_id="0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11",
            ),
        ),
    ],
)
def test_event_key_reads_the_fields_as_model_dump_gives_them(
    model: type[BaseModel], payload: dict[str, Any]
) -> None:
    # event_key reads the instance's own field values (no copy): the same bytes as
    # the definition over model_dump(), as long as the payload models stay flat.
    event = model.model_validate(payload)
    dumped = orjson.dumps(event.model_dump(), option=orjson.OPT_SORT_KEYS, default=str)
    assert event_key(event) == hashlib.sha256(dumped).digest()


def test_event_key_of_a_uuid_read_back_from_the_database() -> None:
    # DatabaseService builds events from stored rows, whose UUIDs are asyncpg's subclass.
    plain = validate(BackfillProgressEvent, backfill_payload())
    read_back = plain.model_copy(update={"job_id": pgproto.UUID(str(plain.job_id))})
    assert type(read_back.job_id) is not uuid.UUID
    assert event_key(read_back) == event_key(plain)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"rating": 4}, id="rating"),
        pytest.param({"comment": "Great insight! "}, id="comment-trailing-space"),
        pytest.param({"occurred_at": "2026-11-21T12:00:00+02:00"}, id="same-instant-offset"),
        pytest.param({"user_id": "user_457"}, id="user"),
        pytest.param({"event_id": "0b8c6a4e-8a3f-4f4b-b0f4-3f1d2a9e7c11"}, id="event_id"),
    ],
)
def test_event_key_differs_when_the_event_differs(changes: dict[str, Any]) -> None:
    base = validate(FeedbackEvent, feedback_payload())
    changed = validate(FeedbackEvent, with_(feedback_payload(), **changes))
    assert event_key(changed) != event_key(base)
