"""The publisher's ledger, and the ORACLE: the state CONTRACT.md's effect rules give
for what was published, computed independently of the handlers.

The rules, as a plain fold over the distinct events (duplicates change nothing, and
nothing here depends on the order the events are given in):

- ``backfill_jobs``, per ``job_id``: fixed ``job_type``/``start_block``/``end_block``;
  ``current_block`` the largest seen, ``end_block`` once completed; ``status``,
  ``error_message``, ``estimated_completion`` from the latest ``occurred_at``, except
  that a ``completed`` event is final (then they come from it); ``started_at`` the
  earliest ``occurred_at``, ``completed_at`` that of the completing event;
  ``progress_percentage`` as specified, to two decimals (100 for a one-block range);
  ``created_by`` (CONTRACT.md is silent) from the earliest event.
- ``insight_feedback``, per ``(insight_id, user_id)``: the fields of the latest
  ``occurred_at``; ``created_at`` the earliest, ``updated_at`` the winning one.
- ``system_metrics``: one row per sample identity, ``event_id`` or the UUIDv5 of the
  sample's canonical JSON (``handlers/metrics.py``'s documented rule, written again here
  from its description: ``[service_name, metric_type, metric_value, unit, timestamp
  in UTC or null, metadata with sorted keys or null]``, compact, in namespace
  ``4c0b6a58-...``).

Where the outcome would depend on an undocumented tie-break (two different events of
one key at the same instant, two completing events, two different samples with one
identity, a sample without a timestamp, whose time is its publish time), the oracle
refuses with ``AmbiguousExpectation``: the workload must not contain such input.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.faults.workload import OutgoingMessage

BACKFILL, FEEDBACK, METRICS = "backfill-progress", "feedback", "metrics"
# Fixed forever by the project (tests/unit/test_schemas.py pins it too).
METRIC_IDENTITY_NAMESPACE = uuid.UUID("4c0b6a58-5d8e-4f6b-9a1e-2b7f0c3d9e10")


class AmbiguousExpectation(ValueError):
    """The events given do not determine one final state under CONTRACT.md."""


# -- the ledger --------------------------------------------------------------------------


@dataclass
class LedgerEntry:
    message: OutgoingMessage
    attempts: int = 0
    """Publish requests that carried the message, including failed ones (which may
    have published it all the same)."""
    message_ids: list[str] = field(default_factory=list)
    """One id per confirmed publish."""

    @property
    def confirmed(self) -> int:
        return len(self.message_ids)


class Ledger:
    """What the publisher actually published, by ``ledger_id``."""

    def __init__(self) -> None:
        self.entries: dict[str, LedgerEntry] = {}

    def _entry(self, message: OutgoingMessage) -> LedgerEntry:
        entry = self.entries.get(message.ledger_id)
        if entry is None:
            entry = self.entries[message.ledger_id] = LedgerEntry(message)
        return entry

    def attempted(self, messages: Iterable[OutgoingMessage]) -> None:
        for m in messages:
            self._entry(m).attempts += 1

    def published(self, messages: Sequence[OutgoingMessage], message_ids: Sequence[str]) -> None:
        if len(messages) != len(message_ids):
            raise ValueError(f"{len(messages)} messages but {len(message_ids)} ids")
        for m, message_id in zip(messages, message_ids, strict=True):
            self._entry(m).message_ids.append(message_id)

    def confirmed(self) -> list[OutgoingMessage]:
        """Every message published at least once (confirmed by Pub/Sub)."""
        return [e.message for e in self.entries.values() if e.confirmed]

    def uncertain(self) -> list[OutgoingMessage]:
        """Messages tried but never confirmed: published or not, nobody knows."""
        return [e.message for e in self.entries.values() if e.attempts and not e.confirmed]

    def per_topic(self) -> dict[str, int]:
        """Confirmed publishes per topic (each copy counts): what a worker receives."""
        counts = dict.fromkeys((BACKFILL, FEEDBACK, METRICS), 0)
        for e in self.entries.values():
            counts[e.message.topic] = counts.get(e.message.topic, 0) + e.confirmed
        return counts

    def expected(self) -> Expected:
        """The oracle's final state for everything confirmed so far."""
        return expected_state(self.confirmed())


