"""Redis unavailable for part of a run: ingestion goes on, reads answer from the
database, and once Redis is back and the worker idle, no key is stale.

Two outages: a paused Redis (``CLIENT PAUSE ... ALL``: unresponsive, keeps its data,
so keys filled before the outage are still there and must be invalidated after it),
and a stopped one (``shutdown nosave``, then the local stack's start command).
Whatever happens, Redis is answering again when a test ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from schemas.cache_keys import job_cache_key, recent_cache_key, stats_cache_key
from tests.support.cache import (
    RedisDb,
    check_invariant,
    database_value,
    own_redis_db,
    pause_redis,
    redis_answers,
    start_redis,
    stop_redis,
    wait_idle,
)
from tests.support.emulator import Counters, publish, running_worker
from tests.support.factories import T0
from tests.support.topics import RUN_TOPICS
from worker.config import Settings
from worker.pubsub.client import PubSub
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.sources.pull_worker import PullWorker
from worker.storage.cache import version_key

pytestmark = pytest.mark.slow

INSIGHTS = ("insight-a", "insight-b")
SERIES = ("web-api", "cpu")
PAUSE_MS = 5000


@pytest_asyncio.fixture(loop_scope="session")
async def rdb(pubsub_settings: Settings) -> AsyncIterator[RedisDb]:
    async with own_redis_db(pubsub_settings) as claimed:
        yield claimed


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Scenario:
    """Two insights, a job and a series; a first round of events, then a second that
    changes every one of them."""

    def __init__(self) -> None:
        self.job_id = uuid.uuid4()
        self.now = datetime.now(UTC).replace(microsecond=0)

    def round(self, n: int) -> dict[str, list[dict[str, Any]]]:
        moment = T0 + timedelta(minutes=n)
        return {
            "feedback": [
                {"insight_id": i, "user_id": "u", "rating": n, "occurred_at": iso(moment)}
                for i in INSIGHTS
            ],
            "backfill-progress": [
                {
                    "job_id": str(self.job_id),
                    "job_type": "blocks",
                    "start_block": 0,
                    "end_block": 100,
                    "current_block": 10 * n,
                    "status": "running",
                    "occurred_at": iso(moment),
                }
            ],
            "metrics": [
                {
                    "event_id": str(uuid.uuid4()),
                    "service_name": SERIES[0],
                    "metric_type": SERIES[1],
                    "metric_value": float(n),
                    "unit": "percent",
                    "timestamp": iso(self.now - timedelta(minutes=10 - n)),
                }
            ],
        }

    def cache_keys(self) -> list[str]:
        return [
            *(stats_cache_key(i) for i in INSIGHTS),
            job_cache_key(self.job_id),
            recent_cache_key(*SERIES),
        ]


async def publish_round(pubsub: PubSub, events: dict[str, list[dict[str, Any]]]) -> None:
    for topic, payloads in events.items():
        await publish(pubsub, topic, payloads)


async def read_all(reads: CacheService, scenario: Scenario) -> dict[str, Any]:
    """Every entity through the read path, as JSON values keyed by cache key."""
    values: dict[str, Any] = {}
    for insight in INSIGHTS:
        stats = await reads.get_feedback_stats(insight)
        values[stats_cache_key(insight)] = stats.model_dump(mode="json")
    job = await reads.get_backfill_job(scenario.job_id)
    values[job_cache_key(scenario.job_id)] = job.model_dump(mode="json")
    points = await reads.recent_metrics(*SERIES)
    values[recent_cache_key(*SERIES)] = [p.model_dump(mode="json") for p in points]
    return values


async def read_database(db: DatabaseService, scenario: Scenario) -> dict[str, Any]:
    return {key: await database_value(db, key) for key in scenario.cache_keys()}


async def warm_up(
    rdb: RedisDb,
    pubsub: PubSub,
    db: DatabaseService,
    reads: CacheService,
    worker: PullWorker,
    counters: Counters,
    scenario: Scenario,
) -> dict[str, Any]:
    """Round 1 ingested and idle, every key filled from it."""
    await publish_round(pubsub, scenario.round(1))
    await counters.wait_settled({"feedback": 2, "backfill-progress": 1, "metrics": 1})
    await wait_idle(worker, counters, quiet_s=0.5)
    before = await read_all(reads, scenario)
    assert before == await read_database(db, scenario)
    cached = await rdb.redis.mget(scenario.cache_keys())
    assert all(value is not None for value in cached), "the reads filled every key"
    return before


async def test_paused_redis_stops_neither_ingestion_nor_reads_and_leaves_nothing_stale(
    rdb: RedisDb, pubsub: PubSub, db: DatabaseService
) -> None:
    scenario = Scenario()
    counters = Counters()
    cache = rdb.cache()
    reads = CacheService(cache, db)
    try:
        async with running_worker(
            rdb.settings, topics=RUN_TOPICS, telemetry=counters.telemetry
        ) as worker:
            before = await warm_up(rdb, pubsub, db, reads, worker, counters, scenario)

            await pause_redis(PAUSE_MS)
            paused_at = time.monotonic()
            try:
                await publish_round(pubsub, scenario.round(2))
                await counters.wait_settled(
                    {"feedback": 4, "backfill-progress": 2, "metrics": 2}, timeout_s=20
                )
                committed_after_s = time.monotonic() - paused_at
                now = await read_database(db, scenario)
                assert now != before and all(now[k] != before[k] for k in now)
                # Reads answer, from the database, while Redis answers nobody.
                read_started = time.monotonic()
                during = await read_all(reads, scenario)
                read_s = time.monotonic() - read_started
                still_paused = time.monotonic() - paused_at < PAUSE_MS / 1000
            finally:
                assert await redis_answers(timeout_s=PAUSE_MS / 1000 + 10)
            assert still_paused, "the reads ran after the pause ended: the test proved nothing"
            assert committed_after_s < PAUSE_MS / 1000, "ingestion waited for Redis"
            assert during == now, "reads during the outage must come from the database"
            assert read_s < 3, f"reads took {read_s:.1f}s with Redis paused"

            totals = await wait_idle(worker, counters, quiet_s=1.0)
            report = await check_invariant(rdb.redis, db)
            # The held invalidations were applied: the pre-outage values are gone.
            assert await rdb.redis.exists(*scenario.cache_keys()) == 0
            after = await read_all(reads, scenario)
            assert after == now
            refilled = await check_invariant(rdb.redis, db)
    finally:
        await cache.close()

    assert not report.stale, report.stale
    assert not refilled.stale, refilled.stale
    assert refilled.total == len(scenario.cache_keys())
    # Held, not nacked: a nack counts a delivery attempt towards the dead letter.
    assert totals["nacked"].get("cache-invalidation", 0) == 0, totals
    assert totals["dead_lettered"] == {}, totals


async def test_stopped_redis_stops_neither_ingestion_nor_reads_and_leaves_nothing_stale(
    rdb: RedisDb, pubsub: PubSub, db: DatabaseService
) -> None:
    scenario = Scenario()
    counters = Counters()
    cache = rdb.cache()
    reads = CacheService(cache, db)
    try:
        async with running_worker(
            rdb.settings, topics=RUN_TOPICS, telemetry=counters.telemetry
        ) as worker:
            await warm_up(rdb, pubsub, db, reads, worker, counters, scenario)
            committed_before = counters.totals()["committed"]["cache-invalidation"]

            await stop_redis()
            try:
                await publish_round(pubsub, scenario.round(2))
                await counters.wait_settled(
                    {"feedback": 4, "backfill-progress": 2, "metrics": 2}, timeout_s=20
                )
                now = await read_database(db, scenario)
                read_started = time.monotonic()
                during = [await read_all(reads, scenario) for _ in range(3)]
                read_s = time.monotonic() - read_started
                still_down = not await redis_answers(timeout_s=0)
            finally:
                await start_redis()
                # The inspector's pooled connections died with the server.
                await rdb.redis.connection_pool.disconnect()
            assert still_down
            assert during == [now] * 3, "reads during the outage must come from the database"
            assert read_s < 3, f"reads took {read_s:.1f}s with Redis down"

            totals = await wait_idle(worker, counters, quiet_s=1.0)
            # The updater held round 2's invalidations and applied them once Redis was
            # back: their fresh version tokens exist (the restart lost everything else).
            assert totals["committed"]["cache-invalidation"] > committed_before
            tokens = await rdb.redis.mget([version_key(k) for k in scenario.cache_keys()])
            assert all(token is not None for token in tokens), tokens
            after = await read_all(reads, scenario)
            assert after == now
            report = await check_invariant(rdb.redis, db)
    finally:
        await cache.close()

    assert not report.stale, report.stale
    assert report.total == len(scenario.cache_keys())
    assert totals["nacked"].get("cache-invalidation", 0) == 0, totals
    assert totals["dead_lettered"] == {}, totals
