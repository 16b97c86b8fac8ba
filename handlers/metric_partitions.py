"""The month partitions of ``system_metrics``: made ahead at start-up and ``migrate``,
and on demand when a batch meets a month without one."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.storage.database import driver_connection, transaction

MONTHS_AHEAD = 3
"""Partitions made ahead: this month and the next three (start-up and ``migrate``)."""

ENSURE_PARTITIONS_SQL = """
SELECT ensure_system_metrics_partition(m) FROM unnest($1::timestamptz[]) AS m
"""


def _month(moment: datetime) -> tuple[int, int]:
    utc_moment = moment.astimezone(UTC)
    return (utc_moment.year, utc_moment.month)


async def create_partitions(engine: AsyncEngine, moments: Iterable[datetime]) -> None:
    """Create the month partitions ``moments`` fall in, where missing.

    Idempotent and safe under concurrency (the database function takes an advisory
    lock). A short transaction of its own, never inside a batch's, so the parent
    table's lock is not held while rows are written.
    """
    firsts = [datetime(y, m, 1, tzinfo=UTC) for y, m in sorted({_month(t) for t in moments})]
    if not firsts:
        return
    async with transaction(engine) as conn:
        driver = await driver_connection(conn)
        await driver.execute(ENSURE_PARTITIONS_SQL, firsts)


async def ensure_months_ahead(engine: AsyncEngine, months: int = MONTHS_AHEAD) -> None:
    """Create the partitions of this month and the next ``months`` (startup, migrate)."""
    # From the 1st: 31-day steps from, say, Jan 31 would land in March, skipping February.
    first = datetime.now(UTC).replace(day=1)
    await create_partitions(engine, [first + timedelta(days=31 * i) for i in range(months + 1)])
