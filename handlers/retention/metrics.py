"""How ``system_metrics`` leaves: whole months and the cutoff's month, several at once.

Each month is one ordered COPY (``chunking``): PostgreSQL sorts it and builds its
lines, the worker compresses, writes and reads back its chunks. One month at a time
leaves one side idle while the other works (the server sorts before the first line
goes out), so several months go at once (``RETENTION_STREAMS``, 3 by default: two keep
both cores of this machine kind busy, a third evens out the end of the run), each on
a connection of its own, taking the next month as they finish. The cutoff's month goes
first (the longest: its chunks' rows are deleted one transaction each, on one more
connection, ``deleter``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

from handlers.retention import partitions, stream
from handlers.retention.sweep import Sweep
from worker.storage import inventory

Month = tuple[str, datetime, datetime]


async def archive_metrics(
    conn: Any, sweep: Sweep, before: datetime, database_url: str, streams: int
) -> None:
    """Archive every sample older than ``before``, ``streams`` months at once, then
    forget their identities."""
    older = await partitions.older_partitions(conn, before)
    months: Iterator[Month] = iter(older.whole)  # shared: each month goes to one stream

    async def whole_months(on: Any) -> None:
        for name, start, end in months:
            await partitions.archive_month(on, sweep, name)
            await partitions.forget_identities(on, end, since=start)

    async def cutoffs_month_first(on: Any, deleter: Any) -> None:
        for name in older.partial:
            await stream.archive_older_samples(on, deleter, sweep, name, before)
            bounds = partitions.month_bounds(name)
            if bounds is not None:
                await partitions.forget_identities(on, before, since=bounds[0])
        await whole_months(on)

    async with _connections(database_url, streams) as (deleter, *others):
        try:
            async with asyncio.TaskGroup() as at_once:
                at_once.create_task(cutoffs_month_first(conn, deleter))
                for other in others[: streams - 1]:
                    at_once.create_task(whole_months(other))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the other streams were cancelled by it
    # Identities of samples no month above held (none, unless a partition is not one
    # of the months): every identity older than the cutoff goes.
    await partitions.forget_identities(conn, before)


@contextlib.asynccontextmanager
async def _connections(database_url: str, count: int) -> AsyncIterator[list[Any]]:
    """``count`` more maintenance connections, their times in UTC (archive lines' times
    end in +00:00)."""
    async with contextlib.AsyncExitStack() as stack:
        opened = []
        for _ in range(count):
            conn = await stack.enter_async_context(inventory.connect(database_url))
            await conn.execute("SET TIME ZONE 'UTC'")
            await conn.execute("SET max_parallel_workers_per_gather = 0")
            opened.append(conn)
        yield opened
