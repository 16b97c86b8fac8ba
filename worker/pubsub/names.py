"""The names CONTRACT.md derives from a topic's name."""

from __future__ import annotations


def dead_letter_topic(topic: str) -> str:
    return f"{topic}-dead-letter"


def dead_letter_subscription(topic: str) -> str:
    return f"{topic}-dead-letter-sub"


DEAD_LETTER_ATTRIBUTES = frozenset(
    {
        "dead_letter_reason",
        "dead_letter_detail",
        "source_topic",
        "source_subscription",
        "source_message_id",
        "source_publish_time",
        "failed_at",
    }
)
"""What the worker adds to a message it dead-letters (``pipeline.dead_letters``)."""
