"""The contract between the runtime and a topic's handler.

The runtime decodes message data into a JSON object, asks the handler to ``parse``
it (schema validation), gathers parsed items into batches and calls ``apply`` once
per batch. A handler knows its schema and its SQL; it never knows whether a message
came by pull or by push.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.exceptions import PermanentError

Item = TypeVar("Item")


@dataclass(frozen=True)
class BatchOutcome:
    """What a handler did with one batch.

    ``failures`` maps the index of an item that can never apply to its permanent
    error (the runtime dead-letters those); every other item was committed.
    ``cache_keys`` names the Redis keys whose values the batch may have changed.
    """

    failures: dict[int, PermanentError] = field(default_factory=dict)
    cache_keys: frozenset[str] = frozenset()


class Handler(Protocol[Item]):
    topic: str

    def parse(self, payload: dict[str, Any], published_at: datetime) -> Item:
        """Validate one decoded payload; raise ``PermanentError`` if it can never apply."""
        ...

    async def apply(self, engine: AsyncEngine, items: Sequence[Item]) -> BatchOutcome:
        """Write the batch in one transaction, committed when this returns.

        Raises a transient ``WorkerError`` when nothing was committed and a retry may
        succeed, or a ``PermanentError`` when the batch as a whole was refused.
        """
        ...
