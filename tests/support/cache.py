"""Helpers of the cache tests: a Redis logical database of the test's own, the
invariant check of CONTRACT.md, a wait for an idle worker, Redis outages.

The invariant: once the worker is idle, every key present in Redis equals what the
database gives for it now. ``check_invariant`` reads every cache key of the test's
Redis database and compares its JSON with the database's answer, serialized as the
read path serializes it (``model_dump(mode="json")``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from tests.support.emulator import Counters
from worker.config import Settings
from worker.exceptions import NotFoundError
from worker.read.service import DatabaseService
from worker.sources.pull_worker import PullWorker
from worker.storage.cache import Cache, create_cache, create_redis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
# Database 0 is what everything else uses; these tests take one of 1..15 each.
REDIS_DATABASES = tuple(range(1, 16))
CLAIM_KEY = "utxoiq-tests:claimed-by"
CLAIM_TTL_S = 600
# The patterns of CONTRACT.md's keys (SCAN MATCH is anchored: cache-version:* is not).
KEY_PATTERNS = {
    "feedback": "feedback:stats:*",
    "backfill": "backfill:job:*",
    "metrics": "metrics:*:recent",
}
REDIS_START = (
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
)


def redis_url(database: int) -> str:
    """The URL of logical ``database`` on the server of ``REDIS_URL``."""
    base = urllib.parse.urlsplit(Settings.from_env().redis_url)
    return urllib.parse.urlunsplit(base._replace(path=f"/{database}"))


def inspector(url: str) -> aioredis.Redis:
    """A plain client for looking at Redis from the test (not the code under test)."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5)


@dataclass
class RedisDb:
    """A logical Redis database claimed for one test: its URL, settings on it, a client."""

    number: int
    url: str
    settings: Settings
    redis: aioredis.Redis

    def cache(self, multiplexed_reads: bool = True) -> Cache:
        """A new ``Cache`` (its own connections) on this database, as the worker builds
        it (``create_cache``), or reading through redis-py's pool alone; caller closes it."""
        if multiplexed_reads:
            return create_cache(self.settings)
        return Cache(create_redis(self.settings))


@asynccontextmanager
async def own_redis_db(settings: Settings) -> AsyncIterator[RedisDb]:
    """Claim a free logical database (SET NX of a claim key), empty it, flush it on exit.

    ``settings`` come back with ``redis_url`` on that database.
    """
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    order = list(REDIS_DATABASES)
    random.shuffle(order)
    for number in order:
        url = redis_url(number)
        client = inspector(url)
        if await client.set(CLAIM_KEY, owner, nx=True, ex=CLAIM_TTL_S):
            break
        await client.aclose()
    else:
        raise AssertionError(f"no free Redis database among {REDIS_DATABASES}")
    try:
        # Leftovers of a run that died (version tokens live 24 h), not the claim.
        leftovers = [k async for k in client.scan_iter(count=1000) if k != CLAIM_KEY]
        if leftovers:
            await client.delete(*leftovers)
        yield RedisDb(number, url, dataclasses.replace(settings, redis_url=url), client)
    finally:
        try:
            if await redis_answers(timeout_s=15):
                # New connections: the server may have been restarted meanwhile.
                await client.connection_pool.disconnect()
                await client.flushdb()
        finally:
            await client.aclose()


# -- the invariant ---------------------------------------------------------------------


@dataclass(frozen=True)
class StaleKey:
    key: str
    cached: Any
    database: Any


@dataclass
class InvariantReport:
    checked: dict[str, list[str]] = field(default_factory=dict)
    stale: list[StaleKey] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(keys) for keys in self.checked.values())


async def database_value(db: DatabaseService, key: str) -> Any:
    """What the database gives now for cache ``key``, as JSON values (None: no such job)."""
    if key.startswith("feedback:stats:"):
        stats = await db.get_feedback_stats(key.removeprefix("feedback:stats:"))
        return stats.model_dump(mode="json")
    if key.startswith("backfill:job:"):
        try:
            job = await db.get_backfill_job(uuid.UUID(key.removeprefix("backfill:job:")))
        except NotFoundError:
            return None
        return job.model_dump(mode="json")
    parts = key.split(":")
    # The tests' series names hold no ':' so the key splits unambiguously.
    assert len(parts) == 4 and parts[0] == "metrics" and parts[3] == "recent", key
    points = await db.recent_metrics(parts[1], parts[2])
    return [p.model_dump(mode="json") for p in points]


async def check_invariant(redis: aioredis.Redis, db: DatabaseService) -> InvariantReport:
    """Every CONTRACT.md key present in Redis, compared with the database now."""
    report = InvariantReport()
    for kind, pattern in KEY_PATTERNS.items():
        keys = sorted({str(k) async for k in redis.scan_iter(match=pattern, count=1000)})
        report.checked[kind] = []
        for key in keys:
            raw = await redis.get(key)
            if raw is None:  # expired or invalidated between SCAN and GET
                continue
            report.checked[kind].append(key)
            cached = json.loads(raw)
            expected = await database_value(db, key)
            if cached != expected:
                report.stale.append(StaleKey(key, cached, expected))
    return report


# -- waiting for the worker --------------------------------------------------------------


async def wait_idle(
    worker: PullWorker, counters: Counters, *, quiet_s: float = 1.0, timeout_s: float = 60.0
) -> dict[str, dict[str, int]]:
    """Until no source holds an unsettled message and no counter moved for ``quiet_s``.

    Call it after the ingest topics settled (``Counters.wait_settled``): their
    invalidations were published before they were acked, so what is left is the Redis
    updater pulling and applying them; a quiet second means it has nothing more.
    """
    deadline = time.monotonic() + timeout_s
    last: tuple[Any, ...] | None = None
    quiet_since = time.monotonic()
    while True:
        totals = counters.totals()
        outstanding = sum(source.outstanding for source in worker.sources)
        snapshot = (json.dumps(totals, sort_keys=True), outstanding)
        now = time.monotonic()
        if snapshot != last or outstanding:
            last, quiet_since = snapshot, now
        elif now - quiet_since >= quiet_s:
            return totals
        if now >= deadline:
            raise AssertionError(f"worker not idle within {timeout_s}s: {snapshot}")
        await asyncio.sleep(0.05)


async def wait_until(probe: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(0.05)


# -- Redis outages -----------------------------------------------------------------------


async def _run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8", "replace")


async def ping() -> bool:
    # from_url, as create_redis does: no retries (the constructor's default retries a
    # refused connection with seconds of backoff).
    client = aioredis.Redis.from_url(
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def redis_answers(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await ping():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def pause_redis(duration_ms: int) -> None:
    """``CLIENT PAUSE ... ALL``: Redis answers nobody, keeps its data, resumes by itself.

    (``CLIENT UNPAUSE`` would wait behind the pause too: only the timeout ends it.)
    """
    code, out = await _run(
        "redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "CLIENT", "PAUSE",
        str(duration_ms), "ALL",
    )  # fmt: skip
    assert code == 0 and out.strip() == "OK", f"CLIENT PAUSE: {code} {out!r}"


async def stop_redis() -> None:
    """``shutdown nosave``: Redis is gone, and so is every key."""
    await _run("redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "shutdown", "nosave")
    assert await wait_for_down(timeout_s=10), "Redis still answers after shutdown nosave"


async def wait_for_down(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while await ping():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def start_redis() -> None:
    """Start Redis as the local stack does, unless it answers already."""
    if await ping():
        return
    code, out = await _run(*REDIS_START)
    assert code == 0, f"redis-server did not start: {code} {out!r}"
    assert await redis_answers(timeout_s=15), "Redis does not answer after its restart"
