"""CONTRACT.md's cache invariant under a running worker: once the worker is idle,
every key present in Redis equals what the database gives for it now.

A randomized run per seed: writers publish feedback, backfill and metrics events
(duplicates, any order) while readers hammer ``CacheService`` for the same insights,
jobs and series; a jittered database read widens the window between a reader's miss
and its fill, the window the version tokens close. The same run with readers that
fill with a plain ``Cache.set`` (``UnguardedCache``) left stale keys behind in 6 of 7
seeds when measured; the constructed interleaving at the end shows it every time, and
that the check catches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from schemas.backfill import BackfillJobResponse
from schemas.cache_keys import job_cache_key, recent_cache_key, stats_cache_key
from schemas.feedback import FeedbackStats
from schemas.metrics import MetricPoint
from tests.support.cache import (
    InvariantReport,
    RedisDb,
    check_invariant,
    own_redis_db,
    wait_idle,
    wait_until,
)
from tests.support.emulator import Counters, publish, running_worker
from tests.support.factories import T0
from tests.support.topics import INGEST_TOPICS, RUN_TOPICS
from worker.config import Settings
from worker.exceptions import NotFoundError
from worker.pubsub.client import PubSub
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.storage.cache import Cache, create_redis, multiplexed_reads, version_key

pytestmark = pytest.mark.slow

INSIGHTS = [f"insight-{i}" for i in range(4)]
USERS = [f"user-{i}" for i in range(6)]
SERIES = [("web-api", "cpu"), ("web-api", "memory"), ("db", "cpu")]
JOB_START, JOB_END = 1000, 2000
READERS = 10


@pytest_asyncio.fixture(loop_scope="session")
async def rdb(pubsub_settings: Settings) -> AsyncIterator[RedisDb]:
    async with own_redis_db(pubsub_settings) as claimed:
        yield claimed


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- the workload ------------------------------------------------------------------------


@dataclass
class Workload:
    """Messages to publish, in publishing order, and what the database must end with."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    jobs: list[uuid.UUID] = field(default_factory=list)
    feedback_winner: dict[tuple[str, str], int | None] = field(default_factory=dict)
    max_block: dict[uuid.UUID, int] = field(default_factory=dict)
    samples: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def per_topic(self) -> dict[str, int]:
        counts = dict.fromkeys(INGEST_TOPICS, 0)
        for topic, _ in self.messages:
            counts[topic] += 1
        return counts


