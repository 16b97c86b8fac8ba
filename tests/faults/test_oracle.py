"""The fault suite's own instruments, without faults: the oracle on hand-written
events (any order gives one answer), the workload against the project's decoder and
schemas, and the whole chain through the real worker with a perfect verdict, plus a
broken state that each check catches.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.backfill import BackfillHandler
from handlers.feedback import FeedbackHandler
from handlers.metric_identity import sample_identity
from handlers.metrics import MetricsHandler
from schemas.metrics import MetricSample
from tests.faults.checks import (
    check_dead_letters,
    check_redis_invariant,
    compare_database,
    figures,
)
from tests.faults.oracle import (
    AmbiguousExpectation,
    Expected,
    FeedbackRow,
    JobRow,
    Ledger,
    MetricRow,
    expect,
    expected_state,
    metric_identity,
)
from tests.faults.workload import (
    EPOCH,
    TOPICS,
    OutgoingMessage,
    Pacing,
    Workload,
    build_workload,
    publish,
)
from tests.support.cache import own_redis_db, wait_idle
from tests.support.emulator import Counters, running_worker
from tests.support.topics import RUN_TOPICS
from worker.config import Settings
from worker.exceptions import PermanentError, SchemaViolationError
from worker.pipeline.decoding import decode_json_object
from worker.pubsub.client import PubSub, PubsubMessage
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.storage.cache import Cache, create_redis

T0 = EPOCH + timedelta(hours=12)
JOB = uuid.UUID("5d0e6f7a-3c1b-4f7e-9a55-1f1f7f1d2c3b")
RETRIED = uuid.UUID("00000000-0000-4000-8000-000000000002")
SINGLE = uuid.UUID("00000000-0000-4000-8000-000000000003")


def at(minutes: float, offset_h: int = 0) -> str:
    """``T0 + minutes`` in RFC 3339, in an offset of ``offset_h`` hours."""
    moment = T0 + timedelta(minutes=minutes)
    if offset_h == 0:
        return moment.isoformat().replace("+00:00", "Z")
    return moment.astimezone(timezone(timedelta(hours=offset_h))).isoformat()


def instant(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def job(job_id: uuid.UUID, minutes: float, block: int, status: str, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "job_id": str(job_id),
        "job_type": "blocks",
        "start_block": 100,
        "end_block": 400,
        "current_block": block,
        "status": status,
        "occurred_at": at(minutes, offset_h=2 if minutes % 2 else 0),
        "created_by": "alice",
    }
    event.update(extra)
    return event


def opinion(insight: str, user: str, minutes: float, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"insight_id": insight, "user_id": user, "occurred_at": at(minutes)}
    event.update(extra)
    return event


def permutations_of(events: Sequence[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
    for order in itertools.permutations(events):
        yield list(order)


# -- the oracle on hand-written events -------------------------------------------------

BACKFILL_EVENTS: list[tuple[str, Any]] = [
    # JOB: runs, pauses, completes below end_block; a stale report comes after.
    ("backfill-progress", job(JOB, 0, 150, "running", estimated_completion=at(500))),
    ("backfill-progress", job(JOB, 1, 200, "paused", error_message="rate limited")),
    ("backfill-progress", job(JOB, 3, 390, "completed")),
    ("backfill-progress", job(JOB, 4, 395, "running")),
    ("backfill-progress", job(JOB, 3, 390, "completed")),  # republished
    # RETRIED: fails at 300, a retry reports 250 later: running, no error, max block.
    ("backfill-progress", job(RETRIED, 0, 300, "failed", error_message="disk full")),
    ("backfill-progress", job(RETRIED, 2, 250, "running")),
]


def test_backfill_oracle_any_order() -> None:
    want = {
        JOB: JobRow(
            job_type="blocks",
            start_block=100,
            end_block=400,
            current_block=400,
            status="completed",
            progress_percentage=Decimal("100.00"),
            estimated_completion=None,
            error_message=None,
            started_at=instant(0),
            completed_at=instant(3),
            created_by="alice",
        ),
        RETRIED: JobRow(
            job_type="blocks",
            start_block=100,
            end_block=400,
            current_block=300,
            status="running",
            progress_percentage=Decimal("66.67"),
            estimated_completion=None,
            error_message=None,
            started_at=instant(0),
            completed_at=None,
            created_by="alice",
        ),
    }
    assert expect(BACKFILL_EVENTS).jobs == want
    reference = expect(BACKFILL_EVENTS)
    assert all(expect(order) == reference for order in permutations_of(BACKFILL_EVENTS))


def test_backfill_oracle_progress_edges() -> None:
    single = job(SINGLE, 0, 7, "running", start_block=7, end_block=7)
    third = job(RETRIED, 0, 200, "running", start_block=100, end_block=400)
    tiny = job(JOB, 0, 1, "paused", start_block=0, end_block=8, estimated_completion=at(9, 2))
    jobs = expect([("backfill-progress", e) for e in (single, third, tiny)]).jobs
    assert jobs[SINGLE].progress_percentage == Decimal("100.00")
    assert jobs[RETRIED].progress_percentage == Decimal("33.33")
    assert jobs[JOB].progress_percentage == Decimal("12.50")
    assert jobs[JOB].estimated_completion == instant(9)
    assert jobs[JOB].error_message is None


FEEDBACK_EVENTS: list[tuple[str, Any]] = [
    ("feedback", opinion("i1", "u1", 0, rating=2, comment="meh")),
    ("feedback", opinion("i1", "u1", 2, rating=5, comment="  great  ")),
    ("feedback", opinion("i1", "u1", 1, flag_type="spam", flag_reason="ads")),
    ("feedback", opinion("i1", "u2", 3, comment="", flag_type="other")),
    ("feedback", opinion("i1", "u1", 2, rating=5, comment="  great  ")),  # republished
    ("feedback", opinion("i2", "u1", 1, rating=1, event_id=str(uuid.UUID(int=7)))),
]


def test_feedback_oracle_any_order() -> None:
    want = {
        ("i1", "u1"): FeedbackRow(5, "  great  ", None, None, instant(0), instant(2)),
        ("i1", "u2"): FeedbackRow(None, "", "other", None, instant(3), instant(3)),
        ("i2", "u1"): FeedbackRow(1, None, None, None, instant(1), instant(1)),
    }
    assert expect(FEEDBACK_EVENTS).feedback == want
    reference = expect(FEEDBACK_EVENTS)
    assert all(expect(order) == reference for order in permutations_of(FEEDBACK_EVENTS))


def sample(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "service_name": "web-api",
        "metric_type": "cpu",
        "metric_value": 45.5,
        "unit": "percent",
        "timestamp": at(0),
        "metadata": {"host": "a", "zone": "ü"},
    }
    payload.update(changes)
    return payload


def test_metrics_oracle_identities() -> None:
    named = sample(event_id=str(uuid.UUID(int=1)))
    anonymous = sample()
    # The same sample: another offset, other key orders, another layout.
    same = dict(reversed(list(sample(timestamp=at(0, offset_h=2)).items())))
    same["metadata"] = {"zone": "ü", "host": "a"}
    other = sample(metric_value=45.25)
    events: list[tuple[str, Any]] = [
        ("metrics", named),
        ("metrics", anonymous),
        ("metrics", json.dumps(same, indent=2).encode()),
        ("metrics", {"metrics": [other, named]}),
    ]
    reference = expect(events)
    assert all(expect(order) == reference for order in permutations_of(events))
    metrics = reference.metrics
    assert set(metrics) == {uuid.UUID(int=1), metric_identity(anonymous), metric_identity(other)}
    assert metric_identity(same) == metric_identity(anonymous)
    assert metrics[uuid.UUID(int=1)] == MetricRow(
        "web-api", "cpu", 45.5, "percent", T0, {"host": "a", "zone": "ü"}
    )
    # Cross-check with the handler's identity (the documented rule, implemented twice).
    for payload in (anonymous, same, other, named):
        assert metric_identity(payload) == sample_identity(MetricSample.model_validate(payload))


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([job(JOB, 1, 150, "running"), job(JOB, 1, 150, "paused")], id="backfill-tie"),
        pytest.param(
            [job(JOB, 1, 400, "completed"), job(JOB, 2, 400, "completed")], id="two-completions"
        ),
        pytest.param(
            [job(JOB, 1, 150, "running"), job(JOB, 2, 150, "running", end_block=500)],
            id="conflicting-job",
        ),
        pytest.param(
            [opinion("i", "u", 1, rating=1), opinion("i", "u", 1, rating=2)], id="feedback-tie"
        ),
        pytest.param([sample(event_id=str(uuid.UUID(int=1)), timestamp=None)], id="untimed"),
        pytest.param(
            [
                sample(event_id=str(uuid.UUID(int=1))),
                sample(event_id=str(uuid.UUID(int=1)), metric_value=1.0),
            ],
            id="identity-reused",
        ),
    ],
)
def test_oracle_refuses_ambiguous_input(events: list[dict[str, Any]]) -> None:
    topic = {"job_id": "backfill-progress", "insight_id": "feedback", "unit": "metrics"}
    pairs = [(next(t for k, t in topic.items() if k in e), e) for e in events]
    with pytest.raises(AmbiguousExpectation):
        expect(pairs)


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30])
def test_metadata_integers_beyond_64_bits_are_refused(n: int) -> None:
    # orjson decodes them as doubles: stored changed, and two samples that differ only
    # in such a number would share one identity. Refused instead, naming the field.
    data = json.dumps(sample(metadata={"n": n})).encode()
    with pytest.raises(SchemaViolationError) as caught:
        MetricsHandler().parse(decode_json_object(data), datetime.now(UTC))
    assert "metadata" in caught.value.detail


def test_same_instant_in_two_offsets_is_no_tie() -> None:
    a = opinion("i", "u", 1, rating=4)
    b = {**a, "occurred_at": at(1, offset_h=2)}
    assert expect([("feedback", a), ("feedback", b)]).feedback[("i", "u")].rating == 4


# -- the workload ------------------------------------------------------------------------

SEED = 20261123


@pytest.fixture(scope="module")
def work() -> Workload:
    return build_workload(SEED, 2000)


HANDLERS: dict[str, Any] = {
    "backfill-progress": BackfillHandler(),
    "feedback": FeedbackHandler(),
    "metrics": MetricsHandler(),
}


def parse(message: OutgoingMessage) -> Any:
    """What the worker's pipeline does before batching: decode, then validate."""
    payload = decode_json_object(message.data)
    return HANDLERS[message.topic].parse(payload, datetime.now(UTC))


