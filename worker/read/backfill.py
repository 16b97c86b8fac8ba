"""Queries on ``backfill_jobs``: one job, or a filtered list, as the API returns them."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.backfill import BackfillJobResponse, BackfillStatus
from worker.storage.tables import backfill_jobs

_RESPONSE_COLUMNS = (
    backfill_jobs.c.id.label("job_id"),
    backfill_jobs.c.job_type,
    backfill_jobs.c.start_block,
    backfill_jobs.c.end_block,
    backfill_jobs.c.current_block,
    backfill_jobs.c.status,
    backfill_jobs.c.progress_percentage,
    backfill_jobs.c.estimated_completion,
    backfill_jobs.c.error_message,
    backfill_jobs.c.started_at,
    backfill_jobs.c.completed_at,
    backfill_jobs.c.created_by,
)


async def get_job(conn: AsyncConnection, job_id: UUID) -> BackfillJobResponse | None:
    row = (
        await conn.execute(select(*_RESPONSE_COLUMNS).where(backfill_jobs.c.id == job_id))
    ).one_or_none()
    return None if row is None else BackfillJobResponse.model_validate(dict(row._mapping))


async def list_jobs(
    conn: AsyncConnection,
    *,
    status: BackfillStatus | None = None,
    job_type: str | None = None,
    limit: int = 50,
) -> list[BackfillJobResponse]:
    """Jobs, most recently started first."""
    query = (
        select(*_RESPONSE_COLUMNS)
        .order_by(backfill_jobs.c.started_at.desc(), backfill_jobs.c.id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(backfill_jobs.c.status == status)
    if job_type is not None:
        query = query.where(backfill_jobs.c.job_type == job_type)
    rows = await conn.execute(query)
    return [BackfillJobResponse.model_validate(dict(r._mapping)) for r in rows]
