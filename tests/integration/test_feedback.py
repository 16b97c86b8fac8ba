"""CONTRACT.md ``feedback`` effects and stats, through ``DatabaseService``."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from datetime import timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.events import event_key
from schemas.feedback import FeedbackEvent, FeedbackRecord, FeedbackStats
from tests.support.factories import at, feedback
from worker.exceptions import ValidationError
from worker.read.service import DatabaseService


async def only_row(db: DatabaseService, insight_id: str, user_id: str) -> FeedbackRecord:
    rows = await db.list_feedback(insight_id=insight_id, user_id=user_id)
    assert len(rows) == 1, rows
    return rows[0]


def fields(row: FeedbackRecord) -> tuple[Any, ...]:
    return (row.rating, row.comment, row.flag_type, row.flag_reason, row.created_at, row.updated_at)


async def forget(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM insight_feedback"))


async def test_first_event_creates_the_row(db: DatabaseService) -> None:
    event = feedback(
        "insight_123",
        "user_456",
        occurred_at=at(0),
        rating=5,
        comment="Great insight!",
        flag_type="other",
        flag_reason="why not",
    )
    outcome = await db.apply_feedback_events([event])
    assert outcome.failures == {}
    assert outcome.cache_keys == frozenset({"feedback:stats:insight_123"})
    row = await only_row(db, "insight_123", "user_456")
    assert row == FeedbackRecord(
        insight_id="insight_123",
        user_id="user_456",
        rating=5,
        comment="Great insight!",
        flag_type="other",
        flag_reason="why not",
        created_at=at(0),
        updated_at=at(0),
    )


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
async def test_last_writer_wins_by_event_time_across_batches(
    db: DatabaseService, arrival: tuple[int, ...]
) -> None:
    events = [
        feedback("i", "u", occurred_at=at(1), rating=1, comment="first"),
        feedback("i", "u", occurred_at=at(3), rating=None, flag_type="spam", flag_reason="ad"),
        feedback("i", "u", occurred_at=at(2), rating=2, comment="second"),
    ]
    for index in arrival:
        await db.apply_feedback_events([events[index]])
    row = await only_row(db, "i", "u")
    # The winner replaces every field, nulls included.
    assert fields(row) == (None, None, "spam", "ad", at(1), at(3))


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
async def test_last_writer_wins_inside_one_batch(
    db: DatabaseService, arrival: tuple[int, ...]
) -> None:
    events = [
        feedback("i", "u", occurred_at=at(1), rating=1),
        feedback("i", "u", occurred_at=at(3), rating=3, comment="newest"),
        feedback("i", "u", occurred_at=at(2), rating=2, flag_type="inaccurate"),
    ]
    await db.apply_feedback_events([events[i] for i in arrival])
    assert fields(await only_row(db, "i", "u")) == (3, "newest", None, None, at(1), at(3))


async def test_older_event_after_newer_changes_only_created_at(db: DatabaseService) -> None:
    await db.apply_feedback_events([feedback("i", "u", occurred_at=at(5), rating=5)])
    await db.apply_feedback_events(
        [feedback("i", "u", occurred_at=at(2), rating=1, comment="older")]
    )
    assert fields(await only_row(db, "i", "u")) == (5, None, None, None, at(2), at(5))


async def test_same_instant_in_another_offset_is_the_same_time(db: DatabaseService) -> None:
    plus2 = at(3).astimezone(timezone(timedelta(hours=2)))
    await db.apply_feedback_events([feedback("i", "u", occurred_at=plus2, rating=4)])
    await db.apply_feedback_events([feedback("i", "u", occurred_at=at(2), rating=1)])
    row = await only_row(db, "i", "u")
    assert (row.rating, row.created_at, row.updated_at) == (4, at(2), at(3))


async def test_equal_times_are_broken_deterministically(
    db: DatabaseService, engine: AsyncEngine
) -> None:
    a = feedback("i", "u", occurred_at=at(1), rating=2, comment="a")
    b = feedback("i", "u", occurred_at=at(1), rating=4, comment="b")
    orders: list[Sequence[Sequence[FeedbackEvent]]] = [
        [[a, b]],
        [[b, a]],
        [[a], [b]],
        [[b], [a]],
        [[a], [b], [a]],
        [[b, a, b], [a]],
    ]
    results = []
    for batches in orders:
        await forget(engine)
        for batch in batches:
            await db.apply_feedback_events(batch)
        results.append(fields(await only_row(db, "i", "u")))
    assert len(set(results)) == 1, results
    # The tie-breaker is the event key: the larger one wins, whatever the arrival.
    winner = max((a, b), key=event_key)
    assert results[0] == (winner.rating, winner.comment, None, None, at(1), at(1))


async def test_duplicates_change_nothing(db: DatabaseService) -> None:
    event = feedback("i", "u", occurred_at=at(1), rating=2)
    newer = feedback("i", "u", occurred_at=at(2), rating=5)
    await db.apply_feedback_events([event, event])
    await db.apply_feedback_events([newer])
    await db.apply_feedback_events([event, event, event])
    assert fields(await only_row(db, "i", "u")) == (5, None, None, None, at(1), at(2))


async def test_pairs_are_independent(db: DatabaseService) -> None:
    await db.apply_feedback_events(
        [
            feedback("i1", "u1", occurred_at=at(1), rating=1),
            feedback("i1", "u2", occurred_at=at(2), rating=2),
            feedback("i2", "u1", occurred_at=at(3), rating=3),
        ]
    )
    assert (await only_row(db, "i1", "u1")).rating == 1
    assert (await only_row(db, "i1", "u2")).rating == 2
    assert (await only_row(db, "i2", "u1")).rating == 3
    assert len(await db.list_feedback()) == 3


async def test_create_feedback_returns_the_stored_row(db: DatabaseService) -> None:
    stored = await db.create_feedback(feedback("i", "u", occurred_at=at(5), rating=5))
    assert (stored.rating, stored.updated_at) == (5, at(5))
    # An older event does not replace the newer one: the caller sees what is stored.
    stored = await db.create_feedback(feedback("i", "u", occurred_at=at(1), rating=1))
    assert (stored.rating, stored.created_at, stored.updated_at) == (5, at(1), at(5))


async def test_text_is_stored_byte_for_byte(db: DatabaseService, engine: AsyncEngine) -> None:
    insight_id, user_id = "😀" * 100, "  ü " * 25
    comment = " \tmixed\r\n😀 é  "
    await db.apply_feedback_events(
        [
            feedback(
                insight_id,
                user_id,
                occurred_at=at(0),
                comment=comment,
                flag_type="spam",
                flag_reason="\n",
            )
        ]
    )
    row = await only_row(db, insight_id, user_id)
    assert (row.insight_id, row.user_id, row.comment, row.flag_reason) == (
        insight_id,
        user_id,
        comment,
        "\n",
    )
    async with engine.connect() as conn:
        stored = (
            await conn.execute(text("SELECT convert_to(comment, 'UTF8') FROM insight_feedback"))
        ).scalar()
    assert stored == comment.encode("utf-8")


async def test_stats_of_an_insight_without_feedback(db: DatabaseService) -> None:
    stats = await db.get_feedback_stats("nobody")
    assert stats == FeedbackStats(
        insight_id="nobody",
        total_ratings=0,
        average_rating=0.0,
        rating_distribution={1: 0, 2: 0, 3: 0, 4: 0, 5: 0},
        total_comments=0,
        total_flags=0,
        flag_types={},
    )
    assert isinstance(stats.average_rating, float)


async def test_stats(db: DatabaseService) -> None:
    await db.apply_feedback_events(
        [
            feedback("i", "a", occurred_at=at(1), rating=5, comment="good"),
            feedback("i", "b", occurred_at=at(1), rating=4, comment=""),
            feedback("i", "c", occurred_at=at(1), rating=4, comment="  ", flag_type="spam"),
            feedback("i", "d", occurred_at=at(1), rating=None, flag_type="spam", flag_reason="ads"),
            feedback("i", "e", occurred_at=at(1), rating=None, comment="meh", flag_type="other"),
            # Replaced by a later event of the same user: counts once, as its winner.
            feedback("i", "f", occurred_at=at(1), rating=1, flag_type="inaccurate"),
            feedback("i", "f", occurred_at=at(2), rating=4),
            # Another insight does not count.
            feedback("j", "a", occurred_at=at(1), rating=1, comment="x", flag_type="spam"),
        ]
    )
    stats = await db.get_feedback_stats("i")
    assert stats == FeedbackStats(
        insight_id="i",
        total_ratings=4,
        average_rating=4.25,
        rating_distribution={1: 0, 2: 0, 3: 0, 4: 3, 5: 1},
        total_comments=3,  # "good", "  " and "meh"; the empty one is not a comment
        total_flags=3,
        flag_types={"spam": 2, "other": 1},
    )
    other = await db.get_feedback_stats("j")
    assert (other.total_ratings, other.average_rating, other.total_flags) == (1, 1.0, 1)
    assert other.rating_distribution == {1: 1, 2: 0, 3: 0, 4: 0, 5: 0}


async def test_average_rating_is_not_an_integer_average(db: DatabaseService) -> None:
    await db.apply_feedback_events(
        [feedback("i", u, occurred_at=at(0), rating=r) for u, r in (("a", 5), ("b", 4), ("c", 4))]
    )
    assert (await db.get_feedback_stats("i")).average_rating == pytest.approx(13 / 3, abs=1e-4)


async def test_list_feedback_filters(db: DatabaseService) -> None:
    await db.apply_feedback_events(
        [
            feedback("i1", "u1", occurred_at=at(10), rating=1),
            feedback("i1", "u2", occurred_at=at(20), rating=2),
            feedback("i2", "u1", occurred_at=at(30), rating=3),
            feedback("i2", "u2", occurred_at=at(40), rating=4),
            feedback("i2", "u2", occurred_at=at(5), rating=1),  # older: only created_at moves
        ]
    )

    def pairs(rows: list[FeedbackRecord]) -> list[tuple[str, str]]:
        return [(r.insight_id, r.user_id) for r in rows]

    newest_first = [("i2", "u2"), ("i2", "u1"), ("i1", "u2"), ("i1", "u1")]
    assert pairs(await db.list_feedback()) == newest_first
    assert pairs(await db.list_feedback(insight_id="i1")) == [("i1", "u2"), ("i1", "u1")]
    assert pairs(await db.list_feedback(user_id="u1")) == [("i2", "u1"), ("i1", "u1")]
    assert pairs(await db.list_feedback(insight_id="i2", user_id="u1")) == [("i2", "u1")]
    # [start, end) on the time of the winning event.
    assert pairs(await db.list_feedback(start=at(20), end=at(40))) == [("i2", "u1"), ("i1", "u2")]
    assert pairs(await db.list_feedback(start=at(40))) == [("i2", "u2")]
    assert pairs(await db.list_feedback(end=at(10))) == []
    assert pairs(await db.list_feedback(end=at(10) + timedelta(microseconds=1))) == [("i1", "u1")]
    assert pairs(await db.list_feedback(insight_id="i1", start=at(15))) == [("i1", "u2")]
    assert pairs(await db.list_feedback(limit=2)) == newest_first[:2]
    assert await db.list_feedback(insight_id="nope") == []
    for bad in (0, 1001):
        with pytest.raises(ValidationError, match="limit"):
            await db.list_feedback(limit=bad)


async def test_concurrent_batches_equal_sequential_application(db: DatabaseService) -> None:
    rng = random.Random(456)
    users = [f"user{n}" for n in range(15)]

    def events_for(insight_id: str) -> list[FeedbackEvent]:
        # Distinct times per pair, so the outcome does not depend on the insight name.
        return [
            feedback(
                insight_id,
                user,
                occurred_at=at(minute * 100 + u),
                rating=1 + (minute + u) % 5,
                comment=f"{user} at {minute}",
            )
            for u, user in enumerate(users)
            for minute in range(6)
        ]

    for round_ in range(3):
        events = events_for(f"conc{round_}")
        rng.shuffle(events)
        batches = [events[k::4] for k in range(4)]
        await asyncio.gather(*(db.apply_feedback_events(batch) for batch in batches))

        for batch in batches:
            await db.apply_feedback_events(
                [e.model_copy(update={"insight_id": f"seq{round_}"}) for e in batch]
            )

        concurrent = await db.list_feedback(insight_id=f"conc{round_}")
        sequential = await db.list_feedback(insight_id=f"seq{round_}")
        assert len(concurrent) == len(users)
        assert [r.model_dump(exclude={"insight_id"}) for r in concurrent] == [
            r.model_dump(exclude={"insight_id"}) for r in sequential
        ]
        for row in concurrent:
            u = users.index(row.user_id)
            assert (row.created_at, row.updated_at) == (at(u), at(500 + u))
            assert row.comment == f"{row.user_id} at 5"


async def test_concurrent_overlapping_batches_keep_the_newest(db: DatabaseService) -> None:
    # Many small transactions on the very same rows: the newest event always survives.
    events = [
        feedback("hot", f"u{k % 3}", occurred_at=at(minute), rating=1 + minute % 5)
        for minute in range(30)
        for k in range(3)
    ]
    random.Random(7).shuffle(events)
    await asyncio.gather(*(db.apply_feedback_events(events[k::10]) for k in range(10)))
    for user in ("u0", "u1", "u2"):
        row = await only_row(db, "hot", user)
        assert (row.rating, row.created_at, row.updated_at) == (1 + 29 % 5, at(0), at(29))