def workload(seed: int, now: datetime) -> Workload:
    rng = random.Random(seed)
    work = Workload(jobs=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(3)])
    originals: list[tuple[str, dict[str, Any]]] = []

    # Feedback: distinct event times per pair, so the winner is the latest event.
    minutes = rng.sample(range(100_000), 160)
    latest: dict[tuple[str, str], tuple[int, int | None]] = {}
    for minute in minutes:
        insight, user = rng.choice(INSIGHTS), rng.choice(USERS)
        rating = rng.choice([1, 2, 3, 4, 5, None])
        event: dict[str, Any] = {
            "insight_id": insight,
            "user_id": user,
            "rating": rating,
            "comment": rng.choice([None, "", "useful", "wrong"]) if rating else "a comment",
            "occurred_at": iso(T0 + timedelta(minutes=minute)),
        }
        if rng.random() < 0.2:
            event["flag_type"] = rng.choice(["inaccurate", "misleading", "spam", "other"])
            event["flag_reason"] = "seen elsewhere"
        originals.append(("feedback", event))
        if minute > latest.get((insight, user), (-1, None))[0]:
            latest[(insight, user)] = (minute, rating)
    work.feedback_winner = {pair: rating for pair, (_, rating) in latest.items()}

    # Backfill: progress in any order; one job completes, one fails, one keeps running.
    for index, job in enumerate(work.jobs):
        times = rng.sample(range(10_000), 25)
        for n, minute in enumerate(sorted(times)):
            block = rng.randint(JOB_START, JOB_END - 1)
            status = rng.choice(["running", "running", "paused"])
            event = {
                "job_id": str(job),
                "job_type": "blocks",
                "start_block": JOB_START,
                "end_block": JOB_END,
                "current_block": block,
                "status": status,
                "occurred_at": iso(T0 + timedelta(minutes=minute)),
            }
            if n == len(times) - 1 and index == 0:
                event.update(status="completed", current_block=JOB_END)
            if n == len(times) - 1 and index == 1:
                event.update(status="failed", error_message="node went away")
            originals.append(("backfill-progress", event))
            work.max_block[job] = max(work.max_block.get(job, JOB_START), event["current_block"])

    # Metrics: samples of the last day, one per message or several in a batch.
    pending: list[dict[str, Any]] = []
    for _ in range(220):
        service, metric = rng.choice(SERIES)
        sample_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        pending.append(
            {
                "event_id": sample_id,
                "service_name": service,
                "metric_type": metric,
                "metric_value": round(rng.uniform(0, 100), 3),
                "unit": "percent",
                "timestamp": iso(now - timedelta(seconds=rng.randint(0, 86_000))),
                "metadata": {"host": rng.choice("abc")},
            }
        )
        work.samples.setdefault((service, metric), set()).add(sample_id)
    while pending:
        size = rng.choice([1, 1, 3, 10])
        chunk, pending = pending[:size], pending[size:]
        originals.append(("metrics", chunk[0] if size == 1 else {"metrics": chunk}))

    # Duplicates (a quarter again), then any order.
    messages = originals + rng.sample(originals, len(originals) // 4)
    rng.shuffle(messages)
    work.messages = messages
    return work


async def publish_in_waves(pubsub: PubSub, work: Workload, rng: random.Random) -> None:
    """Spread the writes over a couple of seconds, so reads interleave with commits."""
    waves = 15
    size = -(-len(work.messages) // waves)
    for start in range(0, len(work.messages), size):
        wave = work.messages[start : start + size]
        for topic in INGEST_TOPICS:
            payloads = [payload for t, payload in wave if t == topic]
            if payloads:
                await publish(pubsub, topic, payloads)
        await asyncio.sleep(rng.uniform(0.05, 0.25))


# -- readers -----------------------------------------------------------------------------


class JitteryDatabase(DatabaseService):
    """Reads that take a little longer after reading: the fill races the invalidation."""

    def __init__(self, db: DatabaseService, rng: random.Random) -> None:
        super().__init__(db.engine, None)
        self.rng = rng

    async def _pause(self) -> None:
        # Now and then longer than a commit takes to reach Redis as an invalidation.
        slow = self.rng.random() < 0.5
        await asyncio.sleep(self.rng.uniform(0.1, 0.5) if slow else self.rng.uniform(0, 0.005))

    async def get_feedback_stats(self, insight_id: str) -> FeedbackStats:
        stats = await super().get_feedback_stats(insight_id)
        await self._pause()
        return stats

    async def get_backfill_job(self, job_id: uuid.UUID) -> BackfillJobResponse:
        job = await super().get_backfill_job(job_id)
        await self._pause()
        return job

    async def recent_metrics(
        self, service_name: str, metric_type: str, limit: int = 100
    ) -> list[MetricPoint]:
        points = await super().recent_metrics(service_name, metric_type, limit)
        await self._pause()
        return points


@dataclass
class Readers:
    """Reader tasks, stopped by a flag rather than by cancelling: on Python 3.11 a
    cancel that lands as redis-py's ``wait_for`` completes can be swallowed."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[int]] = field(default_factory=list)

    def start(self, reads: CacheService, jobs: list[uuid.UUID], rng: random.Random) -> None:
        self.tasks.append(asyncio.create_task(self._hammer(reads, jobs, rng)))

    async def _hammer(self, reads: CacheService, jobs: list[uuid.UUID], rng: random.Random) -> int:
        """Read random insights, jobs and series until stopped; how many reads."""
        count = 0
        while not self.stop.is_set():
            kind = rng.randrange(3)
            if kind == 0:
                await reads.get_feedback_stats(rng.choice(INSIGHTS))
            elif kind == 1:
                with contextlib.suppress(NotFoundError):  # not ingested yet
                    await reads.get_backfill_job(rng.choice(jobs))
            else:
                await reads.recent_metrics(*rng.choice(SERIES))
            count += 1
        return count

    async def finish(self) -> int:
        """Stop, and the number of reads done; a reader's error is raised here."""
        self.stop.set()
        return sum(await asyncio.wait_for(asyncio.gather(*self.tasks), 30))


async def assert_final_state(db: DatabaseService, work: Workload) -> None:
    """The database holds what the events say (so the run wrote what it meant to)."""
    rows = await db.list_feedback(limit=1000)
    assert {(r.insight_id, r.user_id): r.rating for r in rows} == work.feedback_winner
    for job in work.jobs:
        stored = await db.get_backfill_job(job)
        assert stored.current_block == work.max_block[job]
    assert (await db.get_backfill_job(work.jobs[0])).status == "completed"
    assert (await db.get_backfill_job(work.jobs[1])).error_message == "node went away"
    for (service, metric), ids in work.samples.items():
        records = await db.get_metrics(service, metric, limit=10_000)
        assert {str(r.id) for r in records} == ids


@dataclass
class RunResult:
    work: Workload
    report: InvariantReport
    totals: dict[str, dict[str, int]]
    reads: int
    elapsed_s: float


async def randomized_run(
    rdb: RedisDb, pubsub: PubSub, db: DatabaseService, seed: int, cache_class: type[Cache]
) -> RunResult:
    """Writers and readers at once, then the invariant check once the worker is idle."""
    work = workload(seed, datetime.now(UTC).replace(microsecond=0))
    counters = Counters()
    rng = random.Random(seed)
    # Two API processes (two caches, each with its own connections), half of the readers
    # on each.
    caches = [
        cache_class(create_redis(rdb.settings), reads=multiplexed_reads(rdb.settings))
        for _ in range(2)
    ]
    readers = Readers()
    started = time.monotonic()
    try:
        async with running_worker(
            rdb.settings, topics=RUN_TOPICS, telemetry=counters.telemetry
        ) as worker:
            assert "cache-invalidation" in worker.runtime.pipelines
            for n in range(READERS):
                reader_rng = random.Random(seed * 100 + n)
                reads = CacheService(caches[n % 2], JitteryDatabase(db, reader_rng))
                readers.start(reads, work.jobs, reader_rng)
            await publish_in_waves(pubsub, work, rng)
            await counters.wait_settled(work.per_topic(), timeout_s=60)
            await assert_final_state(db, work)
            # Readers keep going while the updater catches up, and after.
            await wait_idle(worker, counters, quiet_s=1.0)
            reads_done = await readers.finish()
            totals = await wait_idle(worker, counters, quiet_s=0.5)
            report = await check_invariant(rdb.redis, db)
    finally:
        readers.stop.set()
        await asyncio.gather(*readers.tasks, return_exceptions=True)
        for cache in caches:
            await cache.close()
    return RunResult(work, report, totals, reads_done, time.monotonic() - started)


@pytest.mark.parametrize("seed", [11, 23, 42])
async def test_no_stale_key_once_idle(
    rdb: RedisDb, pubsub: PubSub, db: DatabaseService, seed: int
) -> None:
    run = await randomized_run(rdb, pubsub, db, seed, Cache)

    assert run.totals["dead_lettered"] == {}, run.totals
    assert run.totals["committed"].get("cache-invalidation", 0) > 0, run.totals
    assert run.reads > 100, f"only {run.reads} reads in {run.elapsed_s:.1f}s"
    stale = run.report.stale
    assert not stale, f"{len(stale)} stale of {run.report.total} keys (seed {seed}): {stale[:3]}"
    # The readers ran through the idle second: every key was read, and filled, then.
    assert run.report.checked == {
        "feedback": sorted(stats_cache_key(i) for i in INSIGHTS),
        "backfill": sorted(job_cache_key(j) for j in run.work.jobs),
        "metrics": sorted(recent_cache_key(s, m) for s, m in SERIES),
    }


# -- the check can fail: a constructed interleaving ---------------------------------------


class UnguardedCache(Cache):
    """The textbook cache-aside: miss, load, SET. No version check."""

    async def get_or_load(
        self, key: str, ttl_s: int, load: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        value = await self.get(key)
        if value is not None:
            return value
        fresh = await load()
        if fresh is not None:
            await self.set(key, fresh, ttl_s)
        return fresh


class GatedDatabase(DatabaseService):
    """A stats read that, once it has read, waits for the test to let it return."""

    def __init__(self, db: DatabaseService) -> None:
        super().__init__(db.engine, None)
        self.loaded = asyncio.Event()
        self.proceed = asyncio.Event()

    async def get_feedback_stats(self, insight_id: str) -> FeedbackStats:
        stats = await super().get_feedback_stats(insight_id)
        self.loaded.set()
        await self.proceed.wait()
        return stats


@pytest.mark.parametrize(
    ("cache_class", "stale_expected"),
    [(Cache, False), (UnguardedCache, True)],
    ids=["version-guarded", "unguarded-control"],
)
async def test_fill_racing_an_invalidation(
    rdb: RedisDb,
    pubsub: PubSub,
    db: DatabaseService,
    cache_class: type[Cache],
    stale_expected: bool,
) -> None:
    """Reader misses and reads the old stats; the worker commits a newer rating and
    invalidates; then the reader fills. Guarded: nothing stale. Unguarded: stale."""
    insight = "insight-race"
    key = stats_cache_key(insight)
    counters = Counters()
    cache = cache_class(create_redis(rdb.settings), reads=multiplexed_reads(rdb.settings))
    gated = GatedDatabase(db)
    reads = CacheService(cache, gated)
    event = {"insight_id": insight, "user_id": "u", "rating": 1}
    try:
        async with running_worker(
            rdb.settings, topics=RUN_TOPICS, telemetry=counters.telemetry
        ) as worker:
            await publish(pubsub, "feedback", [{**event, "occurred_at": iso(T0)}])
            await counters.wait_settled({"feedback": 1})
            await wait_idle(worker, counters, quiet_s=0.5)

            read = asyncio.create_task(reads.get_feedback_stats(insight))
            await asyncio.wait_for(gated.loaded.wait(), 10)
            token = await rdb.redis.get(version_key(key))

            newer = {**event, "rating": 5, "occurred_at": iso(T0 + timedelta(minutes=1))}
            await publish(pubsub, "feedback", [newer])
            await counters.wait_settled({"feedback": 2})

            async def invalidated() -> bool:
                return await rdb.redis.get(version_key(key)) != token

            await wait_until(invalidated, timeout_s=20, what="the invalidation of the write")
            await wait_idle(worker, counters, quiet_s=0.5)

            gated.proceed.set()
            old = await asyncio.wait_for(read, 10)
            assert old.rating_distribution[1] == 1, "the reader read before the write"
            assert (await db.get_feedback_stats(insight)).rating_distribution[5] == 1
            await wait_idle(worker, counters, quiet_s=0.5)
            report = await check_invariant(rdb.redis, db)
    finally:
        gated.proceed.set()
        await cache.close()

    if stale_expected:
        assert [s.key for s in report.stale] == [key]
        assert report.stale[0].cached["rating_distribution"]["1"] == 1
    else:
        assert report.stale == []
        assert report.checked["feedback"] == []  # the refused fill left no key behind
