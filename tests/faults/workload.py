"""The fault suite's workload: valid events, republished duplicates and poison messages
over the three ingest topics, deterministic from a seed, and a publisher that keeps
the ledger of what was actually published.

Layout of ``build_workload(seed, messages)``:

- phase 1: every valid message (roughly a third per topic), ``duplicate_fraction`` of
  them published again as separate messages (same data, own ``ledger_id``), and every
  poison message except the conflicts, all shuffled together (seeded). A job's
  ``completed`` event may come before its ``running`` ones: the effect rules are
  order-free, so the outcome is not.
- phase 2: the ``conflict`` poisons. A conflict only exists relative to a stored job,
  so they target jobs whose every valid event is in phase 1 and must be published
  only once phase 1 has been applied; then the outcome is deterministic.

Poison messages are never duplicated and use keys of their own (fresh job ids,
``poison-*`` insights and services): one that gets applied shows as an unexpected row.
Every message carries the attributes ``ledger_id``, ``kind`` and ``case``; dead letters
keep them, which is how ``checks.check_dead_letters`` matches them back.

Valid events avoid what would make the expected state depend on an undocumented
tie-break: distinct ``occurred_at`` per job and per feedback pair, one ``completed``
event per job (with no error or ETA, as are the stale reports after it), ``created_by``
constant per job, every metric sample with a ``timestamp`` and no two different
samples with the same identity.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from tests.faults.oracle import Ledger
from worker.exceptions import PubSubError
from worker.pubsub.client import PubSub, PubsubMessage

TOPICS = ("backfill-progress", "feedback", "metrics")
BACKFILL, FEEDBACK, METRICS = TOPICS

# In the past, and relative to today: no metric timestamp is ever "more than 24 h in
# the future" nor older than the 90-day retention window (``expired``). Midnight, so
# that the workload depends on the seed and the day only. Spans two metric partitions.
EPOCH = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=60)
METRIC_SPAN_S = 45 * 86_400
MAX_BLOCK = 2_147_483_647
TOO_LARGE_BYTES = 1024 * 1024 + 1

PUBLISH_MAX_MESSAGES = 1000
PUBLISH_MAX_BYTES = 8 * 1024 * 1024
PACE_TICK_S = 0.05

Kind = Literal["valid", "duplicate", "poison"]
OFFSETS = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5)))


@dataclass(frozen=True)
class OutgoingMessage:
    """One message to publish, as the ledger knows it."""

    ledger_id: str
    topic: str
    data: bytes
    attributes: Mapping[str, str]
    kind: Kind
    case: str
    phase: int = 1
    duplicate_of: str | None = None
    # Poison only: the dead_letter_reason it must get, and a text its
    # dead_letter_detail must contain (the field it names), when one is known.
    reason: str | None = None
    detail_hint: str | None = None

    @property
    def applies(self) -> bool:
        """Whether the message has an effect (a valid event, or its duplicate)."""
        return self.kind != "poison"


@dataclass(frozen=True)
class Workload:
    seed: int
    phases: tuple[tuple[OutgoingMessage, ...], ...]

    @property
    def messages(self) -> list[OutgoingMessage]:
        """Every message, phase after phase, in publishing order."""
        return [m for phase in self.phases for m in phase]

    @property
    def valid(self) -> list[OutgoingMessage]:
        """The messages with an effect: valid events and their duplicates."""
        return [m for m in self.messages if m.applies]

    @property
    def poisons(self) -> list[OutgoingMessage]:
        return [m for m in self.messages if not m.applies]

    def per_topic(self, phase: int | None = None) -> dict[str, int]:
        """How many messages each topic gets (in ``phase``, 1-based, or in all)."""
        chosen = self.messages if phase is None else self.phases[phase - 1]
        counts = dict.fromkeys(TOPICS, 0)
        for m in chosen:
            counts[m.topic] += 1
        return counts

    def summary(self) -> dict[str, int]:
        """Figures for a scenario's printout."""
        figures = dict.fromkeys(("valid", "duplicate", "poison"), 0)
        for m in self.messages:
            figures[m.kind] += 1
        figures["total"] = len(self.messages)
        figures["conflicts"] = sum(1 for m in self.messages if m.reason == "conflict")
        return figures


# -- rendering ---------------------------------------------------------------------------


