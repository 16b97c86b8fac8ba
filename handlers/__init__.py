"""One module per topic: validate, write a batch in one statement, name the cache keys."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from handlers.backfill import BackfillHandler
from handlers.cache_invalidation import CacheInvalidationHandler
from handlers.feedback import FeedbackHandler
from handlers.metrics import MetricsHandler
from worker.config import Settings
from worker.pipeline.handler import Handler
from worker.storage.cache import Cache


def build_handlers(settings: Settings, cache: Cache | None = None) -> dict[str, Handler[Any]]:
    """A fresh handler per topic (handlers hold per-process caches), with the retention
    windows of ``settings``.

    The Redis updater (``cache-invalidation``) is included when a cache is given.
    """
    handlers: list[Handler[Any]] = [
        BackfillHandler(timedelta(days=settings.backfill_retention_days)),
        FeedbackHandler(timedelta(days=settings.feedback_retention_days)),
        MetricsHandler(timedelta(days=settings.metrics_retention_days)),
    ]
    if cache is not None:
        handlers.append(CacheInvalidationHandler(cache))
    return {h.topic: h for h in handlers}
