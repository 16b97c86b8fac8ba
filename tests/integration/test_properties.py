"""Any order, any duplicates, any batching: the same rows as a reference fold.

The references below are written from CONTRACT.md, independently of the handlers:
they apply the de-duplicated events one at a time, in ``(occurred_at, event_key)``
order, as a plain state machine. Times come from a handful of instants (in two
offsets) so that ties happen often.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.events import event_key
from schemas.backfill import BackfillProgressEvent, BackfillStatus
from schemas.feedback import FeedbackEvent, FlagType
from tests.support.factories import T0
from worker.read.service import DatabaseService

E = TypeVar("E", BackfillProgressEvent, FeedbackEvent)

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

PLUS2 = timezone(timedelta(hours=2))
# Few instants, each in two spellings: same instant, different events (different keys).
INSTANTS = [T0 + timedelta(minutes=m) for m in (0, 1, 2, 5)]
times = st.builds(
    lambda instant, plus2: instant.astimezone(PLUS2) if plus2 else instant,
    st.sampled_from(INSTANTS),
    st.booleans(),
)
STATUSES: list[BackfillStatus] = ["running", "paused", "completed", "failed"]
FLAGS: list[FlagType | None] = [None, "spam", "other"]
ETAS = [None, datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)]


def job_uuid(index: int) -> uuid.UUID:
    # Deterministic ids keep examples reproducible; tables are emptied per example.
    return uuid.uuid5(uuid.NAMESPACE_URL, f"job-{index}")


@dataclass(frozen=True)
class Delivery:
    """The events of an example, as they arrive: batches, possibly concurrent."""

    batches: list[list[Any]]
    concurrent: bool


@st.composite
def deliveries(draw: st.DrawFn, events: list[E]) -> Delivery:
    """Every event at least once, some more than once, shuffled, cut into batches."""
    extra = draw(st.lists(st.sampled_from(events), max_size=len(events)))
    arriving = draw(st.permutations(events + extra))
    cuts = draw(st.lists(st.booleans(), min_size=len(arriving), max_size=len(arriving)))
    batches: list[list[Any]] = [[]]
    for event, cut in zip(arriving, cuts, strict=True):
        batches[-1].append(event)
        if cut:
            batches.append([])
    return Delivery([b for b in batches if b], draw(st.booleans()))


def unique(events: list[E]) -> list[E]:
    """De-duplicated by full content (an offset spelling makes another event)."""
    return list({e.model_dump_json(): e for e in events}.values())


def in_event_order(events: list[E]) -> list[E]:
    return sorted(unique(events), key=lambda e: (e.occurred_at, event_key(e)))


async def empty(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE backfill_jobs, insight_feedback"))


async def deliver(apply: Any, delivery: Delivery) -> None:
    if delivery.concurrent:
        outcomes = await asyncio.gather(*(apply(batch) for batch in delivery.batches))
    else:
        outcomes = [await apply(batch) for batch in delivery.batches]
    assert all(outcome.failures == {} for outcome in outcomes)


# -- backfill ----------------------------------------------------------------------------


@st.composite
def backfill_events(draw: st.DrawFn) -> list[BackfillProgressEvent]:
    events = []
    for index in range(draw(st.integers(1, 3))):
        job_type = draw(st.sampled_from(["blocks", "transactions"]))
        start = draw(st.integers(0, 5))
        end = start + draw(st.integers(0, 6))
        for _ in range(draw(st.integers(1, 5))):
            status = draw(st.sampled_from(STATUSES))
            events.append(
                BackfillProgressEvent(
                    job_id=job_uuid(index),
                    job_type=job_type,
                    start_block=start,
                    end_block=end,
                    current_block=draw(st.integers(start, end)),
                    status=status,
                    error_message=draw(st.sampled_from([None, "e1", "e2"])),
                    estimated_completion=draw(st.sampled_from(ETAS)),
                    created_by=draw(st.sampled_from([None, "alice", "bob"])),
                    occurred_at=draw(times),
                )
            )
    return events


def progress_of(current: int, start: int, end: int) -> Decimal:
    if start == end:
        return Decimal(100)
    exact = Decimal(current - start) * 100 / Decimal(end - start)
    return exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def reference_backfill(events: list[BackfillProgressEvent]) -> dict[uuid.UUID, dict[str, Any]]:
    """CONTRACT.md's backfill rules, one event at a time, in event order."""
    jobs: dict[uuid.UUID, dict[str, Any]] = {}
    for e in in_event_order(events):
        job = jobs.get(e.job_id)
        if job is None:
            job = jobs[e.job_id] = {
                "job_type": e.job_type,
                "start_block": e.start_block,
                "end_block": e.end_block,
                "current_block": e.current_block,
                "status": None,
                "error_message": None,
                "estimated_completion": None,
                "started_at": e.occurred_at,  # the earliest: events come in time order
                "completed_at": None,
                "created_by": e.created_by,  # from the earliest event
            }
        assert (job["job_type"], job["start_block"], job["end_block"]) == (
            e.job_type,
            e.start_block,
            e.end_block,
        )
        job["current_block"] = max(job["current_block"], e.current_block)
        if job["status"] != "completed":  # completed is final
            job["status"] = e.status
            job["error_message"] = e.error_message
            job["estimated_completion"] = e.estimated_completion
            if e.status == "completed":
                job["completed_at"] = e.occurred_at
        if job["status"] == "completed":
            job["current_block"] = job["end_block"]
    for job in jobs.values():
        job["progress_percentage"] = progress_of(
            job["current_block"], job["start_block"], job["end_block"]
        )
    return jobs


