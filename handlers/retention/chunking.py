"""One ordered COPY of samples cut into archive chunks, compressed as it streams.

A chunk is exactly ``chunk_rows`` consecutive lines (the last one fewer), so a rerun
over the same rows cuts the same chunks and names the same objects. Lines are
compressed as they arrive, a few hundred kilobytes at a time: a chunk's text is never
held whole, only its compressed bytes, which keeps the worker's memory flat however
large the month.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from uuid import UUID

from isal import isal_zlib

from handlers.retention import archive
from handlers.retention.sweep import Sweep
from handlers.retention.tables import METRICS
from worker.exceptions import MaintenanceError
from worker.pipeline.crash_points import CrashPoint

# ``METRICS.line_sql`` puts the id first, and json_build_object writes it so: one scan
# finds every id of a piece (a JSON parse per line cost more than the rest of the
# chunk's Python). A line it missed would leave fewer ids than rows: the delete refuses.
_LINE_ID = re.compile(rb'^\{"id" : "([0-9a-f-]{36})"', re.MULTILINE)

Edge = tuple[datetime, UUID]

# ISA-L's output depends on where its input is cut: the compressor is always given
# whole multiples of this, counted from the chunk's start (never COPY's slices), so a
# chunk's bytes depend on its lines only.
COMPRESS_BLOCK = 256 * 1024


class Chunk:
    """A chunk's lines so far: compressed, counted, its first and last line kept (they
    name the object) and, when asked, its ids (to delete exactly these rows)."""

    def __init__(self, keep_ids: bool) -> None:
        self._compressor = isal_zlib.compressobj(
            archive.GZIP_LEVEL, isal_zlib.DEFLATED, archive.GZIP_WBITS
        )
        self._parts: list[bytes] = []
        self._pending = bytearray()
        self.rows = 0
        self.ids: list[str] | None = [] if keep_ids else None
        self._first = b""
        self._last = b""

    def add(self, lines: bytes) -> None:
        """Whole lines, each ending in a newline."""
        if not self.rows:
            self._first = lines[: lines.index(b"\n")]
        self._last = lines[lines.rfind(b"\n", 0, len(lines) - 1) + 1 : -1]
        self.rows += lines.count(b"\n")
        if self.ids is not None:
            self.ids.extend(m.decode() for m in _LINE_ID.findall(lines))
        self._pending += lines
        if len(self._pending) >= COMPRESS_BLOCK:
            blocks = memoryview(self._pending)
            whole = len(blocks) - len(blocks) % COMPRESS_BLOCK
            for at in range(0, whole, COMPRESS_BLOCK):
                self._parts.append(self._compressor.compress(blocks[at : at + COMPRESS_BLOCK]))
            blocks.release()
            del self._pending[:whole]

    def seal(self) -> bytes:
        """The chunk's gzip stream (the chunk takes no more lines)."""
        self._parts.append(self._compressor.compress(self._pending))
        self._parts.append(self._compressor.flush())
        data, self._parts, self._pending = b"".join(self._parts), [], bytearray()
        return data

    def edges(self) -> tuple[Edge, Edge]:
        return _edge(self._first), _edge(self._last)


def ordered_lines_sql(rows: str) -> str:
    """The archive lines of ``rows`` (a FROM clause), in key order.

    The rows are sorted first and their lines built as COPY streams them: sorted after
    building, every line would be built (most of PostgreSQL's work) before the first
    left the server, with the worker idle meanwhile. A subquery's order is kept by a
    plain projection above it; OFFSET 0 keeps the planner from flattening it.
    """
    return (
        f"SELECT {METRICS.line_sql} FROM"
        f' (SELECT * FROM {rows} ORDER BY "timestamp", id OFFSET 0) AS system_metrics'
    )


Settle = Callable[[archive.Exported, Chunk], Awaitable[None]]
"""What becomes of a chunk once its object is written and read back."""


class ChunkSplitter:
    """Cuts one ordered COPY of samples into chunks while the COPY goes on: the rows are
    read once, in one sort, instead of one sort per chunk.

    A full chunk is written and read back by a task of its own, ``IN_FLIGHT`` at most
    (the COPY waits for a free slot), so one object's fsyncs and read-back overlap the
    next chunk's lines. ``settle`` runs for one chunk at a time, in any order: it may use
    a connection of its own.
    """

    IN_FLIGHT = 3

    def __init__(self, sweep: Sweep, settle: Settle, keep_ids: bool = False) -> None:
        self.sweep = sweep
        self._settle = settle
        self._keep_ids = keep_ids
        self._chunk = Chunk(keep_ids)
        self._partial_line = b""
        self._slots = asyncio.Semaphore(self.IN_FLIGHT)
        self._settling = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed: Exception | None = None

    async def feed(self, data: bytes) -> None:
        """COPY's output callback: ``data`` is any slice of the stream."""
        self._raise_failure()
        if self._partial_line:
            data = self._partial_line + data
        end = data.rfind(b"\n") + 1
        self._partial_line = data[end:]
        at = 0
        while at < end:
            wanted = self.sweep.chunk_rows - self._chunk.rows
            lines = data.count(b"\n", at, end)
            cut = end if lines <= wanted else _after_line(data, at, end, wanted, lines)
            self._chunk.add(data[at:cut])
            at = cut
            if self._chunk.rows == self.sweep.chunk_rows:
                await self._start()

    async def close(self) -> None:
        """Export what is left, then wait for every chunk; the first failure raises."""
        self._raise_failure()
        if self._partial_line:
            raise MaintenanceError("the archive lines' stream ended inside a line")
        if self._chunk.rows:
            await self._start()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._raise_failure()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed  # a chunk failed: stop the COPY with its error

    async def _start(self) -> None:
        chunk, self._chunk = self._chunk, Chunk(self._keep_ids)
        await self._slots.acquire()
        self._raise_failure()
        task = asyncio.create_task(self._export(chunk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _export(self, chunk: Chunk) -> None:
        sweep = self.sweep
        try:
            data = chunk.seal()
            exported = await archive.write(
                sweep.store, METRICS, data, chunk.rows, chunk.edges(), sweep.run
            )
            del data
            sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_EXPORT)
            await archive.read_back(sweep.store, exported)
            sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_VERIFY)
            async with self._settling:
                self._raise_failure()
                await self._settle(exported, chunk)
        except Exception as error:  # kept for feed and close to raise, not lost in a task
            if self._failed is None:
                self._failed = error
        finally:
            self._slots.release()


def _after_line(data: bytes, start: int, end: int, count: int, lines: int) -> int:
    """The offset just past the ``count``-th newline of ``data[start:end]`` (which holds
    ``lines``): a guess from the average line, corrected a line at a time (a few
    hundred steps, not ``count``)."""
    at = start + (end - start) * count // lines
    seen = data.count(b"\n", start, at)
    while seen < count:
        at = data.index(b"\n", at) + 1
        seen += 1
    while seen > count:
        at = data.rindex(b"\n", start, at)
        seen -= 1
    return data.rindex(b"\n", start, at) + 1


def _edge(line: bytes) -> Edge:
    parsed = json.loads(line)
    return datetime.fromisoformat(parsed["timestamp"]), UUID(parsed["id"])
