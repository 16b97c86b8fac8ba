"""Samples past the window, read in one ordered COPY and cut into archive chunks.

Metrics rows never change once written (a sample is inserted once, never updated)
and no event older than the window is ever written (``expired``), so samples past
the cutoff can be read without locks, in one sorted pass, instead of a sort per
chunk. ``ChunkSplitter`` cuts that stream; whole months hand their chunks to
``partitions.archive_month`` (dropped at the end), and ``archive_older_samples``
deletes each chunk's rows, by id, on a second connection while the COPY goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from handlers.retention import archive
from handlers.retention.sweep import COPY_OPTIONS, Sweep, record, summary
from handlers.retention.tables import METRICS
from worker.exceptions import MaintenanceError
from worker.pipeline.crash_points import CrashPoint
from worker.progress import Progress

log = logging.getLogger(__name__)

Settle = Callable[[archive.Exported, bytes], Awaitable[None]]
"""What becomes of a chunk once its object is written and read back."""


class ChunkSplitter:
    """Cuts one ordered COPY of samples into chunks of ``chunk_rows`` lines; each chunk
    is compressed, written, read back and handed to ``settle`` by a task of its own
    while the COPY goes on (at most ``AHEAD`` chunks wait): the rows are read once, in
    one sort, instead of one sort per chunk."""

    AHEAD = 1

    def __init__(self, sweep: Sweep, settle: Settle) -> None:
        self.sweep = sweep
        self._settle = settle
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
            await self._settle(chunk, raw)


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
    last = raw[raw.rfind(b"\n", 0, len(raw) - 1) + 1 :]  # -1 + 1: a one-line chunk
    return _edge(first), _edge(last)


async def archive_older_samples(conn: Any, deleter: Any, sweep: Sweep, cutoff: datetime) -> int:
    """Archive the samples older than ``cutoff`` still in their partitions (the month
    the cutoff falls in): each chunk's rows are deleted by id, with its record, in one
    transaction on ``deleter``, as soon as its object is read back."""
    lines_sql = (
        f'SELECT {METRICS.line_sql} FROM system_metrics WHERE "timestamp" < $1'
        ' ORDER BY "timestamp", id'
    )
    progress = Progress("retention system_metrics", unit="rows")
    total = 0

    async def delete(chunk: archive.Exported, raw: bytes) -> None:
        nonlocal total
        ids = [UUID(json.loads(line)["id"]) for line in raw.splitlines()]
        async with deleter.transaction():
            status = await deleter.execute(
                'DELETE FROM system_metrics WHERE id = ANY($1::uuid[]) AND "timestamp" < $2',
                ids,
                cutoff,
            )
            if int(status.split()[-1]) != len(ids):
                raise MaintenanceError(f"system_metrics: {status} for {len(ids)} exported rows")
            await record(deleter, chunk, "archived")
            sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_DELETE)
        sweep.crash_points.reach(CrashPoint.RETENTION_BEFORE_LEDGER)
        await sweep.note([summary(chunk)])
        sweep.count(METRICS.name, len(ids))
        progress.advance(len(ids))
        total += len(ids)

    splitter = ChunkSplitter(sweep, delete)
    try:
        await conn.copy_from_query(lines_sql, cutoff, output=splitter.feed, **COPY_OPTIONS)
        await splitter.close()
    finally:
        splitter.cancel()
    if total:
        progress.finish()
        log.info("retention archived rows", extra={"table": METRICS.name, "rows": total})
    return total