# -- expected rows -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    job_type: str
    start_block: int
    end_block: int
    current_block: int
    status: str
    progress_percentage: Decimal
    estimated_completion: datetime | None
    error_message: str | None
    started_at: datetime
    completed_at: datetime | None
    created_by: str | None


@dataclass(frozen=True)
class FeedbackRow:
    rating: int | None
    comment: str | None
    flag_type: str | None
    flag_reason: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class MetricRow:
    service_name: str
    metric_type: str
    metric_value: float
    unit: str
    timestamp: datetime
    metadata: Any  # the JSON value (None: no metadata)


@dataclass(frozen=True)
class Expected:
    jobs: Mapping[uuid.UUID, JobRow]
    feedback: Mapping[tuple[str, str], FeedbackRow]
    metrics: Mapping[uuid.UUID, MetricRow]

    def counts(self) -> dict[str, int]:
        return {
            "backfill_jobs": len(self.jobs),
            "insight_feedback": len(self.feedback),
            "system_metrics": len(self.metrics),
        }


def instant(text: Any) -> datetime:
    """An RFC 3339 timestamp (the workload always gives an offset)."""
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise AmbiguousExpectation(f"timestamp without an offset: {text!r}")
    return moment


def _optional_instant(text: Any) -> datetime | None:
    return None if text is None else instant(text)


def progress_percentage(current: int, start: int, end: int) -> Decimal:
    """``(current - start) / (end - start) * 100`` to two decimals; 100 for one block."""
    if end == start:
        return Decimal("100.00")
    exact = Decimal(current - start) * 100 / Decimal(end - start)
    return exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _single(values: set[Any], what: str) -> Any:
    if len(values) != 1:
        raise AmbiguousExpectation(f"{what}: {sorted(map(repr, values))}")
    return next(iter(values))


TIME_FIELDS = frozenset({"occurred_at", "estimated_completion", "timestamp"})


def _comparable(name: str, value: Any) -> Any:
    """A field's value for comparison: times as instants, whatever their offset."""
    if name in TIME_FIELDS and value is not None:
        return instant(value)
    return json.dumps(value, sort_keys=True)


def _latest(events: Sequence[Mapping[str, Any]], decides: Sequence[str], what: str) -> Any:
    """The event with the latest ``occurred_at``; refused if another event at that very
    instant would decide differently (the tie-break is not CONTRACT.md's)."""
    last = max(instant(e["occurred_at"]) for e in events)
    tied = [e for e in events if instant(e["occurred_at"]) == last]
    outcomes = {tuple(_comparable(name, e.get(name)) for name in decides) for e in tied}
    if len(outcomes) > 1:
        raise AmbiguousExpectation(f"{what}: different events at the same instant {last}")
    return tied[0]


def _job(job_id: uuid.UUID, events: Sequence[Mapping[str, Any]]) -> JobRow:
    what = f"job {job_id}"
    job_type, start, end = _single(
        {(e["job_type"], e["start_block"], e["end_block"]) for e in events},
        f"{what}: fixed fields disagree",
    )
    completing = {instant(e["occurred_at"]): e for e in events if e["status"] == "completed"}
    decides = ("status", "error_message", "estimated_completion")
    if len(completing) > 1:
        raise AmbiguousExpectation(f"{what}: completed at several instants")
    if completing:
        decisive = _latest(
            [e for e in events if e["status"] == "completed"], decides, f"{what} completion"
        )
    else:
        decisive = _latest(events, decides, what)
    first_at = min(instant(e["occurred_at"]) for e in events)
    created_by = _single(
        {e.get("created_by") for e in events if instant(e["occurred_at"]) == first_at},
        f"{what}: earliest events disagree on created_by",
    )
    current = end if completing else max(e["current_block"] for e in events)
    return JobRow(
        job_type=job_type,
        start_block=start,
        end_block=end,
        current_block=current,
        status=decisive["status"],
        progress_percentage=progress_percentage(current, start, end),
        estimated_completion=_optional_instant(decisive.get("estimated_completion")),
        error_message=decisive.get("error_message"),
        started_at=first_at,
        completed_at=instant(decisive["occurred_at"]) if completing else None,
        created_by=created_by,
    )


