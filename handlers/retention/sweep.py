"""One table's rows past their window, archived and deleted chunk by chunk (feedback
and jobs, whose rows can change; metrics go by ``handlers.retention.stream``).

Each chunk is one transaction on the maintenance connection:

1. lock the oldest ``chunk_rows`` eligible rows past the cutoff (``FOR UPDATE``:
   ingestion cannot change them meanwhile, and waits at most one chunk);
2. stream their archive lines out of PostgreSQL (``COPY``), gzip them, write the
   object and its manifest (crash point ``retention_after_export``);
3. read both back and check them (``retention_after_verify``);
4. delete exactly the locked rows, and record the object in ``archive_chunks``
   (``retention_after_delete``, before the commit);
5. commit; then note the chunk in the run's ledger (``retention_before_ledger``).

A crash before 5's commit leaves the rows in their table and an object nobody
recorded: the next run deletes such objects first (``chunks.sweep_unrecorded``). After
the commit the rows are gone and their object is recorded, together.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from handlers.retention import archive
from handlers.retention.tables import TableSpec
from worker.exceptions import MaintenanceError
from worker.pipeline.crash_points import CrashPoint, CrashPoints
from worker.progress import Progress
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)

CHUNK_ROWS = 10_000

# COPY's CSV format with a quote and a delimiter JSON never holds raw (json_build_object
# escapes every control character): each line comes out verbatim, unlike the text
# format, which would double every backslash of the JSON.
COPY_OPTIONS: dict[str, Any] = {"format": "csv", "delimiter": "\x02", "quote": "\x01"}

Note = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass
class Sweep:
    """What a retention run gives each table's sweep."""

    store: ObjectStore
    run: str
    note: Note
    crash_points: CrashPoints
    chunk_rows: int = CHUNK_ROWS
    archived: dict[str, int] = field(default_factory=dict)

    def count(self, table: str, rows: int) -> None:
        self.archived[table] = self.archived.get(table, 0) + rows


def _chunk_sql(table: TableSpec) -> str:
    return (
        f'SELECT "{table.age_column}" AS at, id FROM {table.name}'
        f' WHERE {table.eligible} AND "{table.age_column}" < $1'
        f' ORDER BY "{table.age_column}", id LIMIT $2 FOR UPDATE'
    )


def _lines_sql(table: TableSpec) -> str:
    return (
        f"SELECT {table.line_sql} FROM {table.name}"
        f' WHERE id = ANY($1::uuid[]) AND "{table.age_column}" < $2'
        f' ORDER BY "{table.age_column}", id'
    )


def _delete_sql(table: TableSpec) -> str:
    return f'DELETE FROM {table.name} WHERE id = ANY($1::uuid[]) AND "{table.age_column}" < $2'


RECORD_SQL = """
INSERT INTO archive_chunks (object_key, table_name, state, rows, sha256, first_key,
    last_key, first_at, last_at, run)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (object_key) DO UPDATE SET state = excluded.state, rows = excluded.rows,
    sha256 = excluded.sha256, run = excluded.run, archived_at = now()
"""


async def record(conn: Any, exported: archive.Exported, state: str) -> None:
    m = exported.manifest
    await conn.execute(
        RECORD_SQL,
        exported.key,
        m.table,
        state,
        m.rows,
        m.sha256,
        m.first_key,
        m.last_key,
        m.first_at,
        m.last_at,
        m.run,
    )


async def export_rows(
    conn: Any, sweep: Sweep, table: TableSpec, lines_sql: str, args: tuple[Any, ...], edges: Any
) -> archive.Exported:
    """COPY the archive lines of ``lines_sql``, write them and read them back."""
    gzipper = archive.Gzipper()
    await conn.copy_from_query(lines_sql, *args, output=gzipper.feed, **COPY_OPTIONS)
    data = await gzipper.finish()
    exported = await archive.write(sweep.store, table, data, gzipper.lines, edges, sweep.run)
    sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_EXPORT)
    await archive.read_back(sweep.store, exported)
    sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_VERIFY)
    return exported


def summary(exported: archive.Exported) -> dict[str, Any]:
    m = exported.manifest
    return {"uri": m.object, "table": m.table, "rows": m.rows, "sha256": m.sha256}


async def sweep_table(conn: Any, sweep: Sweep, table: TableSpec, cutoff: datetime) -> int:
    """Archive and delete ``table``'s eligible rows older than ``cutoff``; how many."""
    total = 0
    progress = Progress(f"retention {table.name}", unit="rows")
    while True:
        async with conn.transaction():
            rows = await conn.fetch(_chunk_sql(table), cutoff, sweep.chunk_rows)
            if not rows:
                break
            ids = [row["id"] for row in rows]
            edges = ((rows[0]["at"], rows[0]["id"]), (rows[-1]["at"], rows[-1]["id"]))
            exported = await export_rows(
                conn, sweep, table, _lines_sql(table), (ids, cutoff), edges
            )
            if exported.manifest.rows != len(ids):
                raise MaintenanceError(
                    f"{table.name}: {exported.manifest.rows} lines exported for {len(ids)} rows"
                )
            deleted = await conn.execute(_delete_sql(table), ids, cutoff)
            if int(deleted.split()[-1]) != len(ids):
                raise MaintenanceError(f"{table.name}: {deleted} for {len(ids)} locked rows")
            await record(conn, exported, "archived")
            sweep.crash_points.reach(CrashPoint.RETENTION_AFTER_DELETE)
        sweep.crash_points.reach(CrashPoint.RETENTION_BEFORE_LEDGER)
        await sweep.note([summary(exported)])
        total += len(ids)
        sweep.count(table.name, len(ids))
        progress.advance(len(ids))
    if total:
        progress.finish()
        log.info("retention archived rows", extra={"table": table.name, "rows": total})
    return total
