"""Scenario ``invalidation``: how long a cached key stays stale after a commit.

A worker process (``utxoiq-worker run``: feedback ingestion and the Redis updater on
``cache-invalidation``) is offered 1k feedback messages a second for 20 s, every
message for an insight of its own. Before anything is published, every insight's key
``feedback:stats:{insight_id}`` is filled through ``CacheService.get_feedback_stats``
(zeros: no feedback yet), so each key exists, and must be invalidated, when its row
commits; each tick checks its keys are still there just before publishing. (The
fills happen up front, not tick by tick: a miss costs the read path over 1 ms of
CPU, so one process cannot fill 1k keys a second and still offer 1k msg/s.)

Two watchers poll every 5 ms, each on its own so a slow answer from one never delays
the other: PostgreSQL (one query for every published insight whose row is not seen
yet) stamps when each row became visible; Redis (one MGET over every published key not
yet fine) stamps when each key was absent or fresh (``total_ratings >= 1``). A stamp
is the time its query was sent (its snapshot is no earlier; its answer may come much
later). lag = key fine - row visible, clamped at 0 (the key cannot be invalidated
before the commit, so a negative difference is polling resolution); p50 and p99. A key
stale for more than 30 s after its commit fails the scenario.

Target (from the issue): p99 <= 500 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from bench.common import asyncpg_dsn, fresh_database, percentile, report
from bench.stack import bench_settings, fresh_topology, start_worker, stop_process
from schemas.cache_keys import stats_cache_key
from worker.exceptions import WorkerError
from worker.pubsub.client import PubSub, PubsubMessage
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.storage.cache import Cache, create_redis, version_key
from worker.storage.database import create_engine

T = TypeVar("T")

SCENARIO = "invalidation"
RATE_PER_S = 1000
DURATION_S = 20
TICK_S = 0.01
PER_TICK = int(RATE_PER_S * TICK_S)
TICKS = int(DURATION_S / TICK_S)
TOTAL = PER_TICK * TICKS
# Publishes may overlap, so one slow call does not lower the offered rate.
TICKS_IN_FLIGHT = 4
# Concurrent fills: no more than the database pool keeps (a burst wider than the pool
# opens overflow connections, closed again when returned to a full pool: fills were
# three times slower), and below REDIS_MAX_CONNECTIONS (past it redis-py raises "Too
# many connections", which the cache takes for an outage: reads bypass it for 1 s).
MAX_FILLS_IN_FLIGHT = 40
POLL_S = 0.005
STALE_LIMIT_S = 30.0
COMMIT_LIMIT_S = 60.0
# Other processes may restart PostgreSQL (fault tests): wait that long for it.
OUTAGE_LIMIT_S = 60.0
_PG_GONE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


@dataclass
class _Progress:
    """Shared by the publisher and the watchers (one event loop, no locks needed)."""

    published_at: dict[str, float] = field(default_factory=dict)
    uncommitted: set[str] = field(default_factory=set)  # published, row not seen yet
    stale: set[str] = field(default_factory=set)  # published, key not seen fine yet
    committed_at: dict[str, float] = field(default_factory=dict)
    fine_at: dict[str, float] = field(default_factory=dict)
    published: int = 0
    outages: int = 0
    offer_done: bool = False
    offer_s: float = 0.0
    pg_rounds: list[float] = field(default_factory=list)  # when each round began
    redis_rounds: list[float] = field(default_factory=list)


async def _first_failure_stops_all(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run concurrently; the first to raise cancels the others, and its error is raised."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _insight_ids(tag: str) -> list[str]:
    return [f"bench-inv-{tag}-{n}" for n in range(TOTAL)]


async def _prefill(
    reads: CacheService, redis: aioredis.Redis, ids: list[str], progress: _Progress
) -> None:
    """Fill the keys and check they are there, riding out database and Redis outages
    (a fill that meets Redis down is skipped by the cache, so it is simply redone)."""
    deadline = time.monotonic() + OUTAGE_LIMIT_S
    missing = ids
    while True:
        results = await asyncio.gather(
            *(reads.get_feedback_stats(i) for i in missing), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not (
                isinstance(result, WorkerError) and result.transient
            ):
                raise result
        with contextlib.suppress(RedisError, OSError):
            async with redis.pipeline(transaction=False) as pipe:
                for i in missing:
                    pipe.exists(stats_cache_key(i))
                present = await pipe.execute()
            missing = [i for i, found in zip(missing, present, strict=True) if not found]
            if not missing:
                return
        progress.outages += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not fill {len(missing)} keys in {OUTAGE_LIMIT_S:.0f}s")
        await asyncio.sleep(0.2)


async def _prefill_all(
    reads: CacheService,
    redis: aioredis.Redis,
    ids: list[str],
    pool_size: int,
    progress: _Progress,
) -> None:
    """Every key filled (zeros) through the read path, before anything is published."""
    step = min(MAX_FILLS_IN_FLIGHT, pool_size)
    for i in range(0, len(ids), step):
        await _prefill(reads, redis, ids[i : i + step], progress)


async def _offer(
    pubsub: PubSub, redis: aioredis.Redis, ids: list[str], progress: _Progress
) -> None:
    """TICKS ticks TICK_S apart, each publishing feedback for PER_TICK filled keys."""
    target = pubsub.topic("feedback")
    limit = asyncio.Semaphore(TICKS_IN_FLIGHT)

    async def tick(number: int) -> None:
        try:
            batch = ids[number * PER_TICK : (number + 1) * PER_TICK]
            # The keys are still there (nothing else touches them): one round trip.
            keys = [stats_cache_key(i) for i in batch]
            present = await _redis_call(lambda: redis.exists(*keys))
            if present != len(batch):
                raise RuntimeError(f"{len(batch) - present} filled keys vanished before publish")
            occurred = datetime.now(UTC).isoformat()
            messages = [
                PubsubMessage(
                    data=json.dumps(
                        {"insight_id": i, "user_id": "bench", "rating": 4, "occurred_at": occurred}
                    ).encode()
                )
                for i in batch
            ]
            stamp = time.monotonic()
            for i in batch:
                progress.published_at[i] = stamp
            progress.uncommitted.update(batch)
            progress.stale.update(batch)
            await pubsub.publish(target, messages)
            progress.published += len(batch)
        finally:
            limit.release()

    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    try:
        for number in range(TICKS):
            delay = start + number * TICK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await limit.acquire()
            tasks.append(asyncio.create_task(tick(number)))
            if number % 100 == 0:
                # Surface a failed tick now rather than after 20 s.
                for task in [t for t in tasks if t.done()]:
                    task.result()
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    progress.offer_s = time.monotonic() - start
    progress.offer_done = True


class _Committed:
    """Which insights have a visible row; rides out PostgreSQL restarts.

    A failed round finds nothing (and reconnects next round) rather than waiting.
    """

    def __init__(self, dsn: str, progress: _Progress) -> None:
        self.dsn = dsn
        self.progress = progress
        self.conn: Any = None
        self.down_since: float | None = None

    async def find(self, ids: list[str]) -> list[str]:
        try:
            if self.conn is None:
                self.conn = await asyncpg.connect(self.dsn, timeout=2)
            rows = await self.conn.fetch(
                "SELECT insight_id FROM insight_feedback WHERE insight_id = ANY($1::text[])",
                ids,
            )
        except _PG_GONE:
            self.progress.outages += 1
            await self.close()
            now = time.monotonic()
            self.down_since = self.down_since or now
            if now - self.down_since > OUTAGE_LIMIT_S:
                raise
            return []
        self.down_since = None
        return [row["insight_id"] for row in rows]

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close(timeout=2)
            self.conn = None


async def _watch_rows(dsn: str, progress: _Progress) -> None:
    committed = _Committed(dsn, progress)
    try:
        while not (progress.offer_done and not progress.uncommitted):
            stamp = time.monotonic()
            progress.pg_rounds.append(stamp)
            if progress.uncommitted:
                for insight_id in await committed.find(list(progress.uncommitted)):
                    if insight_id in progress.uncommitted:
                        progress.uncommitted.discard(insight_id)
                        progress.committed_at[insight_id] = stamp
            lost = [
                i for i in progress.uncommitted if stamp - progress.published_at[i] > COMMIT_LIMIT_S
            ]
            if lost:
                raise RuntimeError(
                    f"{len(lost)} feedback messages not committed {COMMIT_LIMIT_S:.0f}s after "
                    f"their publish, e.g. insight {lost[0]} (is the worker running?)"
                )
            await asyncio.sleep(POLL_S)
    finally:
        await committed.close()


_UNKNOWN = '{"total_ratings":0,"unknown":true}'  # a round that could not ask Redis


def _stale(value: bytes | str | None) -> bool:
    """Still the value filled before the commit: present, with no rating counted."""
    if value is None:
        return False
    text = value.decode() if isinstance(value, bytes) else value
    # Hundreds of values a round, every 5 ms: the compact JSON of a stale value is
    # recognised without parsing it; anything else is parsed.
    if '"total_ratings":0,' in text:
        return True
    return bool(json.loads(text)["total_ratings"] < 1)


async def _watch_keys(redis: aioredis.Redis, progress: _Progress) -> None:
    while not (progress.offer_done and not progress.stale):
        stamp = time.monotonic()
        progress.redis_rounds.append(stamp)
        if progress.stale:
            ids = list(progress.stale)
            try:
                values = await redis.mget([stats_cache_key(i) for i in ids])
            except (RedisError, OSError):
                # Paused or restarting (other processes' fault tests); the run_id check
                # at the end tells a restart, which loses the keys, from a pause.
                progress.outages += 1
                values = [_UNKNOWN] * len(ids)
            for insight_id, value in zip(ids, values, strict=True):
                if not _stale(value):
                    progress.stale.discard(insight_id)
                    progress.fine_at[insight_id] = stamp
        for insight_id in progress.stale:
            committed = progress.committed_at.get(insight_id)
            if committed is not None and stamp - committed > STALE_LIMIT_S:
                raise RuntimeError(
                    f"{stats_cache_key(insight_id)} still stale {STALE_LIMIT_S:.0f}s after "
                    f"its commit ({len(progress.stale)} keys not fresh yet)"
                )
        await asyncio.sleep(POLL_S)


async def _redis_call(call: Callable[[], Awaitable[T]]) -> T:
    """One Redis call, tried again for a while when Redis is paused or restarting."""
    deadline = time.monotonic() + OUTAGE_LIMIT_S
    while True:
        try:
            return await call()
        except (RedisError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _redis_run_id(redis: aioredis.Redis) -> str:
    info = await redis.info("server")
    return str(info["run_id"])


async def _forget(redis: aioredis.Redis, tag: str) -> None:
    """Remove this run's keys and version tokens (24 h TTL) from the shared Redis."""
    keys = [stats_cache_key(i) for i in _insight_ids(tag)]
    for i in range(0, len(keys), 1000):
        chunk = keys[i : i + 1000]
        await redis.delete(*chunk, *(version_key(k) for k in chunk))


