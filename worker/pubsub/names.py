"""The names CONTRACT.md derives from a topic's name."""

from __future__ import annotations


def dead_letter_topic(topic: str) -> str:
    return f"{topic}-dead-letter"


def dead_letter_subscription(topic: str) -> str:
    return f"{topic}-dead-letter-sub"
