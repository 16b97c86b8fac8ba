"""CONTRACT.md ``metrics`` effects, through ``DatabaseService``; and database errors."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.metric_identity import sample_identity
from handlers.metrics import samples_message
from schemas.metrics import MetricAggregate, MetricRecord, MetricSample
from tests.support.factories import T0, at, sample
from worker.config import Settings
from worker.exceptions import DatabaseUnavailableError, ValidationError
from worker.read.service import DatabaseService
from worker.storage.database import create_engine

pytestmark = pytest.mark.usefixtures("metrics_write_path")


async def count(engine: AsyncEngine, table: str = "system_metrics") -> int:
    async with engine.connect() as conn:
        value = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar()
    assert isinstance(value, int)
    return value


async def test_record_metric_stores_the_sample(db: DatabaseService) -> None:
    event_id = uuid.uuid4()
    metadata = {"host": "a", "nested": {"list": [1, 2.5, None, True], "text": "é😀"}}
    s = sample(event_id=event_id, metadata=metadata)
    assert await db.record_metric(s) == event_id
    assert await db.get_metrics("web-api") == [
        MetricRecord(
            id=event_id,
            service_name="web-api",
            metric_type="cpu",
            metric_value=45.5,
            unit="percent",
            timestamp=T0,
            metadata=metadata,
        )
    ]


async def test_sample_without_event_id_is_stored_under_its_derived_identity(
    db: DatabaseService,
) -> None:
    s = sample(metadata=None)
    identity = await db.record_metric(s)
    assert identity == sample_identity(s) and identity.version == 5
    [row] = await db.get_metrics("web-api")
    assert (row.id, row.metadata) == (identity, None)


async def test_same_sample_in_one_batch_is_stored_once(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    s = sample()
    again = sample()  # equal but not the same object: identity from content
    ids = await db.record_metrics_batch([s, again, s])
    assert ids[0] == ids[1] == ids[2]
    assert await count(engine) == 1
    assert await count(engine, "system_metric_ids") == 1


async def test_same_sample_across_batches_is_stored_once(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    for _ in range(3):
        await db.record_metrics_batch([sample(), sample(metric_value=1.0)])
    assert await count(engine) == 2
    # The same instant written in another offset is the same sample.
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    await db.record_metric(sample(timestamp=plus2))
    assert await count(engine) == 2


async def test_same_event_id_is_stored_once_whatever_its_content(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    event_id = uuid.uuid4()
    first = sample(event_id=event_id, metric_value=1.0)
    # Same identity, other content and another month: still the same sample.
    later = sample(event_id=event_id, metric_value=2.0, timestamp=T0 - timedelta(days=62))
    await db.record_metrics_batch([first, later])
    await db.record_metrics_batch([later])
    await db.record_metric(first)
    rows = await db.get_metrics("web-api")
    assert [(r.id, r.metric_value, r.timestamp) for r in rows] == [(event_id, 1.0, T0)]
    assert await count(engine, "system_metric_ids") == 1


async def test_messages_duplicates_inside_one_apply(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    a, b = sample(metric_value=1.0), sample(metric_value=2.0)
    outcome = await db.apply_metric_messages(
        [samples_message((a, b), T0), samples_message((b, a, a), T0), samples_message((a,), T0)]
    )
    assert outcome.failures == {}
    assert outcome.cache_keys == frozenset({"metrics:web-api:cpu:recent"})
    assert await count(engine) == 2
    # A redelivery writes nothing but still names its keys (invalidation is at least once).
    again = await db.apply_metric_messages([samples_message((a,), T0)])
    assert again.cache_keys == frozenset({"metrics:web-api:cpu:recent"})
    assert await count(engine) == 2


async def test_sample_without_timestamp_uses_the_publish_time(db: DatabaseService) -> None:
    published = datetime(2026, 10, 3, 4, 5, 6, 789000, tzinfo=UTC)
    s = sample(timestamp=None, service_name="svc")
    await db.apply_metric_messages([samples_message((s,), published)])
    [row] = await db.get_metrics("svc")
    assert row.timestamp == published

    # The same sample published again is the same sample: stored once, first time kept.
    await db.apply_metric_messages([samples_message((s,), published + timedelta(minutes=1))])
    assert [r.timestamp for r in await db.get_metrics("svc")] == [published]


async def test_record_metric_without_timestamp_is_stamped_now(db: DatabaseService) -> None:
    before = datetime.now(UTC)
    await db.record_metric(sample(timestamp=None, service_name="now"))
    after = datetime.now(UTC)
    [row] = await db.get_metrics("now")
    assert before <= row.timestamp <= after


async def test_mixed_batch_with_and_without_timestamps(db: DatabaseService) -> None:
    published = at(30)
    message = samples_message(
        (sample(timestamp=at(1), metric_value=1.0), sample(timestamp=None, metric_value=2.0)),
        published,
    )
    await db.apply_metric_messages([message])
    rows = await db.get_metrics("web-api")
    assert [(r.metric_value, r.timestamp) for r in rows] == [(2.0, published), (1.0, at(1))]


async def test_get_metrics_range_filters_order_and_limit(db: DatabaseService) -> None:
    samples = [
        sample(timestamp=at(m), metric_value=float(m), metric_type=t)
        for m, t in ((0, "cpu"), (10, "mem"), (20, "cpu"), (30, "cpu"), (40, "mem"))
    ]
    await db.record_metrics_batch([*samples, sample(service_name="other", timestamp=at(20))])

    def values(rows: list[MetricRecord]) -> list[float]:
        return [r.metric_value for r in rows]

    assert values(await db.get_metrics("web-api")) == [40.0, 30.0, 20.0, 10.0, 0.0]
    assert values(await db.get_metrics("web-api", metric_type="cpu")) == [30.0, 20.0, 0.0]
    # [start, end): start included, end excluded.
    assert values(await db.get_metrics("web-api", start=at(10), end=at(30))) == [20.0, 10.0]
    assert values(await db.get_metrics("web-api", start=at(40))) == [40.0]
    assert values(await db.get_metrics("web-api", end=at(0))) == []
    assert values(await db.get_metrics("web-api", "mem", start=at(0), end=at(41))) == [40.0, 10.0]
    assert values(await db.get_metrics("web-api", limit=2)) == [40.0, 30.0]
    assert [r.service_name for r in await db.get_metrics("other")] == ["other"]
    assert await db.get_metrics("nobody") == []
    for bad in (0, 10_001):
        with pytest.raises(ValidationError, match="limit"):
            await db.get_metrics("web-api", limit=bad)


async def test_aggregate_by_hour(db: DatabaseService) -> None:
    hour = datetime(2026, 11, 21, 10, tzinfo=UTC)
    points = [
        (hour + timedelta(minutes=0), 10.0),
        (hour + timedelta(minutes=30), 20.0),
        (hour + timedelta(minutes=59, seconds=59), 60.0),
        (hour + timedelta(hours=1), 5.0),
        (hour + timedelta(hours=3, minutes=1), -1.5),
        (hour + timedelta(hours=3, minutes=2), 1.5),
    ]
    await db.record_metrics_batch(
        [sample(timestamp=t, metric_value=v) for t, v in points]
        + [sample(timestamp=hour, metric_value=999.0, metric_type="mem")]
    )
    result = await db.aggregate_metrics("web-api", "cpu", "hour")
    assert result == [
        MetricAggregate(bucket=hour, interval="hour", avg=30.0, min=10.0, max=60.0, count=3),
        MetricAggregate(
            bucket=hour + timedelta(hours=1), interval="hour", avg=5.0, min=5.0, max=5.0, count=1
        ),
        MetricAggregate(
            bucket=hour + timedelta(hours=3), interval="hour", avg=0.0, min=-1.5, max=1.5, count=2
        ),
    ]
    bounded = await db.aggregate_metrics(
        "web-api", "cpu", "hour", start=hour + timedelta(minutes=30), end=hour + timedelta(hours=1)
    )
    assert [(a.bucket, a.count, a.avg) for a in bounded] == [(hour, 2, 40.0)]


async def test_aggregate_by_day_in_utc(db: DatabaseService) -> None:
    day = datetime(2026, 11, 20, tzinfo=UTC)
    minus5 = timezone(timedelta(hours=-5))
    points = [
        (day + timedelta(hours=1), 1.0),
        (day + timedelta(hours=23, minutes=59), 3.0),
        # 21:00 on the 20th at -05:00 is 02:00 on the 21st in UTC.
        (datetime(2026, 11, 20, 21, tzinfo=minus5), 8.0),
    ]
    await db.record_metrics_batch([sample(timestamp=t, metric_value=v) for t, v in points])
    result = await db.aggregate_metrics("web-api", "cpu", "day")
    assert [(a.bucket, a.interval, a.avg, a.min, a.max, a.count) for a in result] == [
        (day, "day", 2.0, 1.0, 3.0, 2),
        (day + timedelta(days=1), "day", 8.0, 8.0, 8.0, 1),
    ]
    assert await db.aggregate_metrics("web-api", "nothing", "day") == []


async def test_aggregate_refuses_other_intervals(db: DatabaseService) -> None:
    with pytest.raises(ValidationError, match="interval"):
        await db.aggregate_metrics("web-api", "cpu", "week")  # type: ignore[arg-type]


async def test_large_batch_is_stored_in_one_go(db: DatabaseService, engine: AsyncEngine) -> None:
    samples = [sample(metric_value=float(n), timestamp=at(n)) for n in range(1000)]
    ids = await db.record_metrics_batch(samples)
    assert len(set(ids)) == 1000
    assert await count(engine) == 1000
    rows = await db.get_metrics("web-api", start=at(500), end=at(502))
    assert [r.metric_value for r in rows] == [501.0, 500.0]


# -- errors ------------------------------------------------------------------------------


def other_url(database_url: str, **parts: Any) -> str:
    return make_url(database_url).set(**parts).render_as_string(hide_password=False)


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param({"port": 1}, id="nothing-listening"),
        pytest.param({"database": "utxoiq_test_does_not_exist"}, id="no-such-database"),
        pytest.param({"username": "utxoiq_no_such_role"}, id="no-such-role"),
    ],
)
async def test_unreachable_database_is_a_transient_connection_error(
    settings: Settings, parts: dict[str, Any]
) -> None:
    broken = dataclasses.replace(settings, database_url=other_url(settings.database_url, **parts))
    engine = create_engine(broken)
    db = DatabaseService(engine, None)
    try:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: db.get_feedback_stats("i"),
            lambda: db.list_backfill_jobs(),
            lambda: db.get_metrics("web-api"),
            lambda: db.record_metric(sample()),
            lambda: db.apply_metric_messages([samples_message((sample(),), T0)]),
            lambda: db.apply_backfill_events([]),
        ]
        for call in calls:
            with pytest.raises(DatabaseUnavailableError) as caught:
                await call()
            assert caught.value.transient is True
    finally:
        await engine.dispose()


async def test_value_refused_by_the_database_is_permanent(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    # A payload model guards the wire; a model built around it reaches the database.
    bad = MetricSample.model_construct(
        event_id=None,
        service_name="x" * 101,  # varchar(100)
        metric_type="cpu",
        metric_value=1.0,
        unit="u",
        timestamp=T0,
        metadata=None,
    )
    with pytest.raises(ValidationError) as caught:
        await db.record_metric(bad)
    assert caught.value.transient is False
    assert caught.value.reason == "schema_violation"
    # All or nothing: the good samples of a refused batch are not stored either.
    with pytest.raises(ValidationError):
        await db.record_metrics_batch([sample(metric_value=1.0), bad, sample(metric_value=2.0)])
    assert await count(engine) == 0
    assert await count(engine, "system_metric_ids") == 0