def test_workload_is_deterministic_and_shaped(work: Workload) -> None:
    assert build_workload(SEED, 2000) == work
    assert build_workload(SEED + 1, 2000) != work
    shape = work.summary()
    assert shape["total"] == 2000
    assert shape["duplicate"] == 100 and shape["poison"] == 40
    assert all(550 < n < 750 for n in work.per_topic(1).values()), work.per_topic(1)
    assert {m.ledger_id for m in work.messages} == {
        m.attributes["ledger_id"] for m in work.messages
    }
    assert len({m.ledger_id for m in work.messages}) == 2000
    # Phase 2 is the conflicts, against jobs all of whose events are in phase 1.
    assert len(work.phases) == 2
    assert {m.reason for m in work.phases[1]} == {"conflict"}
    assert all(m.reason != "conflict" for m in work.phases[0])
    # Duplicates repeat valid data only; poison is never duplicated.
    by_id = {m.ledger_id: m for m in work.messages}
    for m in work.messages:
        if m.kind == "duplicate":
            assert m.duplicate_of is not None
            assert by_id[m.duplicate_of].kind == "valid"
            assert by_id[m.duplicate_of].data == m.data
    poison_data = Tally(m.data for m in work.poisons)
    assert sum(1 for m in work.messages if m.data in poison_data) == len(work.poisons)
    # Shuffled: the topics interleave, duplicates land far from their originals.
    order = {m.ledger_id: i for i, m in enumerate(work.messages)}
    gaps = [
        abs(order[m.ledger_id] - order[m.duplicate_of or ""]) for m in work.valid if m.duplicate_of
    ]
    assert max(gaps) > 1000