def rfc3339(moment: datetime, tz: timezone = UTC, z: bool = True) -> str:
    text = moment.astimezone(tz).isoformat()
    return text.replace("+00:00", "Z") if z else text


def _naive(moment: datetime) -> str:
    """``moment`` as RFC 3339 text without its offset (10:00 of its day), which the
    contract refuses."""
    return moment.strftime("%Y-%m-%dT10:00:00")


def _any_offset(rng: random.Random, moment: datetime) -> str:
    """The instant in one of a few offsets, ``Z`` or ``+00:00`` for UTC."""
    return rfc3339(moment, rng.choice(OFFSETS), z=rng.random() < 0.7)


def _encode(rng: random.Random, payload: Mapping[str, Any]) -> bytes:
    """JSON in one of a few layouts: the same event, different bytes."""
    style = rng.randrange(4)
    if style == 0:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    if style == 1:
        return json.dumps(dict(reversed(list(payload.items()))), indent=1).encode("utf-8")
    if style == 2:
        return json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return json.dumps(payload).encode("utf-8")


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


# -- valid events ------------------------------------------------------------------------

JOB_TYPES = ("blocks", "transactions", "utxo-set", "addresses", "jöbs ünïcødé")
CREATORS = (None, "admin", "ops-bot", "ñandú")
LENGTHS = (1, 7, 100, 3_333, 10_000, 123_457)


