"""``cache-invalidation``: the Redis updater.

Deletes the named keys (and renews their version tokens, see ``worker.storage.cache``) with
one Redis script call per 1000 keys, however many messages the batch holds. A Redis outage
is waited out here, however long it lasts, with the messages' leases extended by the
pull source (flow control bounds what is held), instead of nacking: a nacked
invalidation counts a delivery attempt, and after five Pub/Sub would dead-letter it
and leave a stale key behind until its TTL. Only shutdown ends the wait (the batch is
cancelled and its messages nacked for the next process).
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
from worker.pipeline.handler import BatchOutcome
from worker.pubsub.invalidations import INVALIDATION_TOPIC
from worker.storage.cache import Cache, CacheUnavailableError
from worker.topics import Topic

log = logging.getLogger(__name__)

HOLD_LOG_EVERY_S = 60.0


class CacheInvalidationHandler:
    topic = INVALIDATION_TOPIC

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def parse(self, payload: dict[str, Any], published_at: datetime) -> CacheInvalidation:
        return validate(CacheInvalidation, payload)

    async def apply(self, engine: AsyncEngine, items: Sequence[CacheInvalidation]) -> BatchOutcome:
        keys = sorted({key for item in items for key in item.keys})
        delay_s, waited_s, logged_at_s = 0.1, 0.0, None
        while True:
            try:
                await self.cache.invalidate(keys)
                return BatchOutcome()
            except CacheUnavailableError as error:
                if logged_at_s is None or waited_s - logged_at_s >= HOLD_LOG_EVERY_S:
                    log.warning(
                        "redis unavailable, holding invalidations",
                        extra={"keys": len(keys), "held_s": round(waited_s), "error": str(error)},
                    )
                    logged_at_s = waited_s
                await asyncio.sleep(delay_s)
                waited_s += delay_s
                delay_s = min(delay_s * 2, 5.0)


TOPIC = Topic(
    name=INVALIDATION_TOPIC,
    subscription="cache-invalidation-redis-updater",
    build_handler=lambda context: CacheInvalidationHandler(context.cache),
    # Its batches name no cache keys: the updater never publishes invalidations.
    invalidates_cache=False,
)
