"""Redis as a cache that can never go stale for long, and never fail a caller.

The classic race: a reader misses, loads the old value from PostgreSQL, the writer
commits, the invalidation deletes the key, and then the reader writes its old value
back, stale until the TTL. Closed here with a version token per key:

- ``invalidate`` sets ``cache-version:{key}`` to a fresh random token and deletes the
  key, atomically (a Lua script);
- a reader fetches the value and the token in one MGET; on a miss it loads from the
  database and fills the key with a Lua compare-and-set that writes only if the token
  is still the one it saw. An invalidation between its fetch and its fill changed the
  token, so the old value is dropped. Random tokens (not counters) have no ABA: a
  token that expired and came back is a different token.

Invalidations are published after the commit, so a reader that saw the token before
an invalidation may have read the old row, and is refused; one that saw it after read
the new row. Redis being down costs a database query, never an error: reads skip
Redis for a second after a failure (``breaker_s``). Only ``invalidate`` raises
(``CacheUnavailableError``), because its caller must retry it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

from redis import asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError

from worker.config import Settings
from worker.exceptions import WorkerError
from worker.storage.redis_multiplexed import MultiplexedRedis

if TYPE_CHECKING:
    from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

VERSION_PREFIX = "cache-version:"
POOL_WAIT_S = 0.005
POOL_WAIT_TRIES = 100
# Longer than any value's TTL, so a token outlives every fill it guards.
VERSION_TTL_S = 24 * 3600

_FILL_IF_UNCHANGED = """
local current = redis.call('GET', KEYS[2])
if (current == false and ARGV[3] == '') or current == ARGV[3] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
end
return 0
"""


# KEYS: n keys, then their n version keys. ARGV: a fresh random token, the version TTL.
# Each key gets the token plus its index (unique, so still no ABA), then loses its
# value; one call for a whole chunk, where a MULTI of per-key commands cost the
# client several microseconds a key to build.
_INVALIDATE = """
local n = #KEYS / 2
for i = 1, n do
    redis.call('SET', KEYS[n + i], ARGV[1] .. ':' .. i, 'EX', ARGV[2])
    redis.call('DEL', KEYS[i])
end
return n
"""

INVALIDATE_CHUNK_KEYS = 1000
"""Keys per script call: bounds how long one call holds Redis."""


class CacheUnavailableError(WorkerError):
    """Redis could not be reached; the invalidation must be tried again."""

    transient = True


def version_key(key: str) -> str:
    return VERSION_PREFIX + key


SOCKET_TIMEOUT_S = 0.5
"""How long a command's reply may take before Redis counts as unavailable."""
CONNECT_TIMEOUT_S = 0.5


def create_redis(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        decode_responses=True,
    )


def multiplexed_reads(
    settings: Settings, telemetry: Telemetry | None = None
) -> MultiplexedRedis | None:
    """The reads' shared connection to ``settings.redis_url``
    (``worker.storage.redis_multiplexed``: a fraction of redis-py's CPU per read), or
    None where the URL is not one it takes."""
    # Spans of the reads, as redis-py's instrumentation makes of the other commands.
    tracer = telemetry.tracer if telemetry is not None and telemetry.exporting else None
    return MultiplexedRedis.from_url(
        settings.redis_url,
        timeout_s=SOCKET_TIMEOUT_S,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        tracer=tracer,
    )


def create_cache(
    settings: Settings, telemetry: Telemetry | None = None, breaker_s: float = 1.0
) -> Cache:
    """The cache of ``settings.redis_url``: reads on one shared connection where the URL
    allows it, every other command through redis-py's pool."""
    reads = multiplexed_reads(settings, telemetry)
    return Cache(create_redis(settings), breaker_s, telemetry, reads)


async def _run(script: AsyncScript, keys: list[str], args: list[str | int]) -> object:
    """``script`` on ``keys`` and ``args``, once more if its pooled connection turned out
    closed: redis-py retries other commands then, but not a script (it cannot know one is
    safe to run twice). Ours are: the fill is a compare-and-set of the same value, and an
    invalidation only renews tokens. Without this, the first script on each connection
    left over from before a Redis restart fails, and opens the breaker."""
    try:
        return await script(keys=keys, args=args)
    except MaxConnectionsError:
        raise  # a busy pool (a ConnectionError too), not a closed connection
    except RedisConnectionError:
        # The failed connection was dropped from the pool; this takes a new one.
        return await script(keys=keys, args=args)


