"""Queries on ``insight_feedback``: the stats of an insight and the stored rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.feedback import FLAG_TYPES, FeedbackRecord, FeedbackStats
from worker.read.ranges import within
from worker.storage.database import single_statement
from worker.storage.tables import insight_feedback

STATS_SQL = "SELECT * FROM insight_feedback_stats WHERE insight_id = $1"


async def stats(engine: AsyncEngine, insight_id: str) -> FeedbackStats:
    """``FeedbackStats`` of one insight: one row of ``insight_feedback_stats``, which
    triggers keep equal to the aggregate of its feedback rows (zeros when none). Every
    cache miss runs it: one statement, one round trip, straight to asyncpg."""
    async with single_statement(engine) as driver:
        row = await driver.fetchrow(STATS_SQL, insight_id)
    return stats_of(insight_id, dict(row) if row is not None else {})


def stats_of(insight_id: str, counts: dict[str, Any]) -> FeedbackStats:
    """The response for one insight's counters (``insight_feedback_stats``' columns;
    a missing one is 0)."""

    def count(name: str) -> int:
        return int(counts.get(name) or 0)

    total = count("total_ratings")
    return FeedbackStats(
        insight_id=insight_id,
        total_ratings=total,
        average_rating=round(count("rating_sum") / total, 4) if total else 0.0,
        rating_distribution={n: count(f"ratings_{n}") for n in range(1, 6)},
        total_comments=count("total_comments"),
        total_flags=count("total_flags"),
        flag_types={f: count(f"flags_{f}") for f in FLAG_TYPES if count(f"flags_{f}")},
    )


async def list_feedback(
    conn: AsyncConnection,
    *,
    insight_id: str | None,
    user_id: str | None,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> list[FeedbackRecord]:
    """Feedback rows, newest first; ``start``/``end`` bound ``updated_at`` (end excluded)."""
    fb = insight_feedback.c
    query = (
        select(
            fb.insight_id,
            fb.user_id,
            fb.rating,
            fb.comment,
            fb.flag_type,
            fb.flag_reason,
            fb.created_at,
            fb.updated_at,
        )
        .order_by(fb.updated_at.desc(), fb.insight_id, fb.user_id)
        .limit(limit)
    )
    if insight_id is not None:
        query = query.where(fb.insight_id == insight_id)
    if user_id is not None:
        query = query.where(fb.user_id == user_id)
    query = within(query, fb.updated_at, start, end)
    result = await conn.execute(query)
    return [FeedbackRecord.model_validate(dict(r._mapping)) for r in result]