def _median_round_ms(rounds: list[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(rounds)) * 1000


async def run() -> None:
    settings = bench_settings(await fresh_database("utxoiq_bench_invalidation"))
    pubsub = await fresh_topology(settings)
    engine = create_engine(settings)
    cache = Cache(create_redis(settings))
    reads = CacheService(cache, DatabaseService(engine, None))
    watcher_redis = create_redis(settings)
    # Redis outlives the database: keys of this run only, removed at the end.
    tag = uuid.uuid4().hex[:8]
    progress = _Progress()
    try:
        ids = _insight_ids(tag)
        await _prefill_all(reads, cache.redis, ids, settings.database_pool_size, progress)
        run_id = await _redis_run_id(watcher_redis)
        worker = start_worker(settings)
        try:
            await _first_failure_stops_all(
                _offer(pubsub, cache.redis, ids, progress),
                _watch_rows(asyncpg_dsn(settings), progress),
                _watch_keys(watcher_redis, progress),
            )
        finally:
            stop_process(worker)
        if await _redis_run_id(watcher_redis) != run_id:
            raise RuntimeError(
                "Redis restarted during the run (another process?): the filled keys were "
                "lost, not invalidated, so the lags mean nothing; run again"
            )
    finally:
        with contextlib.suppress(Exception):
            await _forget(watcher_redis, tag)
        await watcher_redis.aclose()
        await cache.close()
        await engine.dispose()
        await pubsub.close()

    if progress.outages:
        print(
            f"invalidation: PostgreSQL or Redis was unavailable during the run "
            f"({progress.outages} failed calls, waited out; another process's fault test?)",
            file=sys.stderr,
        )
    offered = progress.published / progress.offer_s
    if offered < 0.9 * RATE_PER_S:
        print(
            f"invalidation: offered only {offered:.0f} msg/s of {RATE_PER_S} (the machine "
            "could not keep up); the lag figures are for that load",
            file=sys.stderr,
        )
    for name, rounds in (("PostgreSQL", progress.pg_rounds), ("Redis", progress.redis_rounds)):
        round_ms = _median_round_ms(rounds)
        if round_ms > 4 * POLL_S * 1000:
            # An event is seen up to one round late: the lags are that coarse.
            print(
                f"invalidation: the {name} watcher polled every {round_ms:.0f} ms (median), "
                f"not {POLL_S * 1000:.0f} ms (CPU starved?): lags are that coarse",
                file=sys.stderr,
            )
    if len(progress.committed_at) != TOTAL or len(progress.fine_at) != TOTAL:
        raise RuntimeError(
            f"of {TOTAL} insights, {len(progress.committed_at)} seen committed and "
            f"{len(progress.fine_at)} keys seen fresh"
        )
    lags_ms = [
        max(0.0, progress.fine_at[i] - progress.committed_at[i]) * 1000 for i in progress.fine_at
    ]
    report(SCENARIO, "invalidation_lag_p50_ms", percentile(lags_ms, 50))
    report(SCENARIO, "invalidation_lag_p99_ms", percentile(lags_ms, 99))
    report(SCENARIO, "offered_msgs_per_s", offered)
