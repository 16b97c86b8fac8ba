"""One module per topic: validate, write a batch in one statement, name the cache keys."""

from __future__ import annotations

from typing import Any

from handlers.backfill import BackfillHandler
from handlers.feedback import FeedbackHandler
from handlers.metrics import MetricsHandler
from worker.handler import Handler


def build_handlers() -> dict[str, Handler[Any]]:
    """A fresh handler per ingested topic (handlers hold per-process caches)."""
    handlers: list[Handler[Any]] = [BackfillHandler(), FeedbackHandler(), MetricsHandler()]
    return {h.topic: h for h in handlers}
