"""Scenario ``store``: the batch writes of the data service layer.

- metrics: rows/s of the metrics batch write (identity dedup + partitioned insert)
  against asyncpg ``copy_records_to_table`` of the same rows into the same table;
- feedback: rows/s of the feedback batch upsert against the naive path, SQLAlchemy
  ORM with one commit per row.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import registry

from bench.common import asyncpg_dsn, fresh_database, median_rate, report
from handlers.metric_identity import sample_identity
from handlers.metric_partitions import create_partitions
from handlers.metrics import METRIC_COLUMNS, samples_message
from schemas.feedback import FeedbackEvent
from schemas.metrics import MetricSample
from worker.read.service import DatabaseService
from worker.storage.database import create_engine
from worker.storage.tables import insight_feedback

METRIC_ROWS = 100_000
FEEDBACK_ROWS = 50_000
NAIVE_ROWS = 2_000
BATCH = 1_000
ROUNDS = 3


class NaiveFeedback:
    """The naive worker's model: one ORM object, one commit, per event."""

    def __init__(self, **values: object) -> None:
        for name, value in values.items():
            setattr(self, name, value)


registry().map_imperatively(NaiveFeedback, insight_feedback)


def _samples(now: datetime) -> list[MetricSample]:
    rng = random.Random(7)
    return [
        MetricSample(
            event_id=uuid.UUID(int=rng.getrandbits(128)),
            service_name=f"service-{i % 20}",
            metric_type=("cpu", "memory", "latency", "rps")[i % 4],
            metric_value=rng.random() * 100,
            unit="percent",
            timestamp=now - timedelta(seconds=i),
            metadata={"host": f"host-{i % 8}"},
        )
        for i in range(METRIC_ROWS)
    ]


def _feedback(now: datetime) -> list[FeedbackEvent]:
    rng = random.Random(11)
    return [
        FeedbackEvent(
            insight_id=f"insight_{i % 5000}",
            user_id=f"user_{i // 5000}_{rng.randrange(1000)}",
            rating=rng.randint(1, 5),
            comment="useful" if i % 3 else None,
            occurred_at=now - timedelta(seconds=rng.randrange(86_400)),
        )
        for i in range(FEEDBACK_ROWS)
    ]


async def run() -> None:
    settings = await fresh_database("utxoiq_bench_store")
    engine = create_engine(settings)
    db = DatabaseService(engine, None)
    raw = await asyncpg.connect(asyncpg_dsn(settings))
    now = datetime.now(UTC)
    try:
        samples = _samples(now)
        messages = [
            samples_message(tuple(samples[i : i + BATCH]), now)
            for i in range(0, len(samples), BATCH)
        ]
        records = [
            (
                sample_identity(s),
                s.service_name,
                s.metric_type,
                s.metric_value,
                s.unit,
                s.timestamp,
                json.dumps(s.metadata),
            )
            for s in samples
        ]
        columns = list(METRIC_COLUMNS)

        async def truncate_metrics() -> None:
            await raw.execute("TRUNCATE system_metrics, system_metric_ids")

        async def copy() -> None:
            for i in range(0, len(records), BATCH):
                await raw.copy_records_to_table(
                    "system_metrics", records=records[i : i + BATCH], columns=columns
                )

        async def batch_write() -> None:
            for message in messages:
                await db.apply_metric_messages([message])

        await create_partitions(engine, [s.timestamp for s in samples if s.timestamp])
        copy_rate = await median_rate(ROUNDS, len(records), truncate_metrics, copy)
        write_rate = await median_rate(ROUNDS, len(records), truncate_metrics, batch_write)
        report("store", "metrics_rows_per_s", write_rate, "copy_records_to_table", copy_rate)

        events = _feedback(now)
        batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]

        async def truncate_feedback() -> None:
            await raw.execute("TRUNCATE insight_feedback")

        async def upsert() -> None:
            for batch in batches:
                await db.apply_feedback_events(batch)

        sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)

        async def naive() -> None:
            for i, e in enumerate(events[:NAIVE_ROWS]):
                async with sessions() as session:
                    session.add(
                        NaiveFeedback(
                            insight_id=f"naive_{i}",
                            user_id=e.user_id,
                            rating=e.rating,
                            comment=e.comment,
                            created_at=e.occurred_at,
                            updated_at=e.occurred_at,
                            event_key=b"",
                        )
                    )
                    await session.commit()

        naive_rate = await median_rate(ROUNDS, NAIVE_ROWS, truncate_feedback, naive)
        upsert_rate = await median_rate(ROUNDS, len(events), truncate_feedback, upsert)
        report("store", "feedback_rows_per_s", upsert_rate, "naive_orm_commit_per_row", naive_rate)
    finally:
        await raw.close()
        await engine.dispose()
