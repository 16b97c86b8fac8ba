"""``cache-invalidation``: internal to the project (CONTRACT.md leaves its format to us)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from schemas.common import Payload, StorableText, Timestamp

MAX_KEYS_PER_MESSAGE = 500

CacheKey = Annotated[StorableText, Field(min_length=1, max_length=400)]


class CacheInvalidation(Payload):
    """The Redis keys one committed batch may have changed."""

    keys: Annotated[list[CacheKey], Field(min_length=1, max_length=MAX_KEYS_PER_MESSAGE)]
    source_topic: Annotated[StorableText, Field(min_length=1, max_length=100)]
    committed_at: Timestamp

    def age_s(self, now: datetime) -> float:
        return (now - self.committed_at).total_seconds()
