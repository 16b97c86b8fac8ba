"""Hostile input (issue 14): no exception escapes decoding, validation or the push
envelope, whatever a publisher sends; every message is either accepted or refused
with one of CONTRACT.md's dead-letter reasons, naming its field.

Fuzzed with hypothesis (tests/support/hostile.py), plus the cases that once broke the worker.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.backfill import BackfillHandler
from handlers.feedback import FeedbackHandler
from handlers.metrics import MetricsHandler
from tests.support.factories import backfill_payload, feedback_payload, metric_payload
from tests.support.hostile import REASONS, envelope_fields, message_data, times
from worker.exceptions import (
    ExpiredError,
    InvalidJsonError,
    PermanentError,
    SchemaViolationError,
)
from worker.pipeline.dead_letters import dead_letter_attributes
from worker.pipeline.decoding import decode_json_object
from worker.sources.push import EnvelopeError, parse_envelope
from worker.timestamps import rfc3339

HANDLERS: dict[str, Any] = {
    "backfill-progress": BackfillHandler(),
    "feedback": FeedbackHandler(),
    "metrics": MetricsHandler(),
}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def intake(topic: str, data: bytes, published_at: datetime) -> PermanentError | None:
    """What the pipeline's intake does: decode then parse; the refusal, if any."""
    try:
        HANDLERS[topic].parse(decode_json_object(data), published_at)
    except PermanentError as error:
        return error
    return None


def publish_times() -> st.SearchStrategy[datetime]:
    """Publish times as the sources give them (aware, UTC), at any instant."""
    return st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    )


@pytest.mark.parametrize("topic", sorted(HANDLERS))
@given(data=st.data())
@FUZZ
def test_intake_accepts_or_refuses_with_a_reason(topic: str, data: st.DataObject) -> None:
    message = data.draw(message_data(topic), label="data")
    published_at = data.draw(st.one_of(st.just(datetime.now(UTC)), publish_times()))
    refused = intake(topic, message, published_at)  # any other exception fails the test
    if refused is not None:
        assert refused.reason in REASONS
        assert 0 < len(refused.detail) <= 1024


@given(fields=envelope_fields(), extra=st.dictionaries(st.text(max_size=5), st.integers()))
@FUZZ
def test_a_push_envelope_is_a_delivery_or_a_400(fields: dict[str, Any], extra: Any) -> None:
    body = json.dumps({"message": fields, **extra, "subscription": "s"}).encode(
        "utf-8", "surrogatepass"
    )
    try:
        delivery = parse_envelope(body)
    except EnvelopeError as error:
        assert len(str(error)) < 300  # never the whole body echoed back
        return
    # Whatever came in, the runtime gets an aware UTC time and can dead-letter it.
    assert delivery.publish_time.utcoffset() == timedelta(0)
    attributes = dead_letter_attributes(
        "feedback", delivery, SchemaViolationError("x: y"), datetime.now(UTC)
    )
    assert attributes["dead_letter_reason"] == "schema_violation"


@given(moment=times)
@FUZZ
def test_any_timestamp_text_is_accepted_or_a_schema_violation(moment: str) -> None:
    error = intake(
        "feedback", json.dumps(feedback_payload(occurred_at=moment)).encode(), datetime.now(UTC)
    )
    assert error is None or error.reason in ("schema_violation", "expired"), error


# -- the cases that broke the worker -------------------------------------------------------


def nested(depth: int, leaf: bytes = b'"\\u0000"') -> bytes:
    return b'{"a": ' + b"[" * depth + leaf + b"]" * depth + b"}"


def test_nul_deeper_than_the_recursion_limit_is_a_schema_violation() -> None:
    with pytest.raises(SchemaViolationError) as caught:
        decode_json_object(nested(1000))
    assert caught.value.detail.startswith("a[0][0]")
    assert "NUL" in caught.value.detail


