"""A dead letter as an operator sees it: why it failed, where from, how old, and the
message a replay publishes in its place.

Two kinds reach a dead-letter subscription (CONTRACT.md, Dead letters): what the worker
dead-lettered itself (``dead_letter_reason`` and ``source_*`` attributes), and what
Pub/Sub forwarded after too many delivery attempts (``CloudPubSubDeadLetterSource*``
attributes), shown with the reason ``delivery_attempts_exceeded``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.pubsub.names import DEAD_LETTER_ATTRIBUTES
from worker.timestamps import rfc3339

DELIVERY_ATTEMPTS_EXCEEDED = "delivery_attempts_exceeded"
UNKNOWN_REASON = "unknown"
FORWARDED_PREFIX = "CloudPubSubDeadLetterSource"
REPLAYED_AT = "replayed_at"
REPLAY_COUNT = "replay_count"
PREVIEW_CHARS = 60
MAX_REPLAYS = 3
"""A message replayed this often is not replayed again without ``--force``."""


def is_dead_letter_attribute(name: str) -> bool:
    return name in DEAD_LETTER_ATTRIBUTES or name.startswith(FORWARDED_PREFIX)


def _timestamp(value: Any) -> datetime:
    """A protobuf Timestamp as an aware datetime."""
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9, UTC)


@dataclass(frozen=True)
class DeadLetter:
    """One message of a dead-letter subscription, as pulled (its lease held)."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: datetime

    @classmethod
    def from_received(cls, received: Any) -> DeadLetter:
        message = received.message
        return cls(
            ack_id=received.ack_id,
            message_id=message.message_id,
            data=bytes(message.data),
            attributes=dict(message.attributes),
            publish_time=_timestamp(message.publish_time),
        )

    @property
    def forwarded(self) -> bool:
        """Forwarded by Pub/Sub after too many delivery attempts."""
        return any(name.startswith(FORWARDED_PREFIX) for name in self.attributes)

    @property
    def reason(self) -> str:
        if "dead_letter_reason" in self.attributes:
            return self.attributes["dead_letter_reason"]
        return DELIVERY_ATTEMPTS_EXCEEDED if self.forwarded else UNKNOWN_REASON

    @property
    def detail(self) -> str:
        if "dead_letter_detail" in self.attributes:
            return self.attributes["dead_letter_detail"]
        if self.forwarded:
            attempts = self.attributes.get(f"{FORWARDED_PREFIX}DeliveryCount", "?")
            source = self.attributes.get(f"{FORWARDED_PREFIX}Subscription", "?")
            return f"{attempts} delivery attempts on {source}"
        return ""

    @property
    def source_message_id(self) -> str:
        """The id of the message that failed (``source_message_id``). Pub/Sub's
        forwarding adds no such attribute: a forwarded dead letter's own id stands for it."""
        return self.attributes.get("source_message_id", self.message_id)

    @property
    def replay_count(self) -> int:
        """Times this message was replayed already (0 for a first failure)."""
        try:
            return max(0, int(self.attributes.get(REPLAY_COUNT, "0")))
        except ValueError:
            return 0

    def age_s(self, now: datetime) -> float:
        """Seconds since it was dead-lettered."""
        return max(0.0, (now - self.publish_time).total_seconds())

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        """The start of the data, printable (bad UTF-8 replaced, control characters escaped)."""
        text = self.data[: chars * 4].decode("utf-8", errors="replace")
        shown = "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in text)
        return shown if len(shown) <= chars else shown[: chars - 1] + "…"

    def exported(self) -> dict[str, Any]:
        """One line of ``dlq export`` (and of a file ``dlq replay --from-file`` reads)."""
        return {
            "message_id": self.message_id,
            "source_message_id": self.source_message_id,
            "reason": self.reason,
            "publish_time": rfc3339(self.publish_time),
            "data": base64.b64encode(self.data).decode("ascii"),
            "attributes": self.attributes,
        }


def replay_attributes(
    attributes: dict[str, str], replay_count: int, now: datetime
) -> dict[str, str]:
    """The original attributes minus the dead-letter ones, plus ``replayed_at`` and
    ``replay_count`` (one more than before)."""
    kept = {k: v for k, v in attributes.items() if not is_dead_letter_attribute(k)}
    return {**kept, REPLAYED_AT: rfc3339(now), REPLAY_COUNT: str(replay_count + 1)}


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command works on; every filter given must hold."""

    reason: str | None = None
    since: datetime | None = None  # dead-lettered at or after
    before: datetime | None = None  # dead-lettered before
    message_ids: frozenset[str] | None = None  # dead letter's or source message id

    @property
    def everything(self) -> bool:
        return self == Selection()

    def matches(self, letter: DeadLetter) -> bool:
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.since is not None and letter.publish_time < self.since:
            return False
        if self.before is not None and letter.publish_time >= self.before:
            return False
        return self.message_ids is None or bool(
            {letter.message_id, letter.source_message_id} & self.message_ids
        )
