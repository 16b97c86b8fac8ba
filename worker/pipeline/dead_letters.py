"""Publishing messages that can never apply to their topic's dead-letter topic."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from worker.exceptions import PermanentError
from worker.pipeline.delivery import Delivery
from worker.pubsub.client import PubSub, PubsubMessage
from worker.pubsub.names import dead_letter_topic
from worker.timestamps import rfc3339

MAX_DETAIL_BYTES = 1024
MAX_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 9 * 1024 * 1024


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` characters and UTF-8 bytes (Pub/Sub limits attribute bytes)."""
    encoded = text[:limit].encode("utf-8")[:limit]
    return encoded.decode("utf-8", errors="ignore")


def dead_letter_attributes(
    topic: str, delivery: Delivery, error: PermanentError, failed_at: datetime
) -> dict[str, str]:
    """The original attributes plus CONTRACT.md's ``dead_letter_*`` and ``source_*``."""
    return {
        **delivery.attributes,
        "dead_letter_reason": error.reason,
        "dead_letter_detail": _cut(error.detail, MAX_DETAIL_BYTES),
        "source_topic": topic,
        "source_subscription": delivery.subscription.rsplit("/", 1)[-1],
        "source_message_id": delivery.message_id,
        "source_publish_time": rfc3339(delivery.publish_time),
        "failed_at": rfc3339(failed_at),
    }


class DeadLetterPublisher:
    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub

    async def publish(self, topic: str, entries: Sequence[tuple[Delivery, PermanentError]]) -> None:
        """Publish every entry, data unchanged, in one request; raises ``PubSubError``."""
        if not entries:
            return
        failed_at = datetime.now(UTC)
        messages = [
            PubsubMessage(
                data=delivery.data,
                attributes=dead_letter_attributes(topic, delivery, error, failed_at),
            )
            for delivery, error in entries
        ]
        target = self.pubsub.topic(dead_letter_topic(topic))
        for chunk in publish_requests(messages):
            await self.pubsub.publish(target, chunk)


def publish_requests(messages: Sequence[Any]) -> list[list[Any]]:
    """Split into requests within Pub/Sub's 1000 messages and 10 MB per publish."""
    chunks: list[list[Any]] = [[]]
    size = 0
    for message in messages:
        message_size = message.ByteSize()
        if chunks[-1] and (
            len(chunks[-1]) >= MAX_PER_REQUEST or size + message_size > MAX_REQUEST_BYTES
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(message)
        size += message_size
    return chunks
