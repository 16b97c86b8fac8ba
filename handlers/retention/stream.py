"""Samples older than the cutoff in the month it falls in: archived, then deleted.

Metrics rows never change once written (a sample is inserted once, never updated)
and no event older than the window is ever written (``expired``), so these samples
can be read without locks, in one ordered COPY cut into chunks
(``chunking.ChunkSplitter``); each chunk's rows are deleted by id, on a second
connection, as soon as its object is read back, while the COPY goes on.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from handlers.retention import archive
from handlers.retention.chunking import Chunk, ChunkSplitter, ordered_lines_sql
from handlers.retention.partitions import quoted
from handlers.retention.sweep import COPY_OPTIONS, Sweep, record, summary
from handlers.retention.tables import METRICS
from worker.exceptions import MaintenanceError
from worker.pipeline.crash_points import CrashPoint
from worker.progress import Progress

log = logging.getLogger(__name__)


async def archive_older_samples(
    conn: Any, deleter: Any, sweep: Sweep, partition: str, cutoff: datetime
) -> int:
    """Archive the samples of ``partition`` older than ``cutoff``: each chunk's rows are
    deleted by id, with its record, in one transaction on ``deleter``, as soon as its
    object is read back.

    Both statements name the partition, not ``system_metrics``: a lock on the parent,
    held for the whole COPY, would hold up the DETACH of a whole month meanwhile (and
    ingestion queued behind that DETACH).
    """
    table = quoted(partition)
    lines_sql = ordered_lines_sql(f'{table} WHERE "timestamp" < $1')
    delete_sql = f'DELETE FROM {table} WHERE "timestamp" < $1 AND id = ANY($2::uuid[])'
    progress = Progress("retention system_metrics", unit="rows")
    total = 0

    async def delete(chunk: archive.Exported, lines: Chunk) -> None:
        nonlocal total
        ids = lines.ids or []
        async with deleter.transaction():
            status = await deleter.execute(delete_sql, cutoff, ids)
            if int(status.split()[-1]) != len(ids) or len(ids) != chunk.manifest.rows:
                raise MaintenanceError(
                    f"{partition}: {status} for {len(ids)} ids of"
                    f" {chunk.manifest.rows} exported rows"
                )
            await record(deleter, chunk, "archived")
            sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_DELETE)
        sweep.crash_points.reach(CrashPoint.RETENTION_BEFORE_LEDGER)
        await sweep.note([summary(chunk)])
        sweep.count(METRICS.name, len(ids))
        progress.advance(len(ids))
        total += len(ids)

    splitter = ChunkSplitter(sweep, delete, keep_ids=True)
    try:
        await conn.copy_from_query(lines_sql, cutoff, output=splitter.feed, **COPY_OPTIONS)
        await splitter.close()
    finally:
        splitter.cancel()
    if total:
        progress.finish()
        log.info("retention archived rows", extra={"table": METRICS.name, "rows": total})
    return total
