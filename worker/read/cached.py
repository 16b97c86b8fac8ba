"""``CacheService``: the read path of the design document.

Redis first, PostgreSQL on a miss, then a guarded cache fill (``worker.storage.cache``), with
CONTRACT.md's keys and TTLs. A Redis failure only costs a database query.
"""

from __future__ import annotations

import uuid

from pydantic import TypeAdapter

from schemas.backfill import BackfillJobResponse
from schemas.cache_keys import (
    JOB_TTL_S,
    RECENT_LIMIT,
    RECENT_TTL_S,
    STATS_TTL_S,
    job_cache_key,
    recent_cache_key,
    stats_cache_key,
)
from schemas.feedback import FeedbackStats
from schemas.metrics import MetricPoint
from worker.exceptions import NotFoundError
from worker.read.service import DatabaseService
from worker.storage.cache import Cache

_POINTS = TypeAdapter(list[MetricPoint])


class CacheService:
    def __init__(self, cache: Cache, db: DatabaseService) -> None:
        self.cache = cache
        self.db = db

    # -- generic ---------------------------------------------------------------------

    async def get(self, key: str) -> str | None:
        return await self.cache.get(key)

    async def set(self, key: str, value: str, ttl_s: int) -> None:
        await self.cache.set(key, value, ttl_s)

    async def delete(self, key: str) -> None:
        await self.cache.delete(key)

    # -- feedback --------------------------------------------------------------------

    async def get_feedback_stats(self, insight_id: str) -> FeedbackStats:
        return FeedbackStats.model_validate_json(await self.feedback_stats_json(insight_id))

    async def feedback_stats_json(self, insight_id: str) -> str:
        """The stats as JSON text: what HTTP serves, with no parse and re-encode."""

        async def load() -> str:
            return (await self.db.get_feedback_stats(insight_id)).model_dump_json()

        text = await self.cache.get_or_load(stats_cache_key(insight_id), STATS_TTL_S, load)
        assert text is not None  # stats always exist (zeros for an unknown insight)
        return text

    async def cache_feedback_stats(self, insight_id: str) -> FeedbackStats:
        """Warm the cache for an insight (a guarded fill, like any read miss)."""
        await self.invalidate_feedback_cache(insight_id)
        return await self.get_feedback_stats(insight_id)

    async def invalidate_feedback_cache(self, insight_id: str) -> None:
        await self.cache.delete(stats_cache_key(insight_id))

    # -- backfill --------------------------------------------------------------------

    async def get_backfill_job(self, job_id: uuid.UUID) -> BackfillJobResponse:
        return BackfillJobResponse.model_validate_json(await self.backfill_job_json(job_id))

    async def backfill_job_json(self, job_id: uuid.UUID) -> str:
        async def load() -> str | None:
            try:
                return (await self.db.get_backfill_job(job_id)).model_dump_json()
            except NotFoundError:
                return None

        text = await self.cache.get_or_load(job_cache_key(job_id), JOB_TTL_S, load)
        if text is None:
            raise NotFoundError(f"backfill job {job_id} not found")
        return text

    # -- metrics ---------------------------------------------------------------------

    async def recent_metrics(self, service_name: str, metric_type: str) -> list[MetricPoint]:
        """The latest ``RECENT_LIMIT`` samples of a series, newest first."""
        return _POINTS.validate_json(await self.recent_metrics_json(service_name, metric_type))

    async def recent_metrics_json(self, service_name: str, metric_type: str) -> str:
        async def load() -> str:
            points = await self.db.recent_metrics(service_name, metric_type, RECENT_LIMIT)
            return _POINTS.dump_json(points).decode("utf-8")

        key = recent_cache_key(service_name, metric_type)
        text = await self.cache.get_or_load(key, RECENT_TTL_S, load)
        assert text is not None
        return text
