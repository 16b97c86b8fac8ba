"""Publishing cache invalidations after a batch commits (the pipeline's after-commit hook).

At least once: the pipeline acks a batch only after this returns, so a worker that
dies between commit and publish gets the batch again, rewrites it (a no-op, the
writes are idempotent) and publishes its invalidations then.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from schemas.invalidation import MAX_KEYS_PER_MESSAGE
from worker.pubsub.client import PubSub, PubsubMessage

INVALIDATION_TOPIC = "cache-invalidation"


class InvalidationPublisher:
    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub
        self.topic = pubsub.topic(INVALIDATION_TOPIC)

    async def __call__(self, source_topic: str, keys: frozenset[str]) -> None:
        """Publish ``keys`` (already de-duplicated by the batch); raises ``PubSubError``."""
        ordered = sorted(keys)
        committed_at = datetime.now(UTC).isoformat()
        messages = [
            PubsubMessage(
                data=orjson.dumps(
                    {
                        "keys": ordered[i : i + MAX_KEYS_PER_MESSAGE],
                        "source_topic": source_topic,
                        "committed_at": committed_at,
                    }
                )
            )
            for i in range(0, len(ordered), MAX_KEYS_PER_MESSAGE)
        ]
        await self.pubsub.publish(self.topic, messages)
