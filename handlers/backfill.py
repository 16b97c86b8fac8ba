"""``backfill-progress``: one row per job, whatever the order of its events.

The merge is order-free because every field is a min or max over a total order of
events, ``(occurred_at, event_key)``:

- ``current_block``: the largest seen (``end_block`` once completed);
- ``status``, ``error_message``, ``estimated_completion``: from the latest event,
  unless a ``completed`` event exists, in which case from the earliest completed
  one (completed is final);
- ``started_at`` and ``created_by``: from the earliest event;
- ``completed_at``: ``occurred_at`` of the earliest completed event.

The same rules are written twice on purpose: in Python to fold a batch into one row
per job (one upsert may touch a row only once), and in SQL to merge that row into the
stored one under the row lock, so concurrent workers cannot race.

``job_type``, ``start_block`` and ``end_block`` never change: an event that disagrees
with the stored job is a ``ConflictError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.events import EventHandler, event_key
from schemas.backfill import BackfillProgressEvent, BackfillStatus
from schemas.cache_keys import job_cache_key
from worker.exceptions import ConflictError
from worker.pipeline.handler import BatchOutcome
from worker.storage.database import driver_connection
from worker.topics import Topic

DEFAULT_RETENTION_DAYS = 180
"""BACKFILL_RETENTION_DAYS's default (CONTRACT.md)."""


@dataclass(frozen=True)
class _Keyed:
    event: BackfillProgressEvent
    key: bytes

    @property
    def order(self) -> tuple[datetime, bytes]:
        return (self.event.occurred_at, self.key)


@dataclass(frozen=True)
class _Row:
    """The net effect of a group of events of one job that agree on its fixed fields."""

    job_id: UUID
    job_type: str
    start_block: int
    end_block: int
    current_block: int
    status: BackfillStatus
    error_message: str | None
    estimated_completion: datetime | None
    started_at: datetime
    completed_at: datetime | None
    created_by: str | None
    status_event_at: datetime
    status_event_key: bytes
    first_event_key: bytes
    completing_event_key: bytes | None


def _fold(group: Sequence[_Keyed]) -> _Row:
    ordered = sorted(group, key=lambda k: k.order)
    first, latest = ordered[0], ordered[-1]
    completing = next((k for k in ordered if k.event.status == "completed"), None)
    decisive = completing or latest
    e = decisive.event
    return _Row(
        job_id=e.job_id,
        job_type=e.job_type,
        start_block=e.start_block,
        end_block=e.end_block,
        current_block=e.end_block if completing else max(k.event.current_block for k in group),
        status=e.status,
        error_message=e.error_message,
        estimated_completion=e.estimated_completion,
        started_at=first.event.occurred_at,
        completed_at=completing.event.occurred_at if completing else None,
        created_by=first.event.created_by,
        status_event_at=e.occurred_at,
        status_event_key=decisive.key,
        first_event_key=first.key,
        completing_event_key=completing.key if completing else None,
    )


# Which side decides status, error_message, estimated_completion: the earliest
# completing event if either side has one, else the later status event.
_NEW_DECIDES = """CASE
    WHEN j.completed_at IS NOT NULL AND EXCLUDED.completed_at IS NOT NULL THEN
        (EXCLUDED.completed_at, EXCLUDED.completing_event_key)
            < (j.completed_at, j.completing_event_key)
    WHEN j.completed_at IS NOT NULL THEN false
    WHEN EXCLUDED.completed_at IS NOT NULL THEN true
    ELSE (EXCLUDED.status_event_at, EXCLUDED.status_event_key)
        > (j.status_event_at, j.status_event_key)
END"""
_NEW_IS_FIRST = (
    "(EXCLUDED.started_at, EXCLUDED.first_event_key) < (j.started_at, j.first_event_key)"
)
_COMPLETED = "(j.completed_at IS NOT NULL OR EXCLUDED.completed_at IS NOT NULL)"
_CURRENT = f"""CASE WHEN {_COMPLETED} THEN j.end_block
    ELSE GREATEST(j.current_block, EXCLUDED.current_block) END"""


def _progress(current: str, start: str, end: str) -> str:
    return f"""CASE WHEN {end} = {start} THEN 100
    ELSE round(({current} - {start})::numeric * 100 / ({end} - {start}), 2) END"""


def _pick(condition: str, column: str) -> str:
    return f"{column} = CASE WHEN {condition} THEN EXCLUDED.{column} ELSE j.{column} END"


