"""Queries on ``insight_feedback``: the stats of an insight and the stored rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.feedback import FLAG_TYPES, FeedbackRecord, FeedbackStats
from worker.read.ranges import within
from worker.storage.tables import insight_feedback


def _stats_statement() -> Select[*tuple[Any, ...]]:
    fb = insight_feedback.c
    return select(
        func.count(fb.rating).label("total_ratings"),
        func.coalesce(func.avg(fb.rating), 0).label("average_rating"),
        func.count().filter(func.length(fb.comment) > 0).label("total_comments"),
        func.count(fb.flag_type).label("total_flags"),
        *(func.count().filter(fb.rating == n).label(f"r{n}") for n in range(1, 6)),
        *(func.count().filter(fb.flag_type == f).label(f"f_{f}") for f in FLAG_TYPES),
    ).where(fb.insight_id == bindparam("insight_id"))


# Built once: every cache miss runs it, and building a 13-column select (and its
# cache key) costs more CPU than the query's round trip.
_STATS = _stats_statement()


async def stats(conn: AsyncConnection, insight_id: str) -> FeedbackStats:
    """``FeedbackStats`` of one insight in one aggregate query (zeros when none)."""
    row = (await conn.execute(_STATS, {"insight_id": insight_id})).one()._mapping
    return FeedbackStats(
        insight_id=insight_id,
        total_ratings=row["total_ratings"],
        average_rating=round(float(row["average_rating"]), 4),
        rating_distribution={n: row[f"r{n}"] for n in range(1, 6)},
        total_comments=row["total_comments"],
        total_flags=row["total_flags"],
        flag_types={f: row[f"f_{f}"] for f in FLAG_TYPES if row[f"f_{f}"]},
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