def test_nesting_deeper_than_orjson_allows_is_invalid_json() -> None:
    with pytest.raises(InvalidJsonError):
        decode_json_object(nested(100_000))


def test_deep_nesting_without_nul_decodes() -> None:
    assert decode_json_object(nested(1000, b'"ok"'))["a"] is not None


def test_nul_in_a_key_names_the_key() -> None:
    with pytest.raises(SchemaViolationError) as caught:
        decode_json_object(b'{"a": {"b\\u0000": 1}}')
    assert caught.value.detail.startswith("a.<key>")


@pytest.mark.parametrize(
    "moment", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z"]
)
@pytest.mark.parametrize("topic", sorted(HANDLERS))
def test_a_time_utc_cannot_hold_is_a_schema_violation(topic: str, moment: str) -> None:
    payload = {
        "backfill-progress": backfill_payload(occurred_at=moment),
        "feedback": feedback_payload(occurred_at=moment),
        "metrics": metric_payload(timestamp=moment),
    }[topic]
    error = intake(topic, json.dumps(payload).encode(), datetime.now(UTC))
    assert isinstance(error, SchemaViolationError), error
    assert "out of range" in error.detail


@pytest.mark.parametrize(
    ("topic", "field", "days"),
    [
        ("backfill-progress", "occurred_at", 181),
        ("feedback", "occurred_at", 731),
        ("metrics", "timestamp", 91),
    ],
)
def test_an_event_older_than_its_retention_window_is_expired(
    topic: str, field: str, days: int
) -> None:
    old = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    payload = {
        "backfill-progress": backfill_payload,
        "feedback": feedback_payload,
        "metrics": metric_payload,
    }[topic](**{field: old})
    error = intake(topic, json.dumps(payload).encode(), datetime.now(UTC))
    assert isinstance(error, ExpiredError), error
    assert error.reason == "expired"
    assert error.detail.startswith(field)
    # A day inside the window applies.
    payload[field] = (datetime.now(UTC) - timedelta(days=days - 2)).isoformat()
    assert intake(topic, json.dumps(payload).encode(), datetime.now(UTC)) is None


def test_the_window_follows_the_handler_setting() -> None:
    payload = feedback_payload(occurred_at=(datetime.now(UTC) - timedelta(days=3)).isoformat())
    with pytest.raises(ExpiredError):
        FeedbackHandler(timedelta(days=2)).parse(payload, datetime.now(UTC))


@pytest.mark.parametrize(
    ("published_at", "reason"),
    [
        (datetime(1900, 1, 1, tzinfo=UTC), "expired"),
        (datetime.min.replace(tzinfo=UTC), "expired"),
        (datetime.max.replace(tzinfo=UTC), "schema_violation"),
    ],
)
def test_a_sample_without_timestamp_is_judged_by_its_publish_time(
    published_at: datetime, reason: str
) -> None:
    payload = metric_payload()
    del payload["timestamp"]
    error = intake(
        "metrics", json.dumps({"metrics": [metric_payload(), payload]}).encode(), published_at
    )
    assert error is not None and error.reason == reason
    assert error.detail.startswith("metrics.1.timestamp")


@pytest.mark.parametrize("publish_time", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_push_publish_time_utc_cannot_hold_is_dead_lettered(publish_time: str) -> None:
    body = {"message": {"messageId": "1", "publishTime": publish_time, "data": ""}}
    delivery = parse_envelope(json.dumps(body).encode())
    assert delivery.error is not None and delivery.error.reason == "schema_violation"
    assert "publishTime" in delivery.error.detail
    attributes = dead_letter_attributes("metrics", delivery, delivery.error, datetime.now(UTC))
    assert attributes["source_publish_time"].startswith("0001-01-01")


def test_rfc3339_never_raises() -> None:
    far = datetime.fromisoformat("0001-01-01T00:00:00+14:00")
    assert rfc3339(far) == "0001-01-01T00:00:00+14:00"
    assert rfc3339(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00Z"
