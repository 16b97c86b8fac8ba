"""``insight_feedback_stats`` against the aggregate of the rows, whatever writes them:
inserts, updates and deletes by plain SQL (as retention and an archive restore do),
concurrent writers, TRUNCATE, and the migration's count of rows stored before it."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.feedback import FLAG_TYPES, FeedbackEvent
from worker.read.feedback import stats_of
from worker.read.service import DatabaseService

# The aggregate the stats stand for (what a cache miss computed before they existed).
AGGREGATE = text(
    """
    SELECT insight_id,
           count(rating) AS total_ratings,
           coalesce(sum(rating), 0) AS rating_sum,
           count(*) FILTER (WHERE rating = 1) AS ratings_1,
           count(*) FILTER (WHERE rating = 2) AS ratings_2,
           count(*) FILTER (WHERE rating = 3) AS ratings_3,
           count(*) FILTER (WHERE rating = 4) AS ratings_4,
           count(*) FILTER (WHERE rating = 5) AS ratings_5,
           count(*) FILTER (WHERE length(comment) > 0) AS total_comments,
           count(flag_type) AS total_flags,
           count(*) FILTER (WHERE flag_type = 'inaccurate') AS flags_inaccurate,
           count(*) FILTER (WHERE flag_type = 'misleading') AS flags_misleading,
           count(*) FILTER (WHERE flag_type = 'spam') AS flags_spam,
           count(*) FILTER (WHERE flag_type = 'other') AS flags_other
    FROM insight_feedback GROUP BY insight_id
    """
)
FLAGS = [None, "inaccurate", "misleading", "spam", "other"]
ROUNDS, BATCHES = 60, 8


async def aggregate(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(AGGREGATE)).all()
    return {r.insight_id: stats_of(r.insight_id, dict(r._mapping)) for r in rows}


async def kept(engine: AsyncEngine) -> dict[str, Any]:
    """The stats table, insights with no rows left dropped (their counters are 0)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM insight_feedback_stats"))).all()
    found = {r.insight_id: stats_of(r.insight_id, dict(r._mapping)) for r in rows}
    return {insight: s for insight, s in found.items() if s != stats_of(insight, {})}


INSERT = text(
    """
    INSERT INTO insight_feedback AS f
        (insight_id, user_id, rating, comment, flag_type, created_at, updated_at, event_key)
    SELECT i, u, r, c, fl, now(), now(), '\\x00'
    FROM unnest(CAST(:i AS text[]), CAST(:u AS text[]), CAST(:r AS int[]),
                CAST(:c AS text[]), CAST(:fl AS text[])) AS t(i, u, r, c, fl)
    ON CONFLICT ON CONSTRAINT uq_insight_feedback_insight_user DO UPDATE SET
        rating = EXCLUDED.rating, comment = EXCLUDED.comment, flag_type = EXCLUDED.flag_type
    """
)


async def upsert(engine: AsyncEngine, rng: random.Random, rows: int) -> None:
    picks = sorted(
        {(f"insight-{rng.randrange(6)}", f"user-{rng.randrange(40)}") for _ in range(rows)}
    )
    async with engine.begin() as conn:
        await conn.execute(
            INSERT,
            {
                "i": [i for i, _ in picks],
                "u": [u for _, u in picks],
                "r": [rng.choice([None, 1, 2, 3, 4, 5]) for _ in picks],
                "c": [rng.choice([None, "", "ok"]) for _ in picks],
                "fl": [rng.choice(FLAGS) for _ in picks],
            },
        )


async def test_the_stats_equal_the_aggregate_whatever_writes_the_rows(engine: AsyncEngine) -> None:
    rng = random.Random(7)
    for round_no in range(5):
        # Several writers at once, some of their rows the same: they must compose.
        await asyncio.gather(*(upsert(engine, rng, 30) for _ in range(4)))
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE insight_feedback SET rating = NULL WHERE user_id = :u"),
                {"u": f"user-{round_no}"},
            )
            await conn.execute(
                text("DELETE FROM insight_feedback WHERE user_id LIKE :u"),
                {"u": f"user-{round_no + 1}%"},
            )
        assert await kept(engine) == await aggregate(engine), round_no

    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE insight_feedback"))
    assert await kept(engine) == {} == await aggregate(engine)


def random_events(rng: random.Random, count: int) -> list[FeedbackEvent]:
    now = datetime.now(UTC)
    return [
        FeedbackEvent(
            insight_id=f"insight-{rng.randrange(4)}",
            user_id=f"user-{rng.randrange(6)}",
            rating=rng.choice([1, 2, 3, 4, 5]),
            flag_type=rng.choice(FLAG_TYPES),
            occurred_at=now - timedelta(seconds=rng.randrange(3600)),
        )
        for _ in range(count)
    ]


async def test_concurrent_batches_of_the_handler_never_deadlock(engine: AsyncEngine) -> None:
    # Each batch inserts some rows and updates others, of a few insights: the upsert's
    # two trigger passes (inserted, then updated rows' insights) would lock the stats
    # rows in different orders in different batches, were they not locked first.
    db = DatabaseService(engine, None)
    rng = random.Random(11)
    for round_no in range(ROUNDS):
        batches = [random_events(rng, rng.randrange(1, 8)) for _ in range(BATCHES)]
        outcomes = await asyncio.gather(*(db.apply_feedback_events(b) for b in batches))
        assert all(not o.failures for o in outcomes), (round_no, outcomes)
    assert await kept(engine) == await aggregate(engine)
