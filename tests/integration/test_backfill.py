"""CONTRACT.md ``backfill-progress`` effects, through ``DatabaseService``."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.backfill import MAX_BLOCK, BackfillJobResponse, BackfillProgressEvent
from tests.support.factories import T0, at, backfill_payload, progress
from worker.exceptions import ConflictError, NotFoundError, ValidationError
from worker.read.service import DatabaseService


async def apply_each(db: DatabaseService, events: Sequence[BackfillProgressEvent]) -> None:
    """One batch per event, in the order given (arrival order)."""
    for event in events:
        outcome = await db.apply_backfill_events([event])
        assert outcome.failures == {}


def state(job: BackfillJobResponse) -> dict[str, Any]:
    """Everything of a job but its id, to compare jobs with each other."""
    return job.model_dump(exclude={"job_id"})


async def test_first_event_creates_the_job(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    eta = datetime(2026, 11, 22, tzinfo=UTC)
    event = progress(
        job_id,
        occurred_at=at(0),
        current_block=150,
        estimated_completion=eta,
        created_by="admin",
    )
    outcome = await db.apply_backfill_events([event])
    assert outcome.failures == {}
    assert outcome.cache_keys == frozenset({f"backfill:job:{job_id}"})

    job = await db.get_backfill_job(job_id)
    assert job == BackfillJobResponse(
        job_id=job_id,
        job_type="blocks",
        start_block=100,
        end_block=200,
        current_block=150,
        status="running",
        progress_percentage=Decimal("50.00"),
        estimated_completion=eta,
        error_message=None,
        started_at=at(0),
        completed_at=None,
        created_by="admin",
    )


async def test_contract_example_round_trips(db: DatabaseService) -> None:
    event = BackfillProgressEvent.model_validate(backfill_payload())
    await db.apply_backfill_events([event])
    job = await db.get_backfill_job(event.job_id)
    assert (job.job_type, job.start_block, job.end_block, job.current_block) == (
        "blocks",
        800000,
        810000,
        805000,
    )
    assert job.progress_percentage == Decimal("50.00")
    assert job.started_at == T0
    assert job.created_by == "admin"


async def test_current_block_is_the_largest_seen_whatever_the_order(
    db: DatabaseService,
) -> None:
    blocks = [150, 120, 180, 130]
    for order in itertools.permutations(range(len(blocks))):
        job_id = uuid.uuid4()
        # Later events may carry smaller blocks (a lagging reporter): the max stands.
        events = [progress(job_id, occurred_at=at(i), current_block=blocks[i]) for i in order]
        await apply_each(db, events)
        job = await db.get_backfill_job(job_id)
        assert job.current_block == 180, order
        assert job.progress_percentage == Decimal("80.00")


async def test_current_block_in_one_batch_and_with_duplicates(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    events = [
        progress(job_id, occurred_at=at(i), current_block=b) for i, b in enumerate([190, 110])
    ]
    outcome = await db.apply_backfill_events([events[1], events[0], events[1], events[0]])
    assert outcome.failures == {}
    await db.apply_backfill_events([events[1]])  # a late duplicate
    job = await db.get_backfill_job(job_id)
    assert job.current_block == 190
    assert job.started_at == at(0)


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
async def test_status_error_and_eta_from_the_latest_event(
    db: DatabaseService, arrival: tuple[int, ...]
) -> None:
    job_id = uuid.uuid4()
    eta1 = datetime(2026, 12, 1, tzinfo=UTC)
    eta2 = datetime(2026, 12, 2, tzinfo=UTC)
    events = [
        progress(job_id, occurred_at=at(1), current_block=110, estimated_completion=eta1),
        progress(
            job_id, occurred_at=at(2), current_block=120, status="paused", estimated_completion=eta2
        ),
        progress(
            job_id,
            occurred_at=at(3),
            current_block=115,
            status="failed",
            error_message="node unreachable",
        ),
    ]
    await apply_each(db, [events[i] for i in arrival])
    job = await db.get_backfill_job(job_id)
    assert (job.status, job.error_message, job.estimated_completion) == (
        "failed",
        "node unreachable",
        None,
    )
    assert job.current_block == 120

    # A later event replaces all three, clearing the error.
    await db.apply_backfill_events(
        [progress(job_id, occurred_at=at(4), current_block=121, estimated_completion=eta1)]
    )
    job = await db.get_backfill_job(job_id)
    assert (job.status, job.error_message, job.estimated_completion) == ("running", None, eta1)


async def test_status_from_the_latest_event_in_one_batch(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    events = [
        progress(job_id, occurred_at=at(3), current_block=130, status="paused"),
        progress(
            job_id, occurred_at=at(1), current_block=110, status="failed", error_message="old"
        ),
        progress(job_id, occurred_at=at(2), current_block=120),
    ]
    await db.apply_backfill_events(events)
    job = await db.get_backfill_job(job_id)
    assert (job.status, job.error_message, job.current_block) == ("paused", None, 130)


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
async def test_completed_is_final(db: DatabaseService, arrival: tuple[int, ...]) -> None:
    job_id = uuid.uuid4()
    events = [
        progress(job_id, occurred_at=at(1), current_block=120),
        progress(job_id, occurred_at=at(2), current_block=150, status="completed"),
        # Later than the completion, but a completed job is never reopened.
        progress(
            job_id, occurred_at=at(3), current_block=160, status="failed", error_message="late"
        ),
    ]
    await apply_each(db, [events[i] for i in arrival])
    job = await db.get_backfill_job(job_id)
    assert job.status == "completed"
    assert job.current_block == job.end_block == 200
    assert job.progress_percentage == Decimal("100.00")
    assert job.completed_at == at(2)
    assert job.error_message is None
    assert job.started_at == at(1)


async def test_completed_at_is_the_completing_event(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    first = progress(job_id, occurred_at=at(5), current_block=200, status="completed")
    again = progress(job_id, occurred_at=at(9), current_block=200, status="completed")
    running = progress(job_id, occurred_at=at(7), current_block=170)
    await apply_each(db, [again, running, first])
    job = await db.get_backfill_job(job_id)
    assert (job.status, job.completed_at, job.current_block) == ("completed", at(5), 200)

    other = uuid.uuid4()
    batch = [
        progress(other, occurred_at=at(9), current_block=200, status="completed"),
        progress(other, occurred_at=at(5), current_block=190, status="completed"),
        progress(other, occurred_at=at(7), current_block=170),
    ]
    await db.apply_backfill_events(batch)
    job = await db.get_backfill_job(other)
    assert (job.status, job.completed_at, job.current_block) == ("completed", at(5), 200)


async def test_later_running_event_does_not_reopen_a_completed_job(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    await db.apply_backfill_events(
        [progress(job_id, occurred_at=at(1), current_block=150, status="completed")]
    )
    await db.apply_backfill_events([progress(job_id, occurred_at=at(2), current_block=180)])
    job = await db.get_backfill_job(job_id)
    assert (job.status, job.current_block, job.completed_at) == ("completed", 200, at(1))


@pytest.mark.parametrize(
    ("start", "current", "end", "expected"),
    [
        (100, 150, 200, "50.00"),
        (0, 1, 3, "33.33"),
        (0, 2, 3, "66.67"),
        (10, 10, 20, "0.00"),
        (10, 20, 20, "100.00"),
        (0, 1, 200_000, "0.00"),
        (0, 1999, 2000, "99.95"),
        (0, 1, MAX_BLOCK, "0.00"),
        (0, MAX_BLOCK - 1, MAX_BLOCK, "100.00"),
        (7, 7, 7, "100"),
        (MAX_BLOCK, MAX_BLOCK, MAX_BLOCK, "100"),
        (0, 0, 0, "100"),
    ],
)
async def test_progress_percentage(
    db: DatabaseService, start: int, current: int, end: int, expected: str
) -> None:
    job_id = uuid.uuid4()
    await db.apply_backfill_events(
        [
            progress(
                job_id,
                occurred_at=at(0),
                current_block=current,
                start_block=start,
                end_block=end,
            )
        ]
    )
    job = await db.get_backfill_job(job_id)
    assert job.progress_percentage == Decimal(expected)
    assert job.status == "running"


async def test_progress_percentage_follows_updates(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    for minute, block in enumerate([0, 1, 2]):
        await db.apply_backfill_events(
            [
                progress(
                    job_id, occurred_at=at(minute), current_block=block, start_block=0, end_block=3
                )
            ]
        )
        job = await db.get_backfill_job(job_id)
        assert job.progress_percentage == Decimal(["0.00", "33.33", "66.67"][minute])
    await db.apply_backfill_events(
        [
            progress(
                job_id,
                occurred_at=at(9),
                current_block=2,
                status="completed",
                start_block=0,
                end_block=3,
            )
        ]
    )
    assert (await db.get_backfill_job(job_id)).progress_percentage == Decimal("100.00")


async def test_started_at_and_created_by_from_the_earliest_event(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    late = progress(job_id, occurred_at=at(5), current_block=150, created_by="late")
    early = progress(job_id, occurred_at=at(1), current_block=110, created_by="early")
    middle = progress(job_id, occurred_at=at(3), current_block=130, created_by=None)
    await apply_each(db, [late, middle, early])
    job = await db.get_backfill_job(job_id)
    assert (job.started_at, job.created_by) == (at(1), "early")


@pytest.mark.parametrize(
    "fixed",
    [
        pytest.param({"job_type": "transactions"}, id="job_type"),
        pytest.param({"start_block": 99}, id="start_block"),
        pytest.param({"end_block": 201}, id="end_block"),
    ],
)
async def test_conflicting_fixed_fields_are_failures_of_their_own_index(
    db: DatabaseService, fixed: dict[str, Any]
) -> None:
    job_id, other_id = uuid.uuid4(), uuid.uuid4()
    await db.apply_backfill_events([progress(job_id, occurred_at=at(0), current_block=110)])

    batch = [
        progress(job_id, occurred_at=at(1), current_block=120),
        progress(job_id, occurred_at=at(2), current_block=150, status="failed", **fixed),
        progress(other_id, occurred_at=at(1), current_block=130),
        progress(job_id, occurred_at=at(3), current_block=140, status="paused", **fixed),
    ]
    outcome = await db.apply_backfill_events(batch)

    assert sorted(outcome.failures) == [1, 3]
    for error in outcome.failures.values():
        assert isinstance(error, ConflictError)
        assert error.reason == "conflict"
        assert str(job_id) in error.detail
        assert "job_type='blocks', start_block=100, end_block=200" in error.detail
    assert outcome.cache_keys == frozenset({f"backfill:job:{job_id}", f"backfill:job:{other_id}"})

    job = await db.get_backfill_job(job_id)
    # The agreeing event applied; the conflicting ones changed nothing.
    assert (job.job_type, job.start_block, job.end_block) == ("blocks", 100, 200)
    assert (job.current_block, job.status, job.started_at) == (120, "running", at(0))
    assert (await db.get_backfill_job(other_id)).current_block == 130


async def test_a_conflict_only_batch_touches_nothing(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    await db.apply_backfill_events([progress(job_id, occurred_at=at(0), current_block=110)])
    outcome = await db.apply_backfill_events(
        [progress(job_id, occurred_at=at(1), current_block=190, end_block=300)]
    )
    assert list(outcome.failures) == [0]
    assert outcome.cache_keys == frozenset()
    assert (await db.get_backfill_job(job_id)).current_block == 110


@pytest.mark.parametrize("first_variant", [0, 1])
async def test_conflicting_variants_inside_one_batch(
    db: DatabaseService, first_variant: int
) -> None:
    """The first variant seen of a new job is applied; the other one conflicts."""
    job_id = uuid.uuid4()
    variants: list[dict[str, Any]] = [
        {"end_block": 200},
        {"end_block": 300, "job_type": "transactions"},
    ]
    a, b = variants[first_variant], variants[1 - first_variant]
    batch = [
        progress(job_id, occurred_at=at(1), current_block=150, **a),
        progress(job_id, occurred_at=at(2), current_block=190, **b),
        progress(job_id, occurred_at=at(3), current_block=160, **a),
        progress(job_id, occurred_at=at(0), current_block=105, **b),
    ]
    outcome = await db.apply_backfill_events(batch)
    assert sorted(outcome.failures) == [1, 3]
    assert all(isinstance(e, ConflictError) for e in outcome.failures.values())

    job = await db.get_backfill_job(job_id)
    assert job.end_block == a["end_block"]
    assert job.job_type == a.get("job_type", "blocks")
    assert (job.current_block, job.started_at) == (160, at(1))


async def test_unknown_job_is_not_found(db: DatabaseService) -> None:
    unknown = uuid.uuid4()
    with pytest.raises(NotFoundError, match=str(unknown)):
        await db.get_backfill_job(unknown)
    with pytest.raises(NotFoundError):
        await db.update_backfill_progress(unknown, 5)
    with pytest.raises(NotFoundError):
        await db.complete_backfill_job(unknown)
    with pytest.raises(NotFoundError):
        await db.fail_backfill_job(unknown, "boom")
    assert await db.list_backfill_jobs() == []


async def test_operations_lifecycle(db: DatabaseService) -> None:
    before = datetime.now(UTC)
    job = await db.create_backfill_job(
        job_type="blocks", start_block=1000, end_block=2000, created_by="ops"
    )
    assert (job.status, job.current_block, job.progress_percentage) == (
        "running",
        1000,
        Decimal("0.00"),
    )
    assert job.created_by == "ops"
    assert before <= job.started_at <= datetime.now(UTC)
    assert job.completed_at is None

    eta = datetime(2027, 1, 1, tzinfo=UTC)
    job = await db.update_backfill_progress(job.job_id, 1500, estimated_completion=eta)
    assert (job.current_block, job.progress_percentage, job.estimated_completion) == (
        1500,
        Decimal("50.00"),
        eta,
    )
    # A lower block never moves the job back; the status still follows the latest call.
    job = await db.update_backfill_progress(job.job_id, 1200, status="paused")
    assert (job.current_block, job.status, job.estimated_completion) == (1500, "paused", None)

    failed = await db.fail_backfill_job(job.job_id, "disk full")
    assert (failed.status, failed.error_message, failed.current_block) == (
        "failed",
        "disk full",
        1500,
    )

    done = await db.complete_backfill_job(job.job_id)
    assert (done.status, done.current_block, done.progress_percentage) == (
        "completed",
        2000,
        Decimal("100.00"),
    )
    assert done.error_message is None
    assert done.completed_at is not None and done.completed_at >= failed.started_at
    assert done.started_at == job.started_at

    # Completed is final for the operations too.
    after = await db.fail_backfill_job(job.job_id, "too late")
    assert (after.status, after.error_message, after.completed_at) == (
        "completed",
        None,
        done.completed_at,
    )
    after = await db.update_backfill_progress(job.job_id, 1999)
    assert (after.status, after.current_block) == ("completed", 2000)


async def test_create_backfill_job_with_given_id_and_conflict(db: DatabaseService) -> None:
    job_id = uuid.uuid4()
    job = await db.create_backfill_job(
        job_type="blocks", start_block=0, end_block=10, job_id=job_id
    )
    assert job.job_id == job_id
    with pytest.raises(ConflictError):
        await db.create_backfill_job(job_type="blocks", start_block=0, end_block=11, job_id=job_id)
    assert (await db.get_backfill_job(job_id)).end_block == 10


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"job_type": "", "start_block": 0, "end_block": 1}, id="empty-type"),
        pytest.param({"job_type": "b", "start_block": 5, "end_block": 1}, id="end-before-start"),
        pytest.param({"job_type": "b", "start_block": -1, "end_block": 1}, id="negative"),
    ],
)
async def test_create_backfill_job_validates(
    db: DatabaseService, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        await db.create_backfill_job(**arguments)
    assert await db.list_backfill_jobs() == []


async def test_update_beyond_end_block_is_refused(db: DatabaseService) -> None:
    job = await db.create_backfill_job(job_type="blocks", start_block=0, end_block=10)
    with pytest.raises(ValidationError, match="current_block"):
        await db.update_backfill_progress(job.job_id, 11)
    assert (await db.get_backfill_job(job.job_id)).current_block == 0


async def test_list_backfill_jobs_filters_order_and_limit(db: DatabaseService) -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    specs = [
        ("blocks", "running"),
        ("blocks", "failed"),
        ("transactions", "running"),
        ("transactions", "completed"),
        ("blocks", "running"),
    ]
    events = [
        progress(job_id, occurred_at=at(i), current_block=150, job_type=t, status=s)
        for i, (job_id, (t, s)) in enumerate(zip(ids, specs, strict=True))
    ]
    await db.apply_backfill_events(events)

    everything = await db.list_backfill_jobs()
    assert [j.job_id for j in everything] == list(reversed(ids))  # most recently started first
    assert [j.job_id for j in await db.list_backfill_jobs(status="running")] == [
        ids[4],
        ids[2],
        ids[0],
    ]
    assert [j.job_id for j in await db.list_backfill_jobs(job_type="transactions")] == [
        ids[3],
        ids[2],
    ]
    assert [j.job_id for j in await db.list_backfill_jobs(status="running", job_type="blocks")] == [
        ids[4],
        ids[0],
    ]
    assert [j.job_id for j in await db.list_backfill_jobs(limit=2)] == [ids[4], ids[3]]
    assert await db.list_backfill_jobs(status="paused") == []
    assert await db.list_backfill_jobs(job_type="nope") == []
    completed = await db.list_backfill_jobs(status="completed")
    assert [(j.current_block, j.completed_at) for j in completed] == [(200, at(3))]
    for bad in (0, 1001):
        with pytest.raises(ValidationError, match="limit"):
            await db.list_backfill_jobs(limit=bad)


async def test_text_is_stored_byte_for_byte(db: DatabaseService, engine: AsyncEngine) -> None:
    job_id = uuid.uuid4()
    job_type = "😀" * 50
    created_by = " é\t" * 33 + "x"
    error = "  line one\r\nline two 🚀  "
    await db.apply_backfill_events(
        [
            progress(
                job_id,
                occurred_at=at(0),
                current_block=100,
                job_type=job_type,
                created_by=created_by,
                status="failed",
                error_message=error,
            )
        ]
    )
    job = await db.get_backfill_job(job_id)
    assert (job.job_type, job.created_by, job.error_message) == (job_type, created_by, error)
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT convert_to(error_message, 'UTF8') FROM backfill_jobs WHERE id = :i"),
                {"i": job_id},
            )
        ).scalar()
    assert stored == error.encode("utf-8")


async def test_concurrent_batches_equal_sequential_application(db: DatabaseService) -> None:
    rng = random.Random(20261121)
    jobs = 12

    def events_for(job_ids: list[uuid.UUID]) -> list[list[BackfillProgressEvent]]:
        # Distinct times per job (no ties), so the result cannot depend on the id.
        batches: list[list[BackfillProgressEvent]] = [[] for _ in range(4)]
        for j, job_id in enumerate(job_ids):
            for minute in range(8):
                status = ["running", "paused", "failed", "running"][minute % 4]
                if j % 3 == 0 and minute == 6:
                    status = "completed"
                event = progress(
                    job_id,
                    occurred_at=at(minute * 10 + j),
                    current_block=100 + (minute * 37 + j * 11) % 101,
                    status=status,
                    error_message=f"e{minute}" if status == "failed" else None,
                    created_by=f"u{minute}",
                )
                batches[rng.randrange(4)].append(event)
        for batch in batches:
            rng.shuffle(batch)
        return batches

    for round_ in range(3):
        concurrent_ids = [uuid.uuid4() for _ in range(jobs)]
        sequential_ids = [uuid.uuid4() for _ in range(jobs)]
        batches = events_for(concurrent_ids)
        outcomes = await asyncio.gather(*(db.apply_backfill_events(b) for b in batches))
        assert all(o.failures == {} for o in outcomes)

        mirror = {c: s for c, s in zip(concurrent_ids, sequential_ids, strict=True)}
        for batch in batches:
            await db.apply_backfill_events(
                [e.model_copy(update={"job_id": mirror[e.job_id]}) for e in batch]
            )
        for c, s in mirror.items():
            concurrent = state(await db.get_backfill_job(c))
            sequential = state(await db.get_backfill_job(s))
            assert concurrent == sequential, round_
