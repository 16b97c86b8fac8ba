"""``feedback``: one row per (insight_id, user_id), last writer wins by event time.

The rule lives in the upsert itself: a stored row is replaced only by an event whose
``(occurred_at, event_key)`` is greater, and ``created_at`` only ever moves earlier.
Two workers writing the same pair at once are serialised by the unique constraint's
row lock, and whichever commits last still keeps the newest event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from operator import attrgetter
from typing import NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.events import EventHandler, event_key
from schemas.cache_keys import stats_cache_key
from schemas.feedback import FeedbackEvent
from worker.pipeline.handler import BatchOutcome
from worker.storage.database import driver_connection
from worker.topics import Topic

DEFAULT_RETENTION_DAYS = 730
"""FEEDBACK_RETENTION_DAYS's default (CONTRACT.md)."""


class _Row(NamedTuple):
    """The batch's net effect on one (insight_id, user_id). (A named tuple: one is
    built per event, and a frozen dataclass costs twice as much to build.)"""

    winner: FeedbackEvent
    winner_key: bytes
    earliest: datetime


_NEWER = "(EXCLUDED.updated_at, EXCLUDED.event_key) > (f.updated_at, f.event_key)"


def _take_newer(column: str) -> str:
    return f"{column} = CASE WHEN {_NEWER} THEN EXCLUDED.{column} ELSE f.{column} END"


UPSERT_SQL = f"""
INSERT INTO insight_feedback AS f
    (insight_id, user_id, rating, comment, flag_type, flag_reason,
     created_at, updated_at, event_key)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[],
    $7::timestamptz[], $8::timestamptz[], $9::bytea[])
ON CONFLICT ON CONSTRAINT uq_insight_feedback_insight_user DO UPDATE SET
    {", ".join(_take_newer(c) for c in ("rating", "comment", "flag_type", "flag_reason"))},
    created_at = LEAST(f.created_at, EXCLUDED.created_at),
    {_take_newer("updated_at")},
    {_take_newer("event_key")}
"""


# The batch's stats rows, created if missing, locked in insight order before any
# feedback row. The triggers of the upsert lock them too, but in two passes (its
# inserted rows' insights, then its updated rows'), each ordered only within itself: one
# batch inserting for b and updating a, another inserting for a and b, would each hold
# what the other's second pass waits for. Locked here first, in one ordered pass, every
# batch takes them in the same order. (The no-op update takes the row lock.)
LOCK_STATS_SQL = """
INSERT INTO insight_feedback_stats AS s (insight_id)
SELECT DISTINCT insight_id FROM unnest($1::text[]) AS i (insight_id) ORDER BY insight_id
ON CONFLICT (insight_id) DO UPDATE SET insight_id = s.insight_id
"""


def _reduce(events: Sequence[FeedbackEvent]) -> list[_Row]:
    """Fold the batch per pair: one upsert may touch each row only once."""
    rows: dict[tuple[str, str], _Row] = {}
    for event in events:
        pair = (event.insight_id, event.user_id)
        key = event_key(event)
        seen = rows.get(pair)
        if seen is None:
            rows[pair] = _Row(event, key, event.occurred_at)
            continue
        newer = (event.occurred_at, key) > (seen.winner.occurred_at, seen.winner_key)
        rows[pair] = _Row(
            event if newer else seen.winner,
            key if newer else seen.winner_key,
            min(seen.earliest, event.occurred_at),
        )
    # A fixed order of row locks keeps concurrent batches from deadlocking.
    return [rows[pair] for pair in sorted(rows)]


async def write(conn: AsyncConnection, events: Sequence[FeedbackEvent]) -> BatchOutcome:
    """Apply a batch of feedback events in one statement. Every event applies."""
    if not events:
        return BatchOutcome()
    rows = _reduce(events)
    insight_ids, user_ids, ratings, comments, flag_types, flag_reasons, occurred = zip(
        *(_WINNER_COLUMNS(r.winner) for r in rows), strict=True
    )
    driver = await driver_connection(conn)
    # The statement orders them itself: by the database's collation, as the triggers do.
    await driver.execute(LOCK_STATS_SQL, insight_ids)
    await driver.execute(
        UPSERT_SQL,
        insight_ids,
        user_ids,
        ratings,
        comments,
        flag_types,
        flag_reasons,
        # Aware datetimes: asyncpg converts them to UTC itself.
        [r.earliest for r in rows],
        occurred,
        [r.winner_key for r in rows],
    )
    return BatchOutcome(cache_keys=frozenset(map(stats_cache_key, insight_ids)))


# The upsert's columns of each winning event, read in C: one pass over the batch
# instead of one per column.
_WINNER_COLUMNS = attrgetter(
    "insight_id", "user_id", "rating", "comment", "flag_type", "flag_reason", "occurred_at"
)


class FeedbackHandler(EventHandler[FeedbackEvent]):
    """The ``feedback`` topic (FEEDBACK_RETENTION_DAYS is its ``max_age``)."""

    topic = "feedback"
    table = "insight_feedback"

    def __init__(self, max_age: timedelta = timedelta(days=DEFAULT_RETENTION_DAYS)) -> None:
        super().__init__(FeedbackEvent, max_age, write)


TOPIC = Topic(
    name="feedback",
    subscription="feedback-worker",
    build_handler=lambda context: FeedbackHandler(
        timedelta(days=context.settings.feedback_retention_days)
    ),
)
