"""``utxoiq-worker demo``: the data service layer on sample data, printed."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.service import DatabaseService
from schemas.feedback import FeedbackEvent
from schemas.metrics import MetricSample
from worker.config import Settings
from worker.db import create_engine
from worker.exceptions import NotFoundError
from worker.migrate import upgrade


def _show(title: str, value: Any) -> None:
    print(f"\n== {title}")
    if isinstance(value, list):
        for item in value:
            print("  " + json.dumps(item.model_dump(mode="json"), ensure_ascii=False))
    else:
        print("  " + json.dumps(value.model_dump(mode="json"), ensure_ascii=False))


async def run_demo(settings: Settings) -> int:
    await upgrade(settings)
    engine = create_engine(settings)
    db = DatabaseService(engine)
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        job = await db.create_backfill_job(
            job_type="blocks", start_block=800_000, end_block=810_000, created_by="demo"
        )
        await db.update_backfill_progress(job.job_id, 805_000)
        await db.update_backfill_progress(job.job_id, 803_000)  # older progress never rewinds
        _show(
            "backfill job after progress 805000 then 803000", await db.get_backfill_job(job.job_id)
        )
        _show("backfill job completed", await db.complete_backfill_job(job.job_id))

        insight = f"insight_demo_{uuid.uuid4().hex[:8]}"
        events = [
            FeedbackEvent(
                insight_id=insight,
                user_id="user_1",
                rating=5,
                comment="Great insight!",
                occurred_at=now,
            ),
            # Arrives later but happened earlier: last writer by event time keeps rating 5.
            FeedbackEvent(
                insight_id=insight,
                user_id="user_1",
                rating=1,
                occurred_at=now - timedelta(minutes=5),
            ),
            FeedbackEvent(
                insight_id=insight,
                user_id="user_2",
                rating=3,
                flag_type="misleading",
                flag_reason="numbers look off",
                occurred_at=now,
            ),
        ]
        for event in events:
            await db.create_feedback(event)
        _show("feedback rows", await db.list_feedback(insight_id=insight))
        _show("feedback stats", await db.get_feedback_stats(insight))

        service = f"demo-{uuid.uuid4().hex[:6]}"
        samples = [
            MetricSample(
                service_name=service,
                metric_type="cpu",
                metric_value=40.0 + i,
                unit="percent",
                timestamp=now - timedelta(minutes=20 * i),
                metadata={"host": "a"},
            )
            for i in range(6)
        ]
        await db.record_metrics_batch(samples)
        await db.record_metrics_batch(samples)  # the same samples again: stored once
        _show("metrics (recorded twice, stored once)", await db.get_metrics(service, "cpu"))
        _show("metrics per hour", await db.aggregate_metrics(service, "cpu", "hour"))
        try:
            await db.get_backfill_job(uuid.uuid4())
        except NotFoundError as error:
            print(f"\n== unknown job -> {type(error).__name__}: {error}")
    finally:
        await engine.dispose()
    return 0