def test_workload_poison_covers_every_rejection(work: Workload) -> None:
    reasons = Tally(m.reason for m in work.poisons)
    assert set(reasons) == {
        "invalid_json",
        "invalid_encoding",
        "schema_violation",
        "too_large",
        "conflict",
    }
    assert reasons["too_large"] <= 2
    for topic in TOPICS:
        mine = {m.reason for m in work.poisons if m.topic == topic}
        assert {"invalid_json", "invalid_encoding", "schema_violation"} <= mine, topic
    cases = {m.case for m in work.poisons}
    assert {"m_batch_one_bad", "fb_nul_comment", "m_nan", "bf_naive_time"} <= cases


def test_workload_messages_are_what_they_claim(work: Workload) -> None:
    """Valid messages pass the worker's decoder and schema; each poison but the
    conflicts is refused there with its reason and names its field."""
    phase1_jobs: dict[str, dict[str, Any]] = {}
    for m in work.valid:
        parse(m)  # raises if the workload made an invalid "valid" event
        if m.topic == "backfill-progress":
            event = json.loads(m.data)
            phase1_jobs[event["job_id"]] = event
    for m in work.poisons:
        if m.reason == "conflict":
            event = json.loads(m.data)
            parse(m)
            stored = phase1_jobs[event["job_id"]]
            fixed = ("job_type", "start_block", "end_block")
            assert [event[f] for f in fixed] != [stored[f] for f in fixed]
            continue
        with pytest.raises(PermanentError) as refused:
            parse(m)
        assert refused.value.reason == m.reason, m.case
        if m.detail_hint:
            assert m.detail_hint in refused.value.detail, (m.case, refused.value.detail)