def _job_events(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` progress events of one new job, in time order."""
    job_id = str(_uuid(rng))
    job_type = rng.choice(JOB_TYPES)
    length = 0 if rng.random() < 0.1 else rng.choice(LENGTHS)
    if rng.random() < 0.05:
        end = MAX_BLOCK
        start = end - length
    else:
        start = rng.randint(0, 900_000)
        end = start + length
    created_by = rng.choice(CREATORS)
    minutes = sorted(rng.sample(range(60 * 24 * 30), count))
    blocks = sorted(rng.randint(start, end) for _ in range(count))
    fate = rng.random()
    # Index of the completing / failing event, if any (then maybe one later report).
    last = count - 1
    decisive = last - 1 if count >= 3 and rng.random() < 0.3 else last
    events = []
    for n, minute in enumerate(minutes):
        block = blocks[n]
        if n > 0 and rng.random() < 0.15:
            block = rng.randint(start, blocks[n])  # a report of a lower block, late
        event: dict[str, Any] = {
            "job_id": job_id,
            "job_type": job_type,
            "start_block": start,
            "end_block": end,
            "current_block": block,
            "status": rng.choice(("running", "running", "paused")),
            "occurred_at": _any_offset(rng, EPOCH + timedelta(minutes=minute)),
        }
        if event["status"] == "paused" and rng.random() < 0.5:
            event["error_message"] = rng.choice(("rate limited", "node busy"))
        elif rng.random() < 0.5:
            eta = EPOCH + timedelta(days=40, minutes=rng.randrange(100_000))
            event["estimated_completion"] = _any_offset(rng, eta)
        elif rng.random() < 0.3:
            event["estimated_completion"] = None
        if fate < 0.3 and n == decisive:
            # Completed: no error, no ETA; sometimes reported below end_block.
            event.update(status="completed", error_message=None, estimated_completion=None)
            if rng.random() < 0.7:
                event["current_block"] = end
        elif fate < 0.3 and n > decisive:
            # A stale report after completion: changes nothing but the block max.
            event.update(status="running", error_message=None, estimated_completion=None)
        elif fate < 0.5 and n == decisive:
            event.update(status="failed", error_message=rng.choice(("disk full", "node 💥 gone")))
        if created_by is not None or rng.random() < 0.5:
            event["created_by"] = created_by
        events.append(event)
    return events


COMMENTS = (
    None,
    None,
    "",
    "useful",
    "  padded, kept as is  ",
    "Ünïcødé 🚀\ttab",
    "multi\nline",
    "x" * 300,
)
FLAGS = ("inaccurate", "misleading", "spam", "other")


def _feedback_events(
    rng: random.Random, insight: str, user: str, count: int
) -> list[dict[str, Any]]:
    minutes = rng.sample(range(60 * 24 * 30), count)
    events = []
    for minute in minutes:
        event: dict[str, Any] = {
            "insight_id": insight,
            "user_id": user,
            "rating": rng.choice((1, 2, 3, 4, 5, None)),
            "comment": rng.choice(COMMENTS),
            "occurred_at": _any_offset(rng, EPOCH + timedelta(minutes=minute)),
        }
        if rng.random() < 0.25:
            event["flag_type"] = rng.choice(FLAGS)
            if rng.random() < 0.6:
                event["flag_reason"] = rng.choice(("seen elsewhere", "numbers wrong"))
        if event["rating"] is None and event["comment"] is None and "flag_type" not in event:
            event["rating"] = rng.randint(1, 5)
        if rng.random() < 0.3:
            event["event_id"] = str(_uuid(rng))
        events.append(event)
    return events


SERIES = (
    ("web-api", "cpu", "percent"),
    ("web-api", "latency_ms", "ms"),
    ("ingest", "cpu", "percent"),
    ("ingest", "queue depth", "messages"),
    ("db-proxy", "memory", "MiB"),
    ("schedulér", "runs", "count"),
)


def _sample(rng: random.Random) -> dict[str, Any]:
    service, metric, unit = rng.choice(SERIES)
    moment = EPOCH + timedelta(seconds=rng.randrange(METRIC_SPAN_S))
    if rng.random() < 0.3:
        moment += timedelta(milliseconds=rng.randrange(1, 1000))
    sample: dict[str, Any] = {
        "service_name": service,
        "metric_type": metric,
        "metric_value": rng.choice(
            (round(rng.uniform(-1_000, 100_000), rng.randint(0, 3)), float(rng.randrange(100)))
        ),
        "unit": unit,
        "timestamp": _any_offset(rng, moment),
    }
    if rng.random() < 0.8:
        sample["event_id"] = str(_uuid(rng))
    shape = rng.random()
    if shape < 0.6:
        sample["metadata"] = {
            "host": f"h{rng.randrange(20)}",
            "zone": rng.choice(("eu-west1-b", "us-central1-a", "zöne")),
            **({"load": rng.choice((0.5, 1.25, 3.0))} if rng.random() < 0.5 else {}),
            **({"tags": ["a", "b"]} if rng.random() < 0.2 else {}),
        }
    elif shape < 0.7:
        sample["metadata"] = None
    elif shape < 0.8:
        sample["metadata"] = {}
    return sample


# -- poison messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class PoisonCase:
    """A kind of poison message: its topic, the ``dead_letter_reason`` it must get, the
    text its ``dead_letter_detail`` must contain (the field), and its data, built fresh."""

    topic: str
    reason: str
    hint: str | None
    make: Callable[[random.Random], bytes] = field(compare=False)


def _fresh_job(rng: random.Random, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "job_id": str(_uuid(rng)),
        "job_type": "poison",
        "start_block": 10,
        "end_block": 20,
        "current_block": 15,
        "status": "running",
        "occurred_at": rfc3339(EPOCH),
    }
    event.update(changes)
    return event


def _fresh_feedback(rng: random.Random, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "insight_id": f"poison-insight-{rng.randrange(10**6)}",
        "user_id": "poison-user",
        "rating": 3,
        "occurred_at": rfc3339(EPOCH),
    }
    event.update(changes)
    return event


def _fresh_sample(rng: random.Random, **changes: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "event_id": str(_uuid(rng)),
        "service_name": "poison-svc",
        "metric_type": "cpu",
        "metric_value": 1.5,
        "unit": "percent",
        "timestamp": rfc3339(EPOCH),
    }
    sample.update(changes)
    return sample


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode("utf-8")


def _without(payload: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != name}


SV = "schema_violation"

# Every non-conflict poison case.
POISONS: dict[str, PoisonCase] = {
    # backfill-progress
    "bf_truncated_json": PoisonCase(
        BACKFILL, "invalid_json", None, lambda r: _dumps(_fresh_job(r))[:40]
    ),
    "bf_invalid_utf8": PoisonCase(
        BACKFILL,
        "invalid_encoding",
        None,
        lambda r: _dumps(_fresh_job(r, created_by="AB")).replace(b'"AB"', b'"\xff\xfe"'),
    ),
    "bf_missing_status": PoisonCase(
        BACKFILL, SV, "status", lambda r: _dumps(_without(_fresh_job(r), "status"))
    ),
    "bf_current_above_end": PoisonCase(
        BACKFILL, SV, "block", lambda r: _dumps(_fresh_job(r, current_block=21))
    ),
    "bf_block_out_of_range": PoisonCase(
        BACKFILL, SV, "end_block", lambda r: _dumps(_fresh_job(r, end_block=MAX_BLOCK + 1))
    ),
    "bf_unknown_field": PoisonCase(
        BACKFILL, SV, "priority", lambda r: _dumps(_fresh_job(r, priority=1))
    ),
    "bf_naive_time": PoisonCase(
        BACKFILL,
        SV,
        "occurred_at",
        lambda r: _dumps(_fresh_job(r, occurred_at=_naive(EPOCH))),
    ),
    "bf_nul_job_type": PoisonCase(
        BACKFILL, SV, "job_type", lambda r: _dumps(_fresh_job(r, job_type="blo\x00cks"))
    ),
    "bf_bad_status": PoisonCase(
        BACKFILL, SV, "status", lambda r: _dumps(_fresh_job(r, status="exploded"))
    ),
    "bf_not_an_object": PoisonCase(
        BACKFILL, "invalid_json", None, lambda r: _dumps([_fresh_job(r)])
    ),
    "bf_too_large": PoisonCase(
        BACKFILL,
        "too_large",
        None,
        lambda r: _dumps(_fresh_job(r, error_message="x" * TOO_LARGE_BYTES)),
    ),
    # feedback
    "fb_truncated_json": PoisonCase(
        FEEDBACK, "invalid_json", None, lambda r: _dumps(_fresh_feedback(r))[:-1]
    ),
    "fb_infinity": PoisonCase(
        FEEDBACK,
        "invalid_json",
        None,
        lambda r: _dumps(_fresh_feedback(r, rating=1)).replace(
            b'"rating": 1', b'"rating": Infinity'
        ),
    ),
    "fb_invalid_utf8": PoisonCase(
        FEEDBACK,
        "invalid_encoding",
        None,
        lambda r: _dumps(_fresh_feedback(r, comment="cafe")).replace(b'"cafe"', b'"caf\xe9"'),
    ),
    "fb_rating_out_of_range": PoisonCase(
        FEEDBACK, SV, "rating", lambda r: _dumps(_fresh_feedback(r, rating=9))
    ),
    "fb_missing_user": PoisonCase(
        FEEDBACK, SV, "user_id", lambda r: _dumps(_without(_fresh_feedback(r), "user_id"))
    ),
    "fb_unknown_field": PoisonCase(
        FEEDBACK, SV, "sentiment", lambda r: _dumps(_fresh_feedback(r, sentiment="happy"))
    ),
    "fb_naive_time": PoisonCase(
        FEEDBACK,
        SV,
        "occurred_at",
        lambda r: _dumps(_fresh_feedback(r, occurred_at=_naive(EPOCH) + ".5")),
    ),
    "fb_nul_comment": PoisonCase(
        FEEDBACK, SV, "comment", lambda r: _dumps(_fresh_feedback(r, comment="a\x00b"))
    ),
    "fb_reason_without_flag": PoisonCase(
        FEEDBACK, SV, None, lambda r: _dumps(_fresh_feedback(r, flag_reason="why"))
    ),
    "fb_nothing_said": PoisonCase(
        FEEDBACK, SV, None, lambda r: _dumps(_fresh_feedback(r, rating=None))
    ),
    "fb_bad_flag": PoisonCase(
        FEEDBACK, SV, "flag_type", lambda r: _dumps(_fresh_feedback(r, flag_type="rude"))
    ),
    "fb_too_large": PoisonCase(
        FEEDBACK,
        "too_large",
        None,
        lambda r: _dumps(_fresh_feedback(r, comment="x" * TOO_LARGE_BYTES)),
    ),
    # metrics
    "m_nan": PoisonCase(
        METRICS,
        "invalid_json",
        None,
        lambda r: _dumps(_fresh_sample(r)).replace(b'"metric_value": 1.5', b'"metric_value": NaN'),
    ),
    "m_truncated_json": PoisonCase(
        METRICS, "invalid_json", None, lambda r: _dumps({"metrics": [_fresh_sample(r)]})[:-2]
    ),
    "m_invalid_utf8": PoisonCase(
        METRICS,
        "invalid_encoding",
        None,
        lambda r: _dumps(_fresh_sample(r, unit="AB")).replace(b'"AB"', b'"\xc3\x28"'),
    ),
    "m_batch_one_bad": PoisonCase(
        METRICS,
        SV,
        "metrics.2.unit",
        lambda r: _dumps(
            {"metrics": [_fresh_sample(r), _fresh_sample(r), _fresh_sample(r, unit="")]}
        ),
    ),
    "m_string_value": PoisonCase(
        METRICS, SV, "metric_value", lambda r: _dumps(_fresh_sample(r, metric_value="high"))
    ),
    "m_empty_batch": PoisonCase(METRICS, SV, "metrics", lambda r: _dumps({"metrics": []})),
    "m_far_future": PoisonCase(
        METRICS,
        SV,
        "timestamp",
        lambda r: _dumps(_fresh_sample(r, timestamp="2999-01-01T00:00:00Z")),
    ),
    "m_naive_time": PoisonCase(
        METRICS,
        SV,
        "timestamp",
        lambda r: _dumps(_fresh_sample(r, timestamp=_naive(EPOCH).replace("T", " "))),
    ),
    "m_nul_service": PoisonCase(
        METRICS, SV, "service_name", lambda r: _dumps(_fresh_sample(r, service_name="web\x00api"))
    ),
    "m_unknown_field": PoisonCase(
        METRICS, SV, "region", lambda r: _dumps(_fresh_sample(r, region="eu"))
    ),
    "m_metadata_too_big": PoisonCase(
        METRICS, SV, "metadata", lambda r: _dumps(_fresh_sample(r, metadata={"blob": "y" * 5000}))
    ),
    "m_batch_too_many": PoisonCase(
        METRICS,
        SV,
        "metrics",
        lambda r: _dumps({"metrics": [_fresh_sample(r, event_id=None) for _ in range(1001)]}),
    ),
    "m_too_large": PoisonCase(
        METRICS,
        "too_large",
        None,
        lambda r: _dumps(_fresh_sample(r, metadata={"blob": "z" * TOO_LARGE_BYTES})),
    ),
}
# Covering order: each reason of each topic first, then the other cases.
FIRST_POISONS = (
    "bf_truncated_json",
    "fb_invalid_utf8",
    "m_batch_one_bad",
    "fb_too_large",
    "fb_nul_comment",
    "m_nan",
    "bf_invalid_utf8",
    "bf_naive_time",
    "fb_truncated_json",
    "m_invalid_utf8",
    "bf_unknown_field",
    "m_too_large",
)


def _conflict(
    rng: random.Random, event: Mapping[str, Any], latest: datetime
) -> tuple[str, bytes, str]:
    """A well-formed event of a stored job whose fixed fields disagree with it: its
    case, data and the field the dead letter's detail must name.

    Later than every valid event of the job and with another status and block, so
    that if it were merged, the stored row would show it.
    """
    start, end, job_type = event["start_block"], event["end_block"], event["job_type"]
    variant = rng.randrange(3)
    if variant == 0 and end < MAX_BLOCK:
        end, hint = end + 1, "end_block"
    elif variant == 1 and start < end:
        start, hint = start + 1, "start_block"
    else:
        job_type, hint = job_type + "-other", "job_type"
    changed = {
        "job_id": event["job_id"],
        "job_type": job_type,
        "start_block": start,
        "end_block": end,
        "current_block": start,
        "status": "failed",
        "error_message": "a conflicting report",
        "occurred_at": rfc3339(latest + timedelta(days=1)),
    }
    return f"conflict_{hint}", _dumps(changed), hint


# -- the workload ------------------------------------------------------------------------


@dataclass
class _Builder:
    seed: int
    rng: random.Random
    messages: list[OutgoingMessage] = field(default_factory=list)
    counter: int = 0

    def add(
        self,
        topic: str,
        data: bytes,
        kind: Kind,
        case: str,
        *,
        phase: int = 1,
        duplicate_of: str | None = None,
        reason: str | None = None,
        detail_hint: str | None = None,
    ) -> OutgoingMessage:
        self.counter += 1
        ledger_id = f"s{self.seed}-{kind[0]}{self.counter:07d}"
        attributes = {"ledger_id": ledger_id, "kind": kind, "case": case}
        if duplicate_of is not None:
            attributes["duplicate_of"] = duplicate_of
        message = OutgoingMessage(
            ledger_id, topic, data, attributes, kind, case, phase, duplicate_of, reason, detail_hint
        )
        self.messages.append(message)
        return message


def _split(total: int, shares: Sequence[float]) -> list[int]:
    weights = [max(0.0, s) for s in shares]
    whole = sum(weights) or 1.0
    counts = [int(total * w / whole) for w in weights]
    for i in sorted(range(len(counts)), key=lambda i: -weights[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def build_workload(
    seed: int,
    messages: int,
    *,
    topic_shares: Sequence[float] = (1.0, 1.0, 1.0),
    duplicate_fraction: float = 0.05,
    poison_fraction: float = 0.02,
    conflict_share: float = 0.15,
    max_too_large: int = 2,
) -> Workload:
    """About ``messages`` messages in all (valid + duplicates + poison), from ``seed``.

    ``topic_shares`` weighs backfill-progress, feedback, metrics among the valid
    messages. Of the poison, ``conflict_share`` are conflicts (phase 2, at least one
    when there is a job and any poison); at most ``max_too_large`` are over 1 MiB.
    """
    rng = random.Random(seed)
    poison_n = round(messages * poison_fraction)
    if poison_fraction > 0 and messages >= 10:
        poison_n = max(poison_n, 1)
    duplicate_n = round(messages * duplicate_fraction)
    valid_n = max(0, messages - poison_n - duplicate_n)
    backfill_n, feedback_n, metrics_n = _split(valid_n, topic_shares)
    b = _Builder(seed, rng)

    # Backfill jobs.
    jobs: list[list[dict[str, Any]]] = []
    left = backfill_n
    while left > 0:
        count = min(left, rng.randint(3, 8))
        jobs.append(_job_events(rng, count))
        left -= count
    for events in jobs:
        for event in events:
            b.add(BACKFILL, _encode(rng, event), "valid", "backfill")

    # Feedback pairs.
    insights = [f"insight-{i}" for i in range(max(2, feedback_n // 12))]
    users = [f"user-{i}" for i in range(max(3, feedback_n // 3))]
    used: set[tuple[str, str]] = set()
    left = feedback_n
    while left > 0:
        if len(used) >= len(insights) * len(users):
            users.append(f"user-{len(users)}")
        pair = (rng.choice(insights), rng.choice(users))
        if pair in used:
            continue
        used.add(pair)
        count = min(left, rng.randint(1, 5))
        for event in _feedback_events(rng, *pair, count):
            b.add(FEEDBACK, _encode(rng, event), "valid", "feedback")
        left -= count

    # Metrics: single samples and batches; now and then a sample sent in two messages.
    seen: list[dict[str, Any]] = []
    for _ in range(metrics_n):
        if rng.random() < 0.75:
            sample = rng.choice(seen) if seen and rng.random() < 0.03 else _sample(rng)
            seen.append(sample)
            b.add(METRICS, _encode(rng, sample), "valid", "metric")
        else:
            batch = [
                rng.choice(seen) if seen and rng.random() < 0.05 else _sample(rng)
                for _ in range(rng.randint(2, 25))
            ]
            seen.extend(batch)
            b.add(METRICS, _encode(rng, {"metrics": batch}), "valid", "metrics_batch")

    # Republished duplicates: the same data again, as separate messages.
    originals = list(b.messages)
    for original in rng.choices(originals, k=duplicate_n) if originals else []:
        b.add(
            original.topic,
            original.data,
            "duplicate",
            original.case,
            duplicate_of=original.ledger_id,
        )

    # Poison: conflicts (phase 2) against jobs stored in phase 1, then the rest.
    conflict_n = round(poison_n * conflict_share) if jobs else 0
    if jobs and poison_n > 0:
        conflict_n = max(conflict_n, 1)
    for _ in range(conflict_n):
        events = rng.choice(jobs)
        latest = max(datetime.fromisoformat(e["occurred_at"]) for e in events)
        case, data, hint = _conflict(rng, events[0], latest)
        b.add(BACKFILL, data, "poison", case, phase=2, reason="conflict", detail_hint=hint)
    rest = list(POISONS)
    rng.shuffle(rest)
    order = list(FIRST_POISONS) + [c for c in rest if c not in FIRST_POISONS]
    too_large = 0
    chosen = 0
    index = 0
    while chosen < poison_n - conflict_n:
        case = order[index % len(order)]
        index += 1
        if case.endswith("too_large"):
            if too_large >= max_too_large:
                continue
            too_large += 1
        kind = POISONS[case]
        b.add(kind.topic, kind.make(rng), "poison", case, reason=kind.reason, detail_hint=kind.hint)
        chosen += 1

    phase1 = [m for m in b.messages if m.phase == 1]
    phase2 = [m for m in b.messages if m.phase == 2]
    rng.shuffle(phase1)
    rng.shuffle(phase2)
    phases = (tuple(phase1), tuple(phase2)) if phase2 else (tuple(phase1),)
    return Workload(seed, phases)


# -- publishing --------------------------------------------------------------------------


def _requests(messages: Sequence[OutgoingMessage]) -> list[list[OutgoingMessage]]:
    """Publish requests within Pub/Sub's limits (1000 messages, 10 MB)."""
    chunks: list[list[OutgoingMessage]] = [[]]
    size = 0
    for m in messages:
        if chunks[-1] and (
            len(chunks[-1]) >= PUBLISH_MAX_MESSAGES or size + len(m.data) > PUBLISH_MAX_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(m)
        size += len(m.data)
    return [c for c in chunks if c]


async def _publish_request(
    pubsub: PubSub,
    topic: str,
    chunk: Sequence[OutgoingMessage],
    ledger: Ledger,
    retry_timeout_s: float,
) -> None:
    """One request, retried on failure until ``retry_timeout_s``; the ledger records
    every attempt (a failed one may still have published) and every confirmation."""
    protos = [PubsubMessage(data=m.data, attributes=dict(m.attributes)) for m in chunk]
    deadline = time.monotonic() + retry_timeout_s
    pause_s = 0.1
    while True:
        ledger.attempted(chunk)
        try:
            ids = await pubsub.publish(pubsub.topic(topic), protos, timeout_s=30)
        except PubSubError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(pause_s)
            pause_s = min(2.0, pause_s * 2)
            continue
        ledger.published(chunk, ids)
        return


@dataclass
class Pacing:
    """When a paced publish sends its last message. A scenario whose faults took
    longer than planned moves it later while publishing runs, and the messages not yet
    sent spread out to match, so that traffic outlasts every fault."""

    last_at: float
    """``time.monotonic()`` of the last slice."""

    @classmethod
    def at_rate(cls, messages: int, rate_per_s: float) -> Pacing:
        return cls(time.monotonic() + messages / rate_per_s)

    def last_no_earlier_than(self, moment: float) -> None:
        self.last_at = max(self.last_at, moment)


async def publish(
    pubsub: PubSub,
    messages: Iterable[OutgoingMessage],
    ledger: Ledger,
    *,
    pacing: Pacing | None = None,
    retry_timeout_s: float = 120.0,
) -> None:
    """Publish in order (per topic), recording what was published in ``ledger``.

    Unpaced, the messages go in slices of 1000, each slice as one request per topic
    at once. Paced, slices of ``PACE_TICK_S`` worth of messages (at the rate first
    planned) are spaced evenly over the time left until ``pacing.last_at``, read
    again before each slice. A failed request is retried (``PubSubError``) until
    ``retry_timeout_s``: a message may then be published twice, which the ledger
    knows (``attempts``), and for a valid message is just one more duplicate.
    """
    ordered = list(messages)
    slice_n = PUBLISH_MAX_MESSAGES
    if pacing is not None:
        planned_rate = len(ordered) / max(PACE_TICK_S, pacing.last_at - time.monotonic())
        slice_n = max(1, round(planned_rate * PACE_TICK_S))
    for at in range(0, len(ordered), slice_n):
        if pacing is not None and at > 0:
            slices_left = -(-(len(ordered) - at) // slice_n)
            await asyncio.sleep(max(0.0, (pacing.last_at - time.monotonic()) / slices_left))
        piece = ordered[at : at + slice_n]
        by_topic: dict[str, list[OutgoingMessage]] = {}
        for m in piece:
            by_topic.setdefault(m.topic, []).append(m)

        async def one_topic(topic: str, group: list[OutgoingMessage]) -> None:
            for chunk in _requests(group):  # in order within the topic
                await _publish_request(pubsub, topic, chunk, ledger, retry_timeout_s)

        await asyncio.gather(*(one_topic(t, g) for t, g in by_topic.items()))