def _feedback(pair: tuple[str, str], events: Sequence[Mapping[str, Any]]) -> FeedbackRow:
    fields = ("rating", "comment", "flag_type", "flag_reason")
    winner = _latest(events, fields, f"feedback {pair}")
    return FeedbackRow(
        rating=winner.get("rating"),
        comment=winner.get("comment"),
        flag_type=winner.get("flag_type"),
        flag_reason=winner.get("flag_reason"),
        created_at=min(instant(e["occurred_at"]) for e in events),
        updated_at=instant(winner["occurred_at"]),
    )


def canonical_sample_json(sample: Mapping[str, Any]) -> str:
    """The documented canonical form of a sample, written from its description."""
    timestamp = sample.get("timestamp")
    utc_text = None if timestamp is None else instant(timestamp).astimezone(UTC).isoformat()
    fields = [
        sample["service_name"],
        sample["metric_type"],
        float(sample["metric_value"]),
        sample["unit"],
        utc_text,
        sample.get("metadata"),
    ]
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def metric_identity(sample: Mapping[str, Any]) -> uuid.UUID:
    event_id = sample.get("event_id")
    if event_id is not None:
        return uuid.UUID(str(event_id))
    return uuid.uuid5(METRIC_IDENTITY_NAMESPACE, canonical_sample_json(sample))


def _metric(sample: Mapping[str, Any]) -> MetricRow:
    if sample.get("timestamp") is None:
        raise AmbiguousExpectation("a sample without a timestamp is stamped at publish time")
    return MetricRow(
        service_name=sample["service_name"],
        metric_type=sample["metric_type"],
        metric_value=float(sample["metric_value"]),
        unit=sample["unit"],
        timestamp=instant(sample["timestamp"]),
        metadata=sample.get("metadata"),
    )


def _decoded(payload: Mapping[str, Any] | bytes) -> Mapping[str, Any]:
    if isinstance(payload, bytes):
        value = json.loads(payload.decode("utf-8"))
        if not isinstance(value, dict):
            raise ValueError("a valid event is a JSON object")
        return value
    return payload


def expect(events: Iterable[tuple[str, Mapping[str, Any] | bytes]]) -> Expected:
    """The final state for these ``(topic, payload)`` events, all of them valid,
    duplicates included, in any order."""
    jobs: dict[uuid.UUID, list[Mapping[str, Any]]] = defaultdict(list)
    pairs: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    metrics: dict[uuid.UUID, MetricRow] = {}
    for topic, payload in events:
        event = _decoded(payload)
        if topic == BACKFILL:
            jobs[uuid.UUID(str(event["job_id"]))].append(event)
        elif topic == FEEDBACK:
            pairs[(event["insight_id"], event["user_id"])].append(event)
        elif topic == METRICS:
            for sample in event.get("metrics", [event]):
                identity, row = metric_identity(sample), _metric(sample)
                if metrics.setdefault(identity, row) != row:
                    raise AmbiguousExpectation(f"two different samples with identity {identity}")
        else:
            raise ValueError(f"not an ingest topic: {topic!r}")
    return Expected(
        jobs={job_id: _job(job_id, evs) for job_id, evs in jobs.items()},
        feedback={pair: _feedback(pair, evs) for pair, evs in pairs.items()},
        metrics=metrics,
    )


def expected_state(messages: Iterable[OutgoingMessage]) -> Expected:
    """The final state the messages with an effect give (poison messages have none)."""
    return expect((m.topic, m.data) for m in messages if m.applies)