def test_oracle_on_the_workload_is_order_free(work: Workload) -> None:
    expected = expected_state(work.messages)
    counts = expected.counts()
    assert all(n > 50 for n in counts.values()), counts
    statuses = Tally(row.status for row in expected.jobs.values())
    assert statuses["completed"] and statuses["failed"] and statuses["running"], statuses
    rng = random.Random(1)
    for _ in range(3):
        shuffled = list(work.messages)
        rng.shuffle(shuffled)
        assert expected_state(shuffled) == expected
    # Only the originals: duplicates add nothing.
    assert expected_state([m for m in work.messages if m.kind == "valid"]) == expected
    # Every anonymous sample gets the handler's identity too.
    for m in work.valid:
        if m.topic != "metrics":
            continue
        payload = json.loads(m.data)
        for s in payload.get("metrics", [payload]):
            assert metric_identity(s) == sample_identity(MetricSample.model_validate(s))


# -- the chain through the real worker ---------------------------------------------------

# FAULT_ORACLE_MESSAGES / FAULT_ORACLE_SEED: a bigger or another run by hand.
INTEGRATION_MESSAGES = int(os.environ.get("FAULT_ORACLE_MESSAGES", "1200"))
INTEGRATION_SEED = int(os.environ.get("FAULT_ORACLE_SEED", str(SEED)))


async def fill_cache(settings: Settings, engine: AsyncEngine, expected: Expected) -> int:
    """Read every insight, job and series through the read path: keys get filled."""
    cache = Cache(create_redis(settings))
    reads = CacheService(cache, DatabaseService(engine, None))
    try:
        for insight in {pair[0] for pair in expected.feedback}:
            await reads.get_feedback_stats(insight)
        for job_id in expected.jobs:
            await reads.get_backfill_job(job_id)
        for series in {(m.service_name, m.metric_type) for m in expected.metrics.values()}:
            await reads.recent_metrics(*series)
    finally:
        await cache.close()
    return len(expected.feedback) + len(expected.jobs)


