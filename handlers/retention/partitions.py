"""Whole metrics months past the window: exported chunk by chunk, then dropped.

Every row of such a month is older than the window, so ingestion never writes to it
again (``expired``), and it can be read without locks, in one ordered COPY cut into
chunks. Its chunks are exported, read back and recorded as ``exported``; then one
transaction detaches and drops the partition and marks them ``archived``. A crash
before that commit leaves the month in place and its objects unrecorded as archived:
the next run deletes them and starts the month again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from handlers.retention import archive
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


def _quoted(name: str) -> str:
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


async def months_before(conn: Any, cutoff: datetime) -> list[tuple[str, datetime, datetime]]:
    """The partitions whose every row is older than ``cutoff``, oldest first."""
    months = []
    for row in await conn.fetch(PARTITIONS_SQL):
        bounds = month_bounds(row["relname"])
        if bounds is not None and bounds[1] <= cutoff:
            months.append((row["relname"], *bounds))
    return sorted(months, key=lambda m: m[1])


class MonthSplitter:
    """Cuts one ordered COPY of a month into chunks of ``chunk_rows`` lines; each chunk
    is compressed, written and read back by a task of its own while the COPY goes on
    (at most ``AHEAD`` chunks wait), so the month is read once, in one sort."""

    AHEAD = 1

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.exported: list[archive.Exported] = []
        self._buffer = bytearray()
        self._lines = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.AHEAD)
        self._writer = asyncio.create_task(self._write_all())

    async def feed(self, data: bytes) -> None:
        if self._writer.done():
            self._writer.result()  # a chunk failed: stop the COPY with its error
        self._buffer += data
        self._lines += data.count(b"\n")
        while self._lines >= self.sweep.chunk_rows:
            cut = _after_line(self._buffer, self.sweep.chunk_rows)
            await self._queue.put(bytes(self._buffer[:cut]))
            del self._buffer[:cut]
            self._lines -= self.sweep.chunk_rows

    async def close(self) -> None:
        if self._buffer:
            await self._queue.put(bytes(self._buffer))
        await self._queue.put(None)
        await self._writer

    def cancel(self) -> None:
        self._writer.cancel()

    async def _write_all(self) -> None:
        while (raw := await self._queue.get()) is not None:
            data = await archive.off_loop(archive.gzip_lines, raw)
            rows = raw.count(b"\n")
            chunk = await archive.write(
                self.sweep.store, METRICS, data, rows, _edges(raw), self.sweep.run
            )
            self.sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_EXPORT)
            await archive.read_back(self.sweep.store, chunk)
            self.sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_VERIFY)
            self.exported.append(chunk)


def _after_line(buffer: bytearray, count: int) -> int:
    """The offset just past the ``count``-th newline of ``buffer``."""
    at = -1
    for _ in range(count):
        at = buffer.index(b"\n", at + 1)
    return at + 1


def _edge(line: bytes) -> tuple[datetime, UUID]:
    parsed = json.loads(line)
    return datetime.fromisoformat(parsed["timestamp"]), UUID(parsed["id"])


def _edges(raw: bytes) -> tuple[tuple[datetime, UUID], tuple[datetime, UUID]]:
    first = raw[: raw.index(b"\n")]
    last = raw[raw.rindex(b"\n", 0, len(raw) - 1) + 1 :]
    return _edge(first), _edge(last)


async def archive_month(conn: Any, sweep: Sweep, name: str) -> int:
    """Export partition ``name`` whole, then drop it; how many rows left."""
    table = _quoted(name)
    lines_sql = f'SELECT {METRICS.line_sql} FROM {table} ORDER BY "timestamp", id'
    progress = Progress(f"retention {name}", unit="rows")
    splitter = MonthSplitter(sweep)
    try:
        await conn.copy_from_query(lines_sql, output=splitter.feed, **COPY_OPTIONS)
        await splitter.close()
    finally:
        splitter.cancel()
    exported = splitter.exported
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


async def forget_identities(conn: Any, before: datetime, batch: int = 50_000) -> int:
    """Delete the identities of samples older than ``before`` (all archived by now), in
    batches that never hold many locks at once."""
    total = 0
    while True:
        status = await conn.execute(
            "DELETE FROM system_metric_ids WHERE ctid = ANY(ARRAY("
            ' SELECT ctid FROM system_metric_ids WHERE "timestamp" < $1 LIMIT $2))',
            before,
            batch,
        )
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total
