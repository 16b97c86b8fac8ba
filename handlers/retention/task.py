"""The retention run: every table's rows past its window, archived, checked, deleted.

The scheduled message (through the ``maintenance`` handler) and ``utxoiq-worker
retention run`` both call ``run_retention`` inside the run ledger. One retention run
at a time holds an advisory lock for its whole length, whatever its day: the sweep of
unrecorded objects at its start must never meet another run's chunk in progress.
A dry run counts, per table and month, what a run would archive, and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.maintenance_runs import RunKey, RunResult
from handlers.retention import chunks
from handlers.retention.metrics import archive_metrics
from handlers.retention.sweep import Note, Sweep, sweep_table
from handlers.retention.tables import METRICS, TABLES, TableSpec, spec
from worker.config import Settings
from worker.pipeline.crash_points import CrashPoints
from worker.storage import inventory
from worker.storage.objects import ObjectStore, open_store

log = logging.getLogger(__name__)

# pg_advisory_lock's key for "a retention run is under way" (any stable bigint).
RUN_LOCK = 0x7574786F_72657431  # "utxoret1"


def archive_store(settings: Settings) -> ObjectStore:
    return open_store(settings.archive_url)


def cutoff(table: TableSpec, settings: Settings, now: datetime) -> datetime:
    """Rows older than this leave: one window before ``now``, to the microsecond."""
    return now - timedelta(days=table.window_days(settings))


def tables_of(run: RunKey) -> list[TableSpec]:
    """``retention`` is every table; ``retention:<table>`` one of them."""
    _, _, only = run.task.partition(":")
    return [spec(only)] if only else list(TABLES.values())


async def run_retention(
    settings: Settings,
    run: RunKey,
    attempt: int,
    *,
    note: Note,
    crash_points: CrashPoints,
    now: datetime | None = None,
) -> RunResult:
    """One attempt of retention run ``run``."""
    moment = now or datetime.now(UTC)
    store = archive_store(settings)
    try:
        async with inventory.connect(settings.database_url) as conn:
            await conn.execute("SET TIME ZONE 'UTC'")  # archive lines' times end in +00:00
            await conn.execute("SET max_parallel_workers_per_gather = 0")
            await conn.execute("SELECT pg_advisory_lock($1)", RUN_LOCK)
            swept = await chunks.sweep_unrecorded(conn, store)
            sweep = Sweep(store, f"{run} attempt {attempt}", note, crash_points)
            for table in tables_of(run):
                before = cutoff(table, settings, moment)
                await _archive_table(conn, sweep, table, before, settings)
            objects, row_counts = await _archived_by(conn, store, run)
    finally:
        store.close()
    details = {"unrecorded_objects_removed": swept, "this_attempt": sweep.archived}
    return RunResult(objects=objects, row_counts=row_counts, details=details)


ARCHIVED_BY_RUN = """
SELECT object_key, table_name, rows, sha256 FROM archive_chunks
WHERE state = 'archived' AND starts_with(run, $1) ORDER BY table_name, first_at
"""


async def _archived_by(
    conn: Any, store: ObjectStore, run: RunKey
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every object the run archived, over all its attempts (an attempt killed after a
    commit archived rows too), and the rows per table: what the ledger records."""
    objects: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for row in await conn.fetch(ARCHIVED_BY_RUN, f"{run} attempt "):
        objects.append(
            {
                "uri": store.uri(row["object_key"]),
                "table": row["table_name"],
                "rows": row["rows"],
                "sha256": row["sha256"],
            }
        )
        counts[row["table_name"]] = counts.get(row["table_name"], 0) + int(row["rows"])
    return objects, counts


async def _archive_table(
    conn: Any, sweep: Sweep, table: TableSpec, before: datetime, settings: Settings
) -> None:
    if table is not METRICS:
        await sweep_table(conn, sweep, table, before)
        return
    await archive_metrics(conn, sweep, before, settings.database_url, settings.retention_streams)


COUNT_SQL = """
SELECT to_char(date_trunc('month', "{age}" AT TIME ZONE 'UTC'), 'YYYY-MM') AS month,
       count(*) AS n
FROM {table} WHERE {eligible} AND "{age}" < $1 GROUP BY 1 ORDER BY 1
"""


async def dry_run(
    settings: Settings, tables: Sequence[TableSpec], now: datetime | None = None
) -> dict[str, dict[str, int]]:
    """What a run would archive now: rows per table and UTC month. Changes nothing."""
    moment = now or datetime.now(UTC)
    counts: dict[str, dict[str, int]] = {}
    async with inventory.connect(settings.database_url) as conn:
        for table in tables:
            sql = COUNT_SQL.format(age=table.age_column, table=table.name, eligible=table.eligible)
            rows = await conn.fetch(sql, cutoff(table, settings, moment))
            counts[table.name] = {row["month"]: int(row["n"]) for row in rows}
    log.info("retention dry run", extra={"would_archive": counts})
    return counts