@pytest.mark.slow
async def test_workload_through_the_worker(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    work = build_workload(INTEGRATION_SEED, INTEGRATION_MESSAGES)
    ledger = Ledger()
    counters = Counters()
    dsn = pubsub_settings.database_url
    started = time.monotonic()
    async with own_redis_db(pubsub_settings) as rdb:
        async with running_worker(
            rdb.settings, topics=RUN_TOPICS, telemetry=counters.telemetry
        ) as worker:
            await publish(pubsub, work.phases[0], ledger)
            await counters.wait_settled(ledger.per_topic(), timeout_s=60)
            phase1 = await compare_database(dsn, ledger.expected())
            assert phase1.ok, phase1.describe()
            await publish(
                pubsub, work.phases[1], ledger, pacing=Pacing.at_rate(len(work.phases[1]), 200)
            )
            await counters.wait_settled(ledger.per_topic(), timeout_s=60)
            # Idle first: no invalidation is left to refuse a fill, so every key fills.
            await wait_idle(worker, counters, quiet_s=0.5)
            await fill_cache(rdb.settings, engine, ledger.expected())
            totals = await wait_idle(worker, counters, quiet_s=0.3)
        applied_s = time.monotonic() - started

        database = await compare_database(dsn, ledger.expected())
        dead = await check_dead_letters(pubsub, ledger)
        cached = await check_redis_invariant(rdb.url, dsn)
        print(work.summary(), figures(database, dead, cached), f"applied in {applied_s:.1f}s")

        assert database.ok, database.describe()
        assert dead.ok, dead.describe()
        assert cached.ok, cached.describe()
        assert dead.found == dead.expected == len(work.poisons) and dead.repeated == 0
        assert sum(totals["dead_lettered"].values()) == len(work.poisons), totals
        assert cached.checked["backfill"] == len(ledger.expected().jobs)
        assert cached.checked["feedback"] > 0 and cached.checked["metrics"] > 0

        # Each check can fail: break the state on purpose, one thing per counter.
        expected = ledger.expected()
        lost_job = next(iter(expected.jobs))
        insight, user = next(iter(expected.feedback))
        doubled = next(iter(expected.metrics))
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM backfill_jobs WHERE id = :id"), {"id": lost_job})
            await conn.execute(
                text(
                    "UPDATE insight_feedback SET rating = NULL, comment = 'edited'"
                    " WHERE insight_id = :i AND user_id = :u"
                ),
                {"i": insight, "u": user},
            )
            await conn.execute(
                text(
                    "INSERT INTO system_metrics (id, service_name, metric_type, metric_value,"
                    ' unit, "timestamp", metadata) SELECT id, service_name, metric_type,'
                    " metric_value, unit, \"timestamp\" + interval '1 second', metadata"
                    " FROM system_metrics WHERE id = :id"
                ),
                {"id": doubled},
            )
            await conn.execute(
                text(
                    "INSERT INTO insight_feedback (insight_id, user_id, rating, created_at,"
                    " updated_at, event_key) VALUES ('poison', 'applied', 1, now(), now(), '')"
                )
            )
        broken = await compare_database(dsn, expected)
        assert (broken.lost, broken.wrong, broken.doubled, broken.unexpected) == (1, 1, 1, 1), (
            broken.describe()
        )
        # The job row is gone but its cache entry is not: stale. So is a tampered entry
        # (with no TTL either).
        tampered = min([k async for k in rdb.redis.scan_iter(match="metrics:*:recent")])
        await rdb.redis.set(tampered, "[]")
        stale = await check_redis_invariant(rdb.url, dsn)
        assert stale.stale >= 2 and stale.bad_ttl == 1, stale.describe()

        # Dead letters: all drained already, so now every poison is missing; and a
        # valid message in a dead-letter topic is misrouted.
        valid = work.valid[0]
        await pubsub.publish(
            pubsub.topic(f"{valid.topic}-dead-letter"),
            [PubsubMessage(data=valid.data, attributes=dict(valid.attributes))],
        )
        again = await check_dead_letters(pubsub, ledger, timeout_s=3, quiet_s=0.5)
        assert again.missing == len(work.poisons) and again.misrouted == 1, again.describe()
    assert time.monotonic() - started < 60 + INTEGRATION_MESSAGES / 200
