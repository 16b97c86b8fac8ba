"""Whole metrics months past the window: exported chunk by chunk, then dropped.

Every row of such a month is older than the window, so ingestion never writes to it
again (``expired``), and it can be read without locks, in one ordered COPY cut into
chunks. Its chunks are exported, read back and recorded as ``exported``; then one
transaction detaches and drops the partition and marks them ``archived``. A crash
before that commit leaves the month in place and its objects unrecorded as archived:
the next run deletes them and starts the month again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from handlers.retention import archive
from handlers.retention.chunking import Chunk, ChunkSplitter, ordered_lines_sql
from handlers.retention.sweep import COPY_OPTIONS, Sweep, record, summary
from handlers.retention.tables import METRICS
from worker.exceptions import MaintenanceError
from worker.pipeline.crash_points import CrashPoint
from worker.progress import Progress

log = logging.getLogger(__name__)

_NAME = re.compile(r"\Asystem_metrics_y(\d{4})m(\d{2})\Z")
PARTITIONS_SQL = """
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'system_metrics'::regclass
ORDER BY 1
"""
# DETACH takes an exclusive lock on system_metrics: never queue behind a long
# transaction (and block ingestion behind us) for more than this.
LOCK_TIMEOUT = "5s"


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def month_bounds(name: str) -> tuple[datetime, datetime] | None:
    """The [start, end) of a partition named by ``ensure_system_metrics_partition``."""
    match = _NAME.match(name)
    if match is None:
        return None
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


@dataclass(frozen=True)
class OlderPartitions:
    """The partitions holding samples older than a cutoff."""

    # Every row older than the cutoff, oldest first: (name, start, end).
    whole: list[tuple[str, datetime, datetime]]
    # Some rows older: the cutoff's month (and any partition not named by month).
    partial: list[str]


async def older_partitions(conn: Any, cutoff: datetime) -> OlderPartitions:
    whole, partial = [], []
    for row in await conn.fetch(PARTITIONS_SQL):
        name, bounds = row["relname"], month_bounds(row["relname"])
        if bounds is None or bounds[0] < cutoff < bounds[1]:
            partial.append(name)
        elif bounds[1] <= cutoff:
            whole.append((name, *bounds))
    return OlderPartitions(sorted(whole, key=lambda m: m[1]), partial)


async def archive_month(conn: Any, sweep: Sweep, name: str) -> int:
    """Export partition ``name`` whole, then drop it; how many rows left."""
    table = quoted(name)
    lines_sql = ordered_lines_sql(table)
    progress = Progress(f"retention {name}", unit="rows")
    exported: list[archive.Exported] = []

    async def keep(chunk: archive.Exported, lines: Chunk) -> None:
        exported.append(chunk)

    splitter = ChunkSplitter(sweep, keep)
    try:
        await conn.copy_from_query(lines_sql, output=splitter.feed, **COPY_OPTIONS)
        await splitter.close()
    finally:
        splitter.cancel()
    for chunk in exported:
        await record(conn, chunk, "exported")
    total = sum(c.manifest.rows for c in exported)
    progress.advance(total)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        present = await conn.fetchval(f"SELECT count(*) FROM {table}")
        if present != total:
            raise MaintenanceError(f"{name}: {present} rows now, {total} exported: not dropped")
        await conn.execute(f"ALTER TABLE system_metrics DETACH PARTITION {table}")
        await conn.execute(f"DROP TABLE {table}")
        await conn.execute(
            "UPDATE archive_chunks SET state = 'archived', archived_at = now()"
            " WHERE object_key = ANY($1::text[])",
            [c.key for c in exported],
        )
        sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_DELETE)
    sweep.crash_points.reach(CrashPoint.RETENTION_BEFORE_LEDGER)
    await sweep.note([summary(c) for c in exported] + [{"dropped_partition": name}])
    sweep.count(METRICS.name, total)
    progress.finish()
    log.info("retention dropped a month", extra={"partition": name, "rows": total})
    return total


async def forget_identities(
    conn: Any, before: datetime, since: datetime | None = None, batch: int = 50_000
) -> int:
    """Delete the identities of samples in [``since``, ``before``) (all archived by
    now), in batches that never hold many locks at once."""
    total = 0
    while True:
        status = await conn.execute(
            "DELETE FROM system_metric_ids WHERE ctid = ANY(ARRAY("
            ' SELECT ctid FROM system_metric_ids WHERE "timestamp" < $1'
            ' AND ($2::timestamptz IS NULL OR "timestamp" >= $2) LIMIT $3))',
            before,
            since,
            batch,
        )
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total
