"""What every handler shares: an event's order key and a batch's outcome."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from worker.exceptions import PermanentError


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: equal values give equal bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def event_key(event: BaseModel) -> bytes:
    """A deterministic tie-breaker between two events of the same ``occurred_at``.

    Equal events have equal keys, so a duplicate never wins against itself and the
    outcome never depends on arrival order.
    """
    return hashlib.sha256(canonical_json(event.model_dump(mode="json"))).digest()


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class BatchOutcome:
    """What a handler did with one batch.

    ``failures`` maps the index of an event that can never apply to its permanent
    error (the runtime dead-letters those); every other event was applied.
    ``cache_keys`` names the Redis keys whose values the batch may have changed.
    """

    failures: dict[int, PermanentError] = field(default_factory=dict)
    cache_keys: frozenset[str] = frozenset()
