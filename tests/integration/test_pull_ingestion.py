"""End to end through the emulator: publish, the in-process worker pulls, rows and
dead letters are what CONTRACT.md says, whatever the duplicates and the order."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.emulator import (
    Counters,
    Outgoing,
    Published,
    Received,
    drain_dead_letters,
    message,
    publish,
    running_worker,
    wait_for_count,
)
from tests.support.factories import T0, at, backfill_payload, feedback_payload, metric_payload
from worker.config import Settings
from worker.pipeline.settings import BatchSettings
from worker.pubsub.client import PubSub

T = TypeVar("T")

DEAD_LETTER_KEYS = {
    "dead_letter_reason",
    "dead_letter_detail",
    "source_topic",
    "source_subscription",
    "source_message_id",
    "source_publish_time",
    "failed_at",
}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def with_duplicates(items: Sequence[T], rng: random.Random) -> list[T]:
    """Each item one to three times, the whole shuffled; the first item always thrice."""
    copies = [items[0]] * 3 + [i for i in items[1:] for _ in range(rng.randint(1, 3))]
    rng.shuffle(copies)
    return copies


async def publish_spread(
    pubsub: PubSub, topic: str, messages: Sequence[bytes | dict[str, Any]]
) -> None:
    """Publish three at a time, paced: successive groups land in separate batches, so
    the order rules are exercised both inside a batch and across batches (in SQL)."""
    for i in range(0, len(messages), 3):
        await publish(pubsub, topic, messages[i : i + 3])
        await asyncio.sleep(0.03)


async def rows(engine: AsyncEngine, sql: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(text(sql))]


# -- backfill-progress ------------------------------------------------------------------


def job_event(job_id: uuid.UUID, minutes: float, **fields: Any) -> dict[str, Any]:
    return backfill_payload(job_id=str(job_id), occurred_at=iso(at(minutes)), **fields)


async def backfill_state(engine: AsyncEngine) -> dict[uuid.UUID, dict[str, Any]]:
    found = await rows(
        engine,
        "SELECT id, job_type, start_block, end_block, current_block, status,"
        " progress_percentage, error_message, estimated_completion, started_at,"
        " completed_at, created_by FROM backfill_jobs",
    )
    return {r.pop("id"): r for r in found}


async def test_backfill_progress_duplicated_and_shuffled(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    eta1, eta2 = at(600), at(900)
    blocks_a = {"job_type": "blocks", "start_block": 100, "end_block": 200}
    blocks_b = {"job_type": "transactions", "start_block": 0, "end_block": 1000}
    blocks_c = {"job_type": "single", "start_block": 500, "end_block": 500}
    blocks_d = {"job_type": "blocks", "start_block": 0, "end_block": 40}
    events = [
        # a: paused, resumed, completed; a late "running" after completion changes nothing.
        job_event(a, 0, current_block=110, created_by="alice", **blocks_a),
        job_event(a, 1, current_block=150, estimated_completion=iso(eta1), **blocks_a),
        job_event(a, 2, current_block=150, status="paused", error_message="rate", **blocks_a),
        job_event(a, 3, current_block=180, created_by="bob", **blocks_a),
        job_event(a, 4, current_block=200, status="completed", created_by="bob", **blocks_a),
        job_event(a, 5, current_block=190, error_message="stale", **blocks_a),
        # b: the latest event fails at a lower block than one seen before.
        job_event(b, 0, current_block=100, created_by=None, **blocks_b),
        job_event(b, 1, current_block=600, created_by=None, **blocks_b),
        job_event(b, 2, current_block=400, status="failed", error_message="disk full", **blocks_b),
        # c: a one-block range is 100 % at once.
        job_event(c, 0, current_block=500, **blocks_c),
        # d: the latest event (paused) arrives among older ones.
        job_event(d, 0, current_block=10, **blocks_d),
        job_event(
            d, 2, current_block=30, status="paused", estimated_completion=iso(eta2), **blocks_d
        ),
        job_event(d, 1, current_block=20, **blocks_d),
    ]
    published = with_duplicates(events, random.Random(1))
    counters = Counters()
    async with running_worker(pubsub_settings, telemetry=counters.telemetry):
        await publish_spread(pubsub, "backfill-progress", published)
        totals = await counters.wait_settled({"backfill-progress": len(published)})
        state = await backfill_state(engine)

    assert totals["received"]["backfill-progress"] == len(published)
    assert totals["committed"]["backfill-progress"] == len(published)
    assert totals["dead_lettered"].get("backfill-progress", 0) == 0
    assert state == {
        a: {
            **blocks_a,
            "current_block": 200,
            "status": "completed",
            "progress_percentage": Decimal("100.00"),
            "error_message": None,
            "estimated_completion": None,
            "started_at": at(0),
            "completed_at": at(4),
            "created_by": "alice",
        },
        b: {
            **blocks_b,
            "current_block": 600,
            "status": "failed",
            "progress_percentage": Decimal("60.00"),
            "error_message": "disk full",
            "estimated_completion": None,
            "started_at": at(0),
            "completed_at": None,
            "created_by": None,
        },
        c: {
            **blocks_c,
            "current_block": 500,
            "status": "running",
            "progress_percentage": Decimal("100.00"),
            "error_message": None,
            "estimated_completion": None,
            "started_at": at(0),
            "completed_at": None,
            "created_by": "admin",
        },
        d: {
            **blocks_d,
            "current_block": 30,
            "status": "paused",
            "progress_percentage": Decimal("75.00"),
            "error_message": None,
            "estimated_completion": eta2,
            "started_at": at(0),
            "completed_at": None,
            "created_by": "admin",
        },
    }
    assert await drain_dead_letters(pubsub, "backfill-progress") == []


# -- feedback ---------------------------------------------------------------------------


async def feedback_state(engine: AsyncEngine) -> dict[tuple[str, str], dict[str, Any]]:
    found = await rows(
        engine,
        "SELECT insight_id, user_id, rating, comment, flag_type, flag_reason, created_at,"
        " updated_at FROM insight_feedback",
    )
    return {(r.pop("insight_id"), r.pop("user_id")): r for r in found}


def opinion(insight: str, user: str, minutes: float, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"rating": None, "comment": None}
    return feedback_payload(
        insight_id=insight, user_id=user, occurred_at=iso(at(minutes)), **{**base, **fields}
    )


async def test_feedback_latest_event_wins_whatever_the_arrival(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    text_as_is = "  Ünïcødé 🚀\ttrailing  "
    event_id = str(uuid.uuid4())
    events = [
        opinion("i1", "u1", 0, rating=2, comment="meh"),
        opinion("i1", "u1", 2, rating=5, comment="great"),
        opinion("i1", "u1", 1, rating=1, flag_type="spam", flag_reason="ads"),
        opinion("i1", "u2", 0, rating=4),
        opinion("i1", "u2", 3, comment="wrong", flag_type="misleading", flag_reason="numbers"),
        # An event with an offset: its instant, not its text, orders it.
        feedback_payload(
            insight_id="i1",
            user_id="u2",
            rating=1,
            occurred_at=(at(2) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00"),
        ),
        opinion("i2", "u1", 5, comment=text_as_is),
        opinion("i2", "u3", 1, rating=3, event_id=event_id),
    ]
    published = with_duplicates(events, random.Random(2))
    counters = Counters()
    async with running_worker(pubsub_settings, telemetry=counters.telemetry):
        await publish_spread(pubsub, "feedback", published)
        totals = await counters.wait_settled({"feedback": len(published)})
        state = await feedback_state(engine)

    assert totals["committed"]["feedback"] == len(published)
    assert totals["dead_lettered"].get("feedback", 0) == 0
    nothing = {"rating": None, "comment": None, "flag_type": None, "flag_reason": None}
    assert state == {
        ("i1", "u1"): {**nothing, "rating": 5, "comment": "great"}
        | {"created_at": at(0), "updated_at": at(2)},
        ("i1", "u2"): {
            **nothing,
            "comment": "wrong",
            "flag_type": "misleading",
            "flag_reason": "numbers",
        }
        | {"created_at": at(0), "updated_at": at(3)},
        ("i2", "u1"): {**nothing, "comment": text_as_is, "created_at": at(5), "updated_at": at(5)},
        ("i2", "u3"): {**nothing, "rating": 3, "created_at": at(1), "updated_at": at(1)},
    }
    assert await drain_dead_letters(pubsub, "feedback") == []


# -- metrics ----------------------------------------------------------------------------


def reordered(payload: dict[str, Any]) -> bytes:
    """The same JSON object laid out differently: keys reversed, indented."""
    return json.dumps(dict(reversed(list(payload.items()))), indent=2).encode()


async def test_metrics_each_identity_stored_once(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    rng = random.Random(3)

    def sample(i: int, **fields: Any) -> dict[str, Any]:
        payload = metric_payload(
            event_id=str(uuid.uuid4()),
            service_name=f"svc-{i % 3}",
            metric_value=i + 0.5,
            timestamp=iso(T0 + timedelta(seconds=i)),
            metadata={"i": i},
        )
        return payload | fields

    singles = [sample(i) for i in range(20)]
    anonymous = [sample(100 + i) for i in range(5)]
    for payload in anonymous:
        del payload["event_id"]  # identity: the UUIDv5 of the canonical sample
    batch1 = [sample(200 + i) for i in range(10)]
    # batch2 repeats three samples of batch1 and two single samples.
    batch2 = [sample(300 + i) for i in range(5)] + batch1[:3] + singles[:2]
    untimed = sample(400, timestamp=None)

    messages: list[bytes | dict[str, Any]] = [*singles, *anonymous]
    messages += [reordered(p) for p in anonymous]  # same samples, other bytes
    messages += [{"metrics": batch1}, {"metrics": batch2}, {"metrics": list(reversed(batch2))}]
    messages.append(untimed)
    published = with_duplicates(messages, rng)

    expected_ids = {uuid.UUID(p["event_id"]) for p in [*singles, *batch1, *batch2, untimed]}
    expected_count = len(expected_ids) + len(anonymous)

    counters = Counters()
    async with running_worker(pubsub_settings, telemetry=counters.telemetry):
        before = datetime.now(UTC)
        await publish_spread(pubsub, "metrics", published)
        after = datetime.now(UTC)
        totals = await counters.wait_settled({"metrics": len(published)})
        stored = await rows(
            engine,
            "SELECT id, service_name, metric_type, metric_value, unit, timestamp, metadata"
            " FROM system_metrics",
        )
        identities = await wait_for_count(
            engine, "SELECT count(*) FROM system_metric_ids", expected_count
        )

    assert totals["committed"]["metrics"] == len(published)
    assert totals["dead_lettered"].get("metrics", 0) == 0
    assert identities == expected_count
    assert len(stored) == expected_count
    assert len({r["id"] for r in stored}) == expected_count
    assert expected_ids <= {r["id"] for r in stored}

    def key(p: dict[str, Any]) -> tuple[Any, ...]:
        return (p["service_name"], p["metric_type"], p["metric_value"], p["unit"], p["metadata"])

    everything = [*singles, *anonymous, *batch1, *batch2[:5], untimed]
    assert sorted(map(key, stored), key=repr) == sorted(map(key, everything), key=repr)
    by_id = {r["id"]: r for r in stored}
    for p in [*singles, *batch1, *batch2]:
        assert by_id[uuid.UUID(p["event_id"])]["timestamp"] == datetime.fromisoformat(
            p["timestamp"]
        )
    # No timestamp: the publish time of the copy stored first.
    stamped = by_id[uuid.UUID(untimed["event_id"])]["timestamp"]
    assert before - timedelta(seconds=2) <= stamped <= after + timedelta(seconds=2)
    assert await drain_dead_letters(pubsub, "metrics") == []


# -- rejections -------------------------------------------------------------------------

TOO_BIG = 1024 * 1024 + 1


def bad(case: str, data: bytes | dict[str, Any]) -> Outgoing:
    return message(data, case=case, origin="test-suite")


def rejected_backfill(job_id: uuid.UUID) -> dict[str, Outgoing]:
    good = job_event(job_id, 1, current_block=805500)
    return {
        "invalid_json": bad("invalid_json", b'{"job_id": "x",'),
        "invalid_encoding": bad("invalid_encoding", b'{"created_by": "\xff\xfe"}'),
        "schema_violation": bad("schema_violation", {**good, "status": "exploded"}),
        "too_large": bad("too_large", {**good, "error_message": "x" * TOO_BIG}),
        # The stored job ends at 810000: same id, another range.
        "conflict": bad("conflict", {**good, "end_block": 820000}),
        # Past BACKFILL_RETENTION_DAYS (180): it could recreate an archived job.
        "expired": bad("expired", {**good, "occurred_at": iso(T0 - timedelta(days=200))}),
    }


def rejected_feedback() -> dict[str, Outgoing]:
    good = opinion("bad", "bad", 0, rating=3)
    return {
        "invalid_json": bad("invalid_json", b"[1, 2"),
        "invalid_encoding": bad("invalid_encoding", b'{"comment": "caf\xe9"}'),
        "schema_violation": bad("schema_violation", {**good, "rating": 9}),
        "schema_violation_nul": bad("schema_violation_nul", {**good, "comment": "a\x00b"}),
        "schema_violation_naive_time": bad(
            "schema_violation_naive_time", {**good, "occurred_at": "2026-11-21T10:00:00"}
        ),
        # An unknown field with a very long name: the detail is cut, still names it.
        "schema_violation_long": bad("schema_violation_long", {**good, "y" * 3000: 1}),
        "too_large": bad("too_large", {**good, "comment": "x" * TOO_BIG}),
        # Valid JSON nested deeper than Python's recursion limit, a NUL at the bottom.
        "schema_violation_deep": bad(
            "schema_violation_deep",
            b'{"comment": ' + b"[" * 1000 + b'"\\u0000"' + b"]" * 1000 + b"}",
        ),
        "expired": bad("expired", {**good, "occurred_at": iso(T0 - timedelta(days=800))}),
    }


def rejected_metrics() -> dict[str, Outgoing]:
    good = metric_payload(event_id=str(uuid.uuid4()))
    doomed = [metric_payload(event_id=str(uuid.uuid4()), metric_value=float(i)) for i in range(3)]
    return {
        "invalid_json": bad("invalid_json", b'{"metric_value": NaN}'),
        "invalid_encoding": bad("invalid_encoding", b'{"unit": "\xc3\x28"}'),
        "schema_violation": bad("schema_violation", {**good, "metric_value": "high"}),
        # All or nothing: two good samples and one bad one, none stored.
        "schema_violation_batch": bad(
            "schema_violation_batch", {"metrics": [*doomed[:2], {**doomed[2], "unit": ""}]}
        ),
        "too_large": bad("too_large", {**good, "metadata": {"blob": "x" * TOO_BIG}}),
        # Past METRICS_RETENTION_DAYS (90), in the second sample: the whole message goes.
        "expired": bad(
            "expired",
            {"metrics": [doomed[0], {**doomed[1], "timestamp": iso(T0 - timedelta(days=100))}]},
        ),
    }


# Which field each schema violation's detail must name.
DETAIL_NAMES = {
    "backfill-progress": {
        "schema_violation": "status",
        "conflict": "end_block",
        "expired": "occurred_at",
    },
    "feedback": {
        "schema_violation": "rating",
        "schema_violation_nul": "comment",
        "schema_violation_naive_time": "occurred_at",
        "schema_violation_long": "yyyy",
        "schema_violation_deep": "comment[0]",
        "expired": "occurred_at",
    },
    "metrics": {
        "schema_violation": "metric_value",
        "schema_violation_batch": "metrics.2.unit",
        "expired": "metrics.1.timestamp",
    },
}
SUBSCRIPTIONS = {
    "backfill-progress": "backfill-progress-worker",
    "feedback": "feedback-worker",
    "metrics": "metrics-worker",
}


def rfc3339(value: str) -> datetime:
    assert value.endswith("Z"), value
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None
    return moment


def check_dead_letter(
    topic: str, letter: Received, sent: Published, before: datetime, after: datetime
) -> None:
    case = sent.attributes["case"]
    attributes = letter.attributes
    assert letter.data == sent.data, case  # unchanged, byte for byte
    assert {k: attributes[k] for k in sent.attributes} == sent.attributes, case
    assert set(attributes) == set(sent.attributes) | DEAD_LETTER_KEYS, case
    reason = "schema_violation" if case.startswith("schema_violation") else case
    assert attributes["dead_letter_reason"] == reason, (case, attributes)
    detail = attributes["dead_letter_detail"]
    assert 0 < len(detail) <= 1024, (case, len(detail))
    assert len(detail.encode()) <= 1024, case
    if case in DETAIL_NAMES[topic]:
        assert DETAIL_NAMES[topic][case] in detail, (case, detail)
    assert attributes["source_topic"] == topic
    assert attributes["source_subscription"] == SUBSCRIPTIONS[topic]
    assert attributes["source_message_id"] == sent.message_id, case
    published_at = rfc3339(attributes["source_publish_time"])
    failed_at = rfc3339(attributes["failed_at"])
    slack = timedelta(seconds=2)
    assert before - slack <= published_at <= after + slack, case
    assert published_at - slack <= failed_at <= datetime.now(UTC) + slack, case


async def test_rejections_are_dead_lettered_and_good_messages_still_apply(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    rng = random.Random(4)
    job_id = uuid.uuid4()
    bad_messages = {
        "backfill-progress": rejected_backfill(job_id),
        "feedback": rejected_feedback(),
        "metrics": rejected_metrics(),
    }
    good_messages: dict[str, list[Outgoing]] = {
        "backfill-progress": [
            message(job_event(job_id, 2 + i, current_block=805000 + i), case="good")
            for i in range(10)
        ],
        "feedback": [
            message(opinion(f"ok-{i}", "u", 0, rating=1 + i % 5), case="good") for i in range(10)
        ],
        "metrics": [
            message(metric_payload(event_id=str(uuid.uuid4()), metric_value=i + 0.25), case="good")
            for i in range(10)
        ],
    }
    counters = Counters()
    # A longer batch delay: good and bad messages of one request share a batch.
    batch = BatchSettings(max_batch_delay_ms=200)
    async with running_worker(pubsub_settings, telemetry=counters.telemetry, batch=batch):
        # The job must exist before an event can conflict with it.
        await publish(pubsub, "backfill-progress", [job_event(job_id, 0, current_block=805000)])
        await wait_for_count(engine, "SELECT count(*) FROM backfill_jobs", 1)

        before = datetime.now(UTC)
        sent: dict[str, list[Published]] = {}
        for topic, goods in good_messages.items():
            mixed: list[Outgoing] = [*goods, *bad_messages[topic].values()]
            rng.shuffle(mixed)
            sent[topic] = await publish(pubsub, topic, mixed)
        after = datetime.now(UTC)
        expected = {topic: len(messages) for topic, messages in sent.items()}
        expected["backfill-progress"] += 1
        totals = await counters.wait_settled(expected)
        letters = {
            topic: await drain_dead_letters(pubsub, topic, expected=len(bad_messages[topic]))
            for topic in sent
        }
        job = (await backfill_state(engine))[job_id]
        feedback_rows = await feedback_state(engine)
        metric_ids = {r["id"] for r in await rows(engine, "SELECT id FROM system_metrics")}

    # Telemetry: every message received once, settled once, in the right column.
    for topic in sent:
        n_bad = len(bad_messages[topic])
        n_good = expected[topic] - n_bad
        assert totals["received"][topic] == expected[topic], topic
        assert totals["committed"][topic] == n_good, topic
        assert totals["dead_lettered"][topic] == n_bad, topic
        assert totals["nacked"].get(topic, 0) == 0, topic

    for topic, published in sent.items():
        by_id = {p.message_id: p for p in published}
        got = letters[topic]
        assert sorted(d.attributes["case"] for d in got) == sorted(bad_messages[topic]), topic
        for letter in got:
            sent_message = by_id[letter.attributes["source_message_id"]]
            assert sent_message.attributes["case"] != "good"
            check_dead_letter(topic, letter, sent_message, before, after)

    # The good ones applied, the bad ones did not.
    assert job["current_block"] == 805009
    assert job["end_block"] == 810000
    assert job["error_message"] is None
    assert set(feedback_rows) == {(f"ok-{i}", "u") for i in range(10)}
    assert len(metric_ids) == 10
    good_metric_ids = {uuid.UUID(json.loads(m.data)["event_id"]) for m in good_messages["metrics"]}
    assert metric_ids == good_metric_ids


async def test_counters_count_each_topic_separately(
    pubsub_settings: Settings, pubsub: PubSub
) -> None:
    counters = Counters()
    published: dict[str, list[bytes | dict[str, Any]]] = {
        "backfill-progress": [job_event(uuid.uuid4(), 0, current_block=805000)] * 2,
        "feedback": [opinion("t", f"u{i}", 0, rating=4) for i in range(3)] + [b"nope"],
        "metrics": [metric_payload(event_id=str(uuid.uuid4())) for _ in range(5)] + [b"{"] * 2,
    }
    async with running_worker(pubsub_settings, telemetry=counters.telemetry):
        for topic, messages in published.items():
            await publish(pubsub, topic, messages)
        totals = await counters.wait_settled({t: len(m) for t, m in published.items()})

    assert totals["received"] == {"backfill-progress": 2, "feedback": 4, "metrics": 7}
    assert totals["committed"] == {"backfill-progress": 2, "feedback": 3, "metrics": 5}
    assert totals["dead_lettered"] == {"feedback": 1, "metrics": 2}
    assert totals["nacked"] == {}
