"""The ``retention`` benchmark's data, seeded server-side into its scratch database.

``ARCHIVED_ROWS`` (2M) ``system_metrics`` rows past the 90-day window, each with its
``system_metric_ids`` row, in two parts so that both of retention's paths run:
``WHOLE_MONTHS`` whole months before the month the cutoff falls in (exported, then
their partitions dropped) hold ``MONTH_ROWS`` each, and that month holds
``PARTIAL_ROWS`` from its first day to an hour before the cutoff (archived by chunked
DELETE); a ``Layout`` may hold other counts (the ingestion part's data).
``IN_WINDOW_ROWS`` more lie from a day after the cutoff to an hour ago: they stay.
Rows are ``bench.backup_data.METRICS_SQL``'s (16 services, 8 metric types, values and
JSONB metadata varied by a hash of the row number); a round of seeding takes new row
numbers, so new ids. Then ``VACUUM (FREEZE, ANALYZE)`` (no reader sets hint bits
during a timed part) and a checkpoint.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.backup_data import METRICS_SQL
from bench.common import _as_admin, asyncpg_dsn
from worker.config import Settings

WINDOW_DAYS = 90  # METRICS_RETENTION_DAYS' default, which the worker's runs keep
WHOLE_MONTHS = 4
MONTH_ROWS = 400_000
PARTIAL_ROWS = 400_000
ARCHIVED_ROWS = WHOLE_MONTHS * MONTH_ROWS + PARTIAL_ROWS
IN_WINDOW_ROWS = 100_000
STATEMENT_ROWS = 100_000  # rows of one INSERT
ROUND_ROWS = 10_000_000  # row numbers of a round of seeding: each round's ids are new
GENERATORS = 2  # connections inserting at once: one per core
# Cutoffs move on while the benchmark runs: seeded rows keep this far from them.
MARGIN = timedelta(hours=1)

Span = tuple[datetime, datetime, int]  # [start, end) and the rows spread over it


def say(text: str) -> None:
    """A progress line on stderr (stdout is for the JSON lines)."""
    print(f"retention: {text}", file=sys.stderr, flush=True)


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _months_back(month: datetime, count: int) -> datetime:
    months = month.year * 12 + month.month - 1 - count
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Layout:
    """Where the rows go, from the cutoff a run would use at ``now``."""

    now: datetime
    whole_months: int = WHOLE_MONTHS
    month_rows: int = MONTH_ROWS
    partial_rows: int = PARTIAL_ROWS

    @property
    def cutoff(self) -> datetime:
        return self.now - timedelta(days=WINDOW_DAYS)

    def spans(self) -> list[Span]:
        partial = _month_start(self.cutoff)
        if self.cutoff - MARGIN <= partial:
            raise RuntimeError("the cutoff is within the hour after a month's start: run later")
        whole = [
            (_months_back(partial, m), _months_back(partial, m - 1), self.month_rows)
            for m in range(self.whole_months, 0, -1)
        ]
        in_window = (self.cutoff + timedelta(days=1), self.now - MARGIN, IN_WINDOW_ROWS)
        return [*whole, (partial, self.cutoff - MARGIN, self.partial_rows), in_window]

    def months(self) -> list[datetime]:
        """The first day of every month the rows fall in."""
        first, last = _months_back(_month_start(self.cutoff), self.whole_months), self.now
        months = [first]
        while months[-1] < _month_start(last):
            months.append(_months_back(months[-1], -1))
        return months


def _statements(layout: Layout, round_no: int) -> list[tuple[datetime, int, int, float, int]]:
    """METRICS_SQL's arguments, ``STATEMENT_ROWS`` rows each: (span start, first row,
    last row, seconds between rows, the span's first row)."""
    todo = []
    base = round_no * ROUND_ROWS
    for start, end, rows in layout.spans():
        # A row's jitter adds up to 1 s: the last one stays before ``end``.
        step_s = ((end - start).total_seconds() - 1) / rows
        for first in range(0, rows, STATEMENT_ROWS):
            last = min(first + STATEMENT_ROWS, rows) - 1
            todo.append((start, base + first, base + last, step_s, base))
        base += rows
    return todo


async def seed(settings: Settings, layout: Layout, round_no: int) -> None:
    """Insert the layout's rows (round ``round_no``'s row numbers), then vacuum,
    analyse and checkpoint."""
    started = time.monotonic()
    conns = [await asyncpg.connect(asyncpg_dsn(settings)) for _ in range(GENERATORS)]
    try:
        for month in layout.months():
            await conns[0].execute("SELECT ensure_system_metrics_partition($1)", month)
        pending = _statements(layout, round_no)
        total = len(pending)

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.execute("SET synchronous_commit = off")
            while pending:
                await conn.execute(METRICS_SQL, *pending.pop(0))
                done = total - len(pending)
                say(f"seed round {round_no}: {done}/{total} ({time.monotonic() - started:.0f} s)")

        await asyncio.gather(*(insert(conn) for conn in conns))
        vacuum = [f"VACUUM (FREEZE, ANALYZE) {t}" for t in ("system_metrics", "system_metric_ids")]
        await asyncio.gather(*(conn.execute(sql) for conn, sql in zip(conns, vacuum, strict=True)))
    finally:
        for conn in conns:
            await conn.close()
    await _as_admin("CHECKPOINT")
    say(f"seeded round {round_no} in {time.monotonic() - started:.0f} s")