UPSERT_SQL = f"""
INSERT INTO backfill_jobs AS j
    (id, job_type, start_block, end_block, current_block, status, progress_percentage,
     error_message, estimated_completion, started_at, completed_at, created_by,
     status_event_at, status_event_key, first_event_key, completing_event_key)
SELECT t.id, t.job_type, t.start_block, t.end_block, t.current_block, t.status,
       {_progress("t.current_block", "t.start_block", "t.end_block")},
       t.error_message, t.estimated_completion, t.started_at, t.completed_at, t.created_by,
       t.status_event_at, t.status_event_key, t.first_event_key, t.completing_event_key
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::int[], $6::text[], $7::text[],
            $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::text[],
            $12::timestamptz[], $13::bytea[], $14::bytea[], $15::bytea[])
    AS t(id, job_type, start_block, end_block, current_block, status, error_message,
         estimated_completion, started_at, completed_at, created_by,
         status_event_at, status_event_key, first_event_key, completing_event_key)
ORDER BY t.id
ON CONFLICT ON CONSTRAINT pk_backfill_jobs DO UPDATE SET
    current_block = {_CURRENT},
    progress_percentage = {_progress(_CURRENT, "j.start_block", "j.end_block")},
    {_pick(_NEW_DECIDES, "status")},
    {_pick(_NEW_DECIDES, "error_message")},
    {_pick(_NEW_DECIDES, "estimated_completion")},
    {_pick(_NEW_DECIDES, "status_event_at")},
    {_pick(_NEW_DECIDES, "status_event_key")},
    completed_at = CASE WHEN {_NEW_DECIDES} THEN EXCLUDED.completed_at
                        ELSE j.completed_at END,
    completing_event_key = CASE WHEN {_NEW_DECIDES} THEN EXCLUDED.completing_event_key
                                ELSE j.completing_event_key END,
    {_pick(_NEW_IS_FIRST, "created_by")},
    {_pick(_NEW_IS_FIRST, "first_event_key")},
    started_at = LEAST(j.started_at, EXCLUDED.started_at)
WHERE (j.job_type, j.start_block, j.end_block)
    = (EXCLUDED.job_type, EXCLUDED.start_block, EXCLUDED.end_block)
RETURNING j.id
"""


def _rounds(
    keyed: Sequence[tuple[int, _Keyed]],
) -> list[dict[tuple[UUID, str, int, int], list[tuple[int, _Keyed]]]]:
    """Split the batch so that each round holds at most one fixed-field variant per job.

    Events that disagree with each other inside one batch are rare (a publisher bug),
    but must not be merged: the first variant seen is applied first, and the others
    then conflict with whatever is stored, exactly as if they had come later.
    """
    variants: dict[UUID, list[tuple[str, int, int]]] = {}
    rounds: list[dict[tuple[UUID, str, int, int], list[tuple[int, _Keyed]]]] = []
    for index, item in keyed:
        e = item.event
        fixed = (e.job_type, e.start_block, e.end_block)
        seen = variants.setdefault(e.job_id, [])
        if fixed not in seen:
            seen.append(fixed)
        position = seen.index(fixed)
        while len(rounds) <= position:
            rounds.append({})
        rounds[position].setdefault((e.job_id, *fixed), []).append((index, item))
    return rounds


CONFLICTING_JOBS_SQL = """
SELECT id, job_type, start_block, end_block FROM backfill_jobs WHERE id = ANY($1::uuid[])
"""


async def _describe_conflicts(conn: AsyncConnection, job_ids: set[UUID]) -> dict[UUID, str]:
    driver = await driver_connection(conn)
    rows = await driver.fetch(CONFLICTING_JOBS_SQL, list(job_ids))
    return {
        r["id"]: (
            f"job_type/start_block/end_block disagree with stored job {r['id']} "
            f"(stored job_type={r['job_type']!r}, start_block={r['start_block']}, "
            f"end_block={r['end_block']})"
        )
        for r in rows
    }


async def write(conn: AsyncConnection, events: Sequence[BackfillProgressEvent]) -> BatchOutcome:
    """Merge a batch of progress events; conflicting events come back as failures."""
    keyed = [(i, _Keyed(e, event_key(e))) for i, e in enumerate(events)]
    failures: dict[int, ConflictError] = {}
    touched: set[UUID] = set()
    for groups in _rounds(keyed):
        rows = sorted((_fold([k for _, k in g]) for g in groups.values()), key=lambda r: r.job_id)
        applied = await _upsert(conn, rows)
        rejected = {
            (r.job_id, r.job_type, r.start_block, r.end_block)
            for r in rows
            if r.job_id not in applied
        }
        touched.update(applied)
        if not rejected:
            continue
        details = await _describe_conflicts(conn, {job for job, *_ in rejected})
        for variant, members in groups.items():
            if variant in rejected:
                for index, _ in members:
                    failures[index] = ConflictError(details.get(variant[0], "conflict"))
    return BatchOutcome(
        failures=dict(failures),
        cache_keys=frozenset(job_cache_key(job) for job in touched),
    )


async def _upsert(conn: AsyncConnection, rows: Sequence[_Row]) -> set[UUID]:
    driver = await driver_connection(conn)
    records = await driver.fetch(
        UPSERT_SQL,
        [r.job_id for r in rows],
        [r.job_type for r in rows],
        [r.start_block for r in rows],
        [r.end_block for r in rows],
        [r.current_block for r in rows],
        [r.status for r in rows],
        [r.error_message for r in rows],
        # Aware datetimes: asyncpg converts them to UTC itself.
        [r.estimated_completion for r in rows],
        [r.started_at for r in rows],
        [r.completed_at for r in rows],
        [r.created_by for r in rows],
        [r.status_event_at for r in rows],
        [r.status_event_key for r in rows],
        [r.first_event_key for r in rows],
        [r.completing_event_key for r in rows],
    )
    return {rec["id"] for rec in records}


class BackfillHandler(EventHandler[BackfillProgressEvent]):
    """The ``backfill-progress`` topic (BACKFILL_RETENTION_DAYS is its ``max_age``).
    An old event is ``expired`` whatever its status: its job may have finished and
    been archived, and the event would recreate it."""

    topic = "backfill-progress"
    table = "backfill_jobs"

    def __init__(self, max_age: timedelta = timedelta(days=DEFAULT_RETENTION_DAYS)) -> None:
        super().__init__(BackfillProgressEvent, max_age, write)


TOPIC = Topic(
    name="backfill-progress",
    subscription="backfill-progress-worker",
    build_handler=lambda context: BackfillHandler(
        timedelta(days=context.settings.backfill_retention_days)
    ),
)