@given(data=st.data())
@PROPERTY_SETTINGS
async def test_backfill_any_order_any_duplicates_any_batches(
    db: DatabaseService, engine: AsyncEngine, data: st.DataObject
) -> None:
    events = data.draw(backfill_events(), label="events")
    delivery = data.draw(deliveries(events), label="delivery")
    await empty(engine)

    await deliver(db.apply_backfill_events, delivery)

    expected = reference_backfill(events)
    stored = {job.job_id: job for job in await db.list_backfill_jobs(limit=1000)}
    assert set(stored) == set(expected)
    for job_id, want in expected.items():
        got = stored[job_id].model_dump(exclude={"job_id"})
        assert got == want, job_id


# -- feedback ----------------------------------------------------------------------------


@st.composite
def feedback_events(draw: st.DrawFn) -> list[FeedbackEvent]:
    events = []
    for _ in range(draw(st.integers(1, 12))):
        rating = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
        comment = draw(st.sampled_from([None, "", "nice", "not nice"]))
        flag_type = draw(st.sampled_from(FLAGS))
        if rating is None and comment is None and flag_type is None:
            rating = 1
        events.append(
            FeedbackEvent(
                insight_id=draw(st.sampled_from(["insight-a", "insight-b"])),
                user_id=draw(st.sampled_from(["user-x", "user-y"])),
                rating=rating,
                comment=comment,
                flag_type=flag_type,
                flag_reason=draw(st.sampled_from([None, "why"])) if flag_type else None,
                occurred_at=draw(times),
                event_id=draw(st.sampled_from([None, uuid.UUID(int=1)])),
            )
        )
    return events


def reference_feedback(events: list[FeedbackEvent]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per pair: the fields of the last event in event order; created_at the earliest."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for e in in_event_order(events):
        pair = (e.insight_id, e.user_id)
        created_at = rows[pair]["created_at"] if pair in rows else e.occurred_at
        rows[pair] = {
            "rating": e.rating,
            "comment": e.comment,
            "flag_type": e.flag_type,
            "flag_reason": e.flag_reason,
            "created_at": created_at,
            "updated_at": e.occurred_at,
        }
    return rows


@given(data=st.data())
@PROPERTY_SETTINGS
async def test_feedback_any_order_any_duplicates_any_batches(
    db: DatabaseService, engine: AsyncEngine, data: st.DataObject
) -> None:
    events = data.draw(feedback_events(), label="events")
    delivery = data.draw(deliveries(events), label="delivery")
    await empty(engine)

    await deliver(db.apply_feedback_events, delivery)

    expected = reference_feedback(events)
    stored = {(r.insight_id, r.user_id): r for r in await db.list_feedback(limit=1000)}
    assert set(stored) == set(expected)
    for pair, want in expected.items():
        assert stored[pair].model_dump(exclude={"insight_id", "user_id"}) == want, pair
    for insight in {e.insight_id for e in events}:
        stats = await db.get_feedback_stats(insight)
        ratings = [r["rating"] for (i, _), r in expected.items() if i == insight and r["rating"]]
        assert stats.total_ratings == len(ratings)
        assert stats.rating_distribution == {n: ratings.count(n) for n in range(1, 6)}
        comments = [r for (i, _), r in expected.items() if i == insight and r["comment"]]
        assert stats.total_comments == len(comments)
        flags = [
            r["flag_type"] for (i, _), r in expected.items() if i == insight and r["flag_type"]
        ]
        assert stats.total_flags == len(flags)
        assert stats.flag_types == {f: flags.count(f) for f in set(flags)}
        assert stats.average_rating == (round(sum(ratings) / len(ratings), 4) if ratings else 0)
