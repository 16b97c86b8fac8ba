"""Faults under a running worker: PostgreSQL stopped and restarted mid-run, and flow
control holding memory bounded while a backlog drains."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import admin_dsn
from tests.support.emulator import (
    Counters,
    drain_dead_letters,
    publish,
    running_worker,
    wait_for,
    wait_for_count,
)
from tests.support.factories import T0, at, backfill_payload, feedback_payload, metric_payload
from tests.support.topics import INGEST_TOPICS
from worker.config import Settings
from worker.pubsub.client import PubSub
from worker.sources.settings import PullSettings


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cluster_version() -> str:
    """The local cluster's major version (the highest installed, as with-stack.sh does)."""
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.fail(
            "this test stops and restarts the local PostgreSQL with pg_ctlcluster, "
            "which is not installed here",
            pytrace=False,
        )
    return sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]


async def pg_ctl(action: str, *options: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "pg_ctlcluster",
        "--skip-systemctl-redirect",
        cluster_version(),
        "main",
        action,
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"pg_ctlcluster {action}: {out!r} {err!r}"


async def postgres_answers() -> bool:
    try:
        conn = await asyncpg.connect(admin_dsn(), timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def feedback_event(insight: str, minutes: float, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"insight_id": insight, "user_id": "u", "comment": None}
    return feedback_payload(**{**base, "occurred_at": iso(at(minutes)), **fields})


def job_event(job_id: uuid.UUID, minutes: float, **fields: Any) -> dict[str, Any]:
    return backfill_payload(
        job_id=str(job_id),
        start_block=0,
        end_block=1000,
        occurred_at=iso(at(minutes)),
        **fields,
    )


def sample(i: int) -> dict[str, Any]:
    return metric_payload(
        event_id=str(uuid.uuid4()),
        metric_value=float(i),
        timestamp=iso(T0 + timedelta(seconds=i)),
    )


async def table(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(sql))]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_database_restart_mid_run_loses_nothing_and_applies_nothing_twice(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    job, late_job = uuid.uuid4(), uuid.uuid4()
    first_samples = [sample(i) for i in range(50)]
    second_samples = [sample(100 + i) for i in range(50)]
    first = {
        "feedback": [feedback_event(f"i{k}", 0, rating=1) for k in range(20)],
        "metrics": first_samples,
        "backfill-progress": [job_event(job, 0, current_block=100)],
    }
    second = {
        "feedback": (
            [feedback_event(f"i{k}", 5, rating=5, comment="second") for k in range(20)] * 2
            + [feedback_event(f"i{k}", -1, rating=2) for k in range(10)]  # older: loses
            + [feedback_event(f"n{k}", 1, rating=3) for k in range(10)]
        ),
        "metrics": second_samples * 2 + first_samples[:20],
        "backfill-progress": [
            job_event(job, 5, current_block=500),
            job_event(job, 6, current_block=700, status="paused", error_message="later"),
            job_event(job, 5, current_block=500),
            job_event(late_job, 1, current_block=1000, status="completed"),
        ],
    }
    totals_first = {topic: len(messages) for topic, messages in first.items()}
    totals_all = {topic: totals_first[topic] + len(second[topic]) for topic in INGEST_TOPICS}

    counters = Counters()
    async with running_worker(pubsub_settings, telemetry=counters.telemetry) as worker:
        for topic, messages in first.items():
            await publish(pubsub, topic, messages)
        await counters.wait_settled(totals_first)

        await pg_ctl("stop", "-m", "fast")
        try:
            assert not await postgres_answers()
            for topic, messages in second.items():
                await publish(pubsub, topic, messages)
            # Every topic tries, fails, and nacks; nothing is acked or dead-lettered.
            await wait_for(
                counters.read,
                lambda t: all(t["nacked"].get(topic, 0) > 0 for topic in INGEST_TOPICS),
                timeout_s=20,
                what="a nack on every topic",
            )
            await asyncio.sleep(2)  # and keeps failing: still nothing committed
            during = counters.totals()
            assert during["committed"] == totals_first, during
            assert during["dead_lettered"] == {}, during
            assert worker.runtime.pipelines_running(), "a pipeline died"
        finally:
            await pg_ctl("start")
            await wait_for(postgres_answers, bool, timeout_s=30, what="PostgreSQL back up")

        # Redelivery after a nack waits for the retry policy's 10 s minimum backoff.
        totals = await counters.wait_settled(totals_all, timeout_s=90)
        feedback_rows = await table(
            engine,
            "SELECT insight_id, rating, comment, created_at, updated_at FROM insight_feedback"
            " ORDER BY insight_id",
        )
        metric_rows = await table(engine, "SELECT id, metric_value FROM system_metrics")
        metric_ids = await table(engine, "SELECT count(*) FROM system_metric_ids")
        jobs = await table(
            engine,
            "SELECT id, current_block, status, error_message, progress_percentage, started_at,"
            " completed_at FROM backfill_jobs",
        )
        assert worker.runtime.pipelines_running(), "a pipeline died"
        letters = await asyncio.gather(*(drain_dead_letters(pubsub, t) for t in INGEST_TOPICS))

    assert totals["committed"] == totals_all, totals
    assert totals["dead_lettered"] == {}, totals
    assert letters == [[], [], []]
    assert feedback_rows == sorted(
        [(f"i{k}", 5, "second", at(-1) if k < 10 else at(0), at(5)) for k in range(20)]
        + [(f"n{k}", 3, None, at(1), at(1)) for k in range(10)]
    )
    expected_metrics = {
        (uuid.UUID(s["event_id"]), s["metric_value"]) for s in first_samples + second_samples
    }
    assert len(metric_rows) == 100
    assert set(metric_rows) == expected_metrics
    assert metric_ids == [(100,)]
    assert sorted(jobs) == sorted(
        [
            (job, 700, "paused", "later", Decimal("70.00"), at(0), None),
            (late_job, 1000, "completed", None, Decimal("100.00"), at(1), at(1)),
        ]
    )


async def test_flow_control_bounds_what_is_held_while_a_backlog_drains(
    pubsub_settings: Settings, pubsub: PubSub, engine: AsyncEngine
) -> None:
    limit = 50
    count = 2000
    await publish(pubsub, "metrics", [sample(i) for i in range(count)])
    pull = PullSettings(max_outstanding_messages=limit)
    async with running_worker(pubsub_settings, topics=("metrics",), pull=pull) as worker:
        (source,) = worker.sources
        peak = 0
        done = asyncio.Event()

        async def sample_outstanding() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, source.outstanding)
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample_outstanding())
        started = time.monotonic()
        try:
            await wait_for_count(engine, "SELECT count(*) FROM system_metrics", count, timeout_s=60)
        finally:
            done.set()
            await sampler
        elapsed = time.monotonic() - started

    assert await wait_for_count(engine, "SELECT count(*) FROM system_metric_ids", count) == count
    # Flow control was exercised (the limit was reached), and never exceeded.
    assert peak >= limit // 2, peak
    assert peak <= limit, f"{peak} messages held at once, limit {limit}"
    assert elapsed < 60
