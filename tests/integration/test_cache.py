"""``worker.storage.cache.Cache`` on a real Redis: the fill race closed by version tokens,
invalidation, Redis down, and the TTLs of CONTRACT.md through ``CacheService``."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

import worker.storage.cache
from schemas.cache_keys import job_cache_key, recent_cache_key, stats_cache_key
from tests.support.cache import RedisDb, own_redis_db
from tests.support.factories import feedback, sample
from worker.config import Settings
from worker.exceptions import NotFoundError
from worker.read.cached import CacheService
from worker.read.service import DatabaseService
from worker.storage.cache import (
    VERSION_TTL_S,
    Cache,
    CacheUnavailableError,
    create_cache,
    create_redis,
    version_key,
)

DOWN_URL = "redis://127.0.0.1:1/0"


@pytest_asyncio.fixture(loop_scope="session")
async def rdb(settings: Settings) -> AsyncIterator[RedisDb]:
    async with own_redis_db(settings) as claimed:
        yield claimed


@pytest.fixture(params=[True, False], ids=["multiplexed-reads", "pooled-reads"])
def multiplexed_reads(request: pytest.FixtureRequest) -> bool:
    """Reads on one shared connection (what the worker builds), or through redis-py's
    pool (what a URL the shared connection does not take gets)."""
    return bool(request.param)


@pytest_asyncio.fixture(loop_scope="session")
async def cache(rdb: RedisDb, multiplexed_reads: bool) -> AsyncIterator[Cache]:
    cache = rdb.cache(multiplexed_reads)
    try:
        yield cache
    finally:
        await cache.close()


@pytest_asyncio.fixture(loop_scope="session")
async def writer(rdb: RedisDb) -> AsyncIterator[Cache]:
    """A second ``Cache`` on the same database: the Redis updater of another process."""
    cache = rdb.cache()
    try:
        yield cache
    finally:
        await cache.close()


class Loads:
    """A ``load`` callback that counts its calls and can run a step in the middle."""

    def __init__(self, value: str | None, during: Any = None) -> None:
        self.value = value
        self.during = during
        self.calls = 0

    async def __call__(self) -> str | None:
        self.calls += 1
        if self.during is not None:
            await self.during()
        return self.value


# -- the race ----------------------------------------------------------------------------


@pytest.mark.parametrize("token_before", [False, True], ids=["no-token-yet", "token-exists"])
async def test_fill_after_an_invalidation_is_refused(
    rdb: RedisDb, cache: Cache, writer: Cache, token_before: bool
) -> None:
    """Reader misses (seeing the token), loads the old value; the writer commits and
    invalidates; the reader's fill must not write the old value back."""
    key = "feedback:stats:race"
    if token_before:
        await writer.invalidate([key])
    before = await rdb.redis.get(version_key(key))
    assert (before is not None) == token_before

    async def writer_commits_and_invalidates() -> None:
        await writer.invalidate([key])

    load = Loads('{"old": true}', during=writer_commits_and_invalidates)
    assert await cache.get_or_load(key, 60, load) == '{"old": true}'
    assert load.calls == 1
    assert await rdb.redis.get(key) is None, "the old value was written back after the invalidation"
    after = await rdb.redis.get(version_key(key))
    assert after is not None and after != before
    # The next reader sees the new token, and its fill goes through.
    assert await cache.get_or_load(key, 60, Loads('{"new": true}')) == '{"new": true}'
    assert await rdb.redis.get(key) == '{"new": true}'


async def test_the_same_interleaving_through_the_raw_steps(
    rdb: RedisDb, cache: Cache, writer: Cache
) -> None:
    """Fetch (miss + token), invalidate, guarded fill: refused; fetch again, fill: written."""
    key = "backfill:job:raw"
    value, token = await cache._fetch(key)
    assert value is None and token is None
    await writer.invalidate([key])
    await cache._fill(keys=[key, version_key(key)], args=["stale", 60, token or ""])
    assert await rdb.redis.get(key) is None
    _, renewed = await cache._fetch(key)
    assert isinstance(renewed, str) and renewed
    await cache._fill(keys=[key, version_key(key)], args=["fresh", 60, renewed])
    assert await rdb.redis.get(key) == "fresh"