class Cache:
    def __init__(
        self,
        redis: aioredis.Redis,
        breaker_s: float = 1.0,
        telemetry: Telemetry | None = None,
        reads: MultiplexedRedis | None = None,
    ) -> None:
        """``redis`` serves every command; ``reads``, if given, the reads instead (see
        ``create_cache``)."""
        self.redis = redis
        self.reads = reads
        self.breaker_s = breaker_s
        self.telemetry = telemetry
        self._down_until = 0.0
        self._fill = redis.register_script(_FILL_IF_UNCHANGED)
        self._invalidate = redis.register_script(_INVALIDATE)

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, error: Exception) -> None:
        if isinstance(error, MaxConnectionsError):
            return  # a busy pool, not a Redis failure: keep the cache in use
        if self._available():
            log.warning(
                "redis unavailable, reading through",
                extra={"operation": operation, "error": str(error)},
            )
        self._down_until = time.monotonic() + self.breaker_s

    async def get(self, key: str) -> str | None:
        """The cached value, or None on a miss or when Redis is down."""
        value, _ = await self._fetch(key)
        return value

    async def _fetch(self, key: str) -> tuple[str | None, str | bool | None]:
        """(value, version token); the token is False when Redis could not be asked."""
        if not self._available():
            return None, False
        keys = [key, version_key(key)]
        try:
            if self.reads is not None:
                value, token = await self.reads.mget(keys)
            else:
                value, token = await self._pooled_mget(keys)
        except (RedisError, OSError) as error:
            self._failed("get", error)
            return None, False
        return value, token

    async def _pooled_mget(self, keys: list[str]) -> list[str | None]:
        for _ in range(POOL_WAIT_TRIES):
            try:
                # decode_responses=True: Redis answers str (typed as bytes | str).
                return cast(list[str | None], await self.redis.mget(keys))
            except MaxConnectionsError:
                # Every pooled connection is busy: Redis is fine, wait for one rather
                # than open the breaker and send the heaviest load to PostgreSQL.
                await asyncio.sleep(POOL_WAIT_S)
        raise MaxConnectionsError(f"no pooled redis connection free in {POOL_WAIT_TRIES} tries")

    async def set(self, key: str, value: str, ttl_s: int) -> None:
        """Unconditional write (a value known to be current, e.g. just computed)."""
        if not self._available():
            return
        try:
            await self.redis.set(key, value, ex=ttl_s)
        except (RedisError, OSError) as error:
            self._failed("set", error)

    async def delete(self, key: str) -> None:
        """Invalidate one key; a Redis failure is logged, not raised."""
        try:
            await self.invalidate([key])
        except CacheUnavailableError as error:
            self._failed("delete", error)

    async def get_or_load(
        self, key: str, ttl_s: int, load: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        """Cache, then ``load`` on a miss, then a fill guarded by the version token.

        ``load`` returning None (not found) is not cached.
        """
        started = time.perf_counter()
        value, token = await self._fetch(key)
        hit = value is not None
        if not hit:
            value = await load()
            if value is not None and token is not False:
                try:
                    await _run(self._fill, [key, version_key(key)], [value, ttl_s, token or ""])
                except (RedisError, OSError) as error:
                    self._failed("fill", error)
        if self.telemetry is not None:
            cache = key.partition(":")[0]
            self.telemetry.count_cache_lookup(cache, hit)
            self.telemetry.read_duration_ms.record(
                (time.perf_counter() - started) * 1000, {"cache": cache}
            )
        return value

    async def invalidate(self, keys: Sequence[str]) -> None:
        """New version tokens and deleted values for ``keys``, each key atomically
        (one script call per ``INVALIDATE_CHUNK_KEYS`` keys)."""
        for start in range(0, len(keys), INVALIDATE_CHUNK_KEYS):
            chunk = list(keys[start : start + INVALIDATE_CHUNK_KEYS])
            try:
                await _run(
                    self._invalidate,
                    chunk + [version_key(key) for key in chunk],
                    [uuid.uuid4().hex, VERSION_TTL_S],
                )
            except (RedisError, OSError) as error:
                raise CacheUnavailableError(f"redis unavailable: {error}") from error
        self._down_until = 0.0

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self.reads is not None:
            await self.reads.aclose()
        await self.redis.aclose()
