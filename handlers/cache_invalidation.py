"""``cache-invalidation``: the Redis updater.

Deletes the named keys (and renews their version tokens, see ``worker.cache``) with
one MULTI per batch, however many messages and keys the batch holds. A Redis outage
is waited out here, with the messages' leases extended by the pull source, instead
of nacking: a nacked invalidation counts a delivery attempt, and after five Pub/Sub
would dead-letter it and leave a stale key behind until its TTL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.events import validate
from schemas.invalidation import CacheInvalidation
from worker.cache import Cache, CacheUnavailableError
from worker.handler import BatchOutcome

log = logging.getLogger(__name__)


class CacheInvalidationHandler:
    topic = "cache-invalidation"

    def __init__(self, cache: Cache, retry_for_s: float = 45.0) -> None:
        self.cache = cache
        self.retry_for_s = retry_for_s

    def parse(self, payload: dict[str, Any], published_at: datetime) -> CacheInvalidation:
        return validate(CacheInvalidation, payload)

    async def apply(self, engine: AsyncEngine, items: Sequence[CacheInvalidation]) -> BatchOutcome:
        keys = sorted({key for item in items for key in item.keys})
        delay_s, waited_s = 0.1, 0.0
        while True:
            try:
                await self.cache.invalidate(keys)
                return BatchOutcome()
            except CacheUnavailableError as error:
                if waited_s >= self.retry_for_s:
                    raise
                if waited_s == 0:
                    log.warning(
                        "redis unavailable, holding invalidations",
                        extra={"keys": len(keys), "error": str(error)},
                    )
                await asyncio.sleep(delay_s)
                waited_s += delay_s
                delay_s = min(delay_s * 2, 5.0)