async def test_fill_without_an_invalidation_writes_with_the_ttl(rdb: RedisDb, cache: Cache) -> None:
    key = "metrics:svc:cpu:recent"
    load = Loads("[1]")
    assert await cache.get_or_load(key, 123, load) == "[1]"
    assert await rdb.redis.get(key) == "[1]"
    assert 120 <= await rdb.redis.ttl(key) <= 123
    # A hit: no second load.
    assert await cache.get_or_load(key, 123, Loads("[2]")) == "[1]"
    assert await cache.get(key) == "[1]"
    assert load.calls == 1


async def test_get_or_load_does_not_cache_none(rdb: RedisDb, cache: Cache) -> None:
    key = f"backfill:job:{uuid.uuid4()}"
    missing = Loads(None)
    assert await cache.get_or_load(key, 60, missing) is None
    assert await cache.get_or_load(key, 60, missing) is None
    assert missing.calls == 2
    assert await rdb.redis.exists(key) == 0
    assert await cache.get_or_load(key, 60, Loads("{}")) == "{}"
    assert await rdb.redis.get(key) == "{}"


async def test_invalidate_renews_tokens_and_deletes_many_keys_in_a_few_script_calls(
    rdb: RedisDb, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"feedback:stats:many-{i}" for i in range(50)]
    for key in keys:
        await cache.set(key, "cached", 300)
    await cache.invalidate(keys[:10])  # some keys carry a token already
    tokens_before = await rdb.redis.mget([version_key(k) for k in keys])
    for key in keys[:10]:
        await cache.set(key, "cached", 300)

    sent: list[tuple[Any, ...]] = []
    original_execute: Any = cache.redis.execute_command

    async def execute_command(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await original_execute(*args, **options)

    monkeypatch.setattr(worker.storage.cache, "INVALIDATE_CHUNK_KEYS", 20)
    monkeypatch.setattr(cache.redis, "execute_command", execute_command)
    await cache.invalidate(keys)
    monkeypatch.undo()

    # One atomic script call per chunk of keys: 20 + 20 + 10.
    assert [args[0] for args in sent] == ["EVALSHA"] * 3
    assert [args[2] for args in sent] == [40, 40, 20], "each key and its version key"
    assert await rdb.redis.exists(*keys) == 0
    tokens_after = await rdb.redis.mget([version_key(k) for k in keys])
    assert all(isinstance(t, str) and t for t in tokens_after)
    assert len(set(tokens_after)) == len(keys), "every key gets a token of its own"
    assert all(a != b for a, b in zip(tokens_before, tokens_after, strict=True))
    ttl = await rdb.redis.ttl(version_key(keys[0]))
    assert VERSION_TTL_S - 5 <= ttl <= VERSION_TTL_S
    await cache.invalidate([])  # nothing to do, nothing sent


async def test_delete_invalidates_one_key(rdb: RedisDb, cache: Cache) -> None:
    key = "feedback:stats:one"
    await cache.set(key, "x", 300)
    await cache.delete(key)
    assert await rdb.redis.exists(key) == 0
    assert await rdb.redis.get(version_key(key)) is not None


async def test_scripts_on_connections_the_server_closed_run_on_new_ones(
    rdb: RedisDb, cache: Cache
) -> None:
    """After a Redis restart the pool holds closed connections: the first fill or
    invalidation on each must still go through (redis-py retries no script itself)."""
    keys = [stats_cache_key(f"insight-{n}") for n in range(3)]
    await cache.invalidate(keys)
    assert await cache.get_or_load(keys[0], 60, Loads("before")) == "before"
    clients = await rdb.redis.client_list()
    used = [c["id"] for c in clients if c["db"] == str(rdb.number) and c["cmd"] == "evalsha"]
    assert used
    for client_id in used:
        await rdb.redis.client_kill_filter(_id=client_id)

    await cache.invalidate(keys)  # raises CacheUnavailableError if it failed
    assert await cache.get_or_load(keys[1], 60, Loads("filled")) == "filled"
    assert await rdb.redis.get(keys[1]) == "filled", "the fill went through"
    assert await rdb.redis.get(keys[0]) is None, "the invalidation went through"
    assert cache._available(), "no failure was counted"


# -- Redis down --------------------------------------------------------------------------


def down_cache(settings: Settings, multiplexed_reads: bool, breaker_s: float) -> Cache:
    """A cache of a Redis that refuses connections."""
    down = dataclasses.replace(settings, redis_url=DOWN_URL)
    if multiplexed_reads:
        return create_cache(down, breaker_s=breaker_s)
    return Cache(create_redis(down), breaker_s=breaker_s)


async def test_redis_down_costs_a_load_never_an_error(
    settings: Settings, multiplexed_reads: bool
) -> None:
    # No breaker: every call below really goes to the dead Redis.
    cache = down_cache(settings, multiplexed_reads, breaker_s=0)
    try:
        started = time.monotonic()
        assert await cache.get("feedback:stats:x") is None
        load = Loads('{"from": "database"}')
        assert await cache.get_or_load("feedback:stats:x", 60, load) == '{"from": "database"}'
        assert await cache.get_or_load("feedback:stats:x", 60, load) == '{"from": "database"}'
        assert load.calls == 2
        assert await cache.get_or_load("backfill:job:y", 60, Loads(None)) is None
        await cache.set("feedback:stats:x", "v", 60)
        await cache.delete("feedback:stats:x")
        await cache.invalidate([])  # nothing to invalidate: Redis is not asked
        assert await cache.ping() is False
        with pytest.raises(CacheUnavailableError):
            await cache.invalidate(["feedback:stats:x", "backfill:job:y"])
        assert time.monotonic() - started < 5, "a refused connection must fail fast"
    finally:
        await cache.close()


async def test_after_a_failure_reads_skip_redis_for_the_breaker_period(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, multiplexed_reads: bool
) -> None:
    cache = down_cache(settings, multiplexed_reads, breaker_s=30)
    attempts: list[str] = []
    original: Any = cache.redis.execute_command

    async def execute_command(*args: Any, **options: Any) -> Any:
        attempts.append(str(args[0]))
        return await original(*args, **options)

    monkeypatch.setattr(cache.redis, "execute_command", execute_command)
    if cache.reads is not None:
        original_mget: Any = cache.reads.mget

        async def mget(keys: Any) -> Any:
            attempts.append("MGET")
            return await original_mget(keys)

        monkeypatch.setattr(cache.reads, "mget", mget)
    assert (cache.reads is not None) == multiplexed_reads
    try:
        assert await cache.get("feedback:stats:x") is None
        assert attempts == ["MGET"]
        load = Loads("{}")
        for _ in range(3):
            assert await cache.get_or_load("feedback:stats:x", 60, load) == "{}"
        await cache.set("feedback:stats:x", "v", 60)
        assert attempts == ["MGET"], "reads and sets during the breaker period skip Redis"
        assert load.calls == 3
    finally:
        await cache.close()


# -- TTLs of CONTRACT.md through the read path -------------------------------------------


async def test_cache_service_fills_with_the_contract_ttls(
    rdb: RedisDb, cache: Cache, db: DatabaseService
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await db.create_feedback(feedback("insight-ttl", "u1", occurred_at=now, rating=4))
    job = await db.create_backfill_job(job_type="blocks", start_block=1, end_block=11)
    await db.record_metric(sample(service_name="ttl-svc", timestamp=now - timedelta(minutes=1)))
    reads = CacheService(cache, db)

    stats = await reads.get_feedback_stats("insight-ttl")
    assert stats.total_ratings == 1 and stats.average_rating == 4.0
    assert (await reads.get_backfill_job(job.job_id)).job_id == job.job_id
    points = await reads.recent_metrics("ttl-svc", "cpu")
    assert [p.metric_value for p in points] == [45.5]

    expected = {
        stats_cache_key("insight-ttl"): 3600,
        job_cache_key(job.job_id): 300,
        recent_cache_key("ttl-svc", "cpu"): 300,
    }
    for key, ttl_s in expected.items():
        ttl = await rdb.redis.ttl(key)
        assert ttl_s - 5 <= ttl <= ttl_s, f"{key}: TTL {ttl}, CONTRACT.md says {ttl_s}"

    # The cached text is what the database gives, serialized the same way.
    assert await rdb.redis.get(stats_cache_key("insight-ttl")) == stats.model_dump_json()
    assert await rdb.redis.get(job_cache_key(job.job_id)) == job.model_dump_json()

    # An unknown job is not found, and nothing is cached for it.
    unknown = uuid.uuid4()
    with pytest.raises(NotFoundError):
        await reads.get_backfill_job(unknown)
    assert await rdb.redis.exists(job_cache_key(unknown)) == 0
