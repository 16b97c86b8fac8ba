"""Archived rows back into a database of the operator's choice.

For an investigation, or to undo a window that was too short. Every archive object of
the table whose rows may fall in [start, end) is read, checked against its manifest
(sha256, lines), and its rows in that range inserted with ``ON CONFLICT DO NOTHING``:
restoring twice equals restoring once. The ``expired`` rule guards ingestion only; a
restore is an operator's deliberate act and bypasses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from handlers import registry
from handlers.retention.archive import ArchiveManifest
from handlers.retention.tables import METRICS, TableSpec
from worker.config import Settings
from worker.exceptions import MaintenanceError
from worker.progress import Progress
from worker.storage import inventory
from worker.storage.migrate import upgrade
from worker.storage.objects import ObjectStore


@dataclass(frozen=True)
class Listed:
    key: str
    manifest: ArchiveManifest


async def list_archive(store: ObjectStore, table: TableSpec) -> list[Listed]:
    """The table's archive objects, by their manifests, oldest first."""
    listed = []
    for info in await store.list(f"{table.name}/"):
        if info.key.endswith(".jsonl.gz.json"):
            manifest = ArchiveManifest.model_validate_json(await store.read_bytes(info.key))
            listed.append(Listed(info.key[: -len(".json")], manifest))
    return sorted(listed, key=lambda item: (item.manifest.first_at, item.key))


def _age_field(table: TableSpec) -> str:
    """The archive line's field holding the row's age (the same name as its column)."""
    return table.age_column


async def _rows(
    store: ObjectStore, item: Listed, table: TableSpec, start: datetime, end: datetime
) -> list[tuple[Any, ...]]:
    """The object's rows with an age in [start, end), checked against its manifest."""
    data = await store.read_bytes(item.key)
    if hashlib.sha256(data).hexdigest() != item.manifest.sha256:
        raise MaintenanceError(f"{item.manifest.object}: sha256 differs from its manifest")
    lines = zlib.decompress(data, 47).splitlines()
    if len(lines) != item.manifest.rows:
        raise MaintenanceError(
            f"{item.manifest.object}: {len(lines)} lines, its manifest says {item.manifest.rows}"
        )
    field = _age_field(table)
    rows = []
    for raw in lines:
        line = json.loads(raw)
        if start <= datetime.fromisoformat(line[field]) < end:
            rows.append(table.from_line(line))
    return rows


async def restore_archive(
    settings: Settings,
    store: ObjectStore,
    table: TableSpec,
    start: datetime,
    end: datetime,
    into: str,
) -> tuple[int, int]:
    """Rows of ``table`` archived with an age in [start, end), inserted into database
    ``into`` (created and migrated if needed); (rows read, rows inserted)."""
    target = dataclasses.replace(settings, database_url=into)
    await upgrade(target, registry())
    chosen = [
        item
        for item in await list_archive(store, table)
        if item.manifest.first_at < end and item.manifest.last_at >= start
    ]
    read = inserted = 0
    progress = Progress(f"archive restore {table.name}", unit="rows")
    async with inventory.connect(into) as conn:
        for item in chosen:
            batch = await _rows(store, item, table, start, end)
            read += len(batch)
            inserted += await _insert(conn, table, batch)
            progress.advance(len(batch))
    progress.finish()
    return read, inserted


async def _insert(conn: Any, table: TableSpec, rows: list[tuple[Any, ...]]) -> int:
    """Insert ``rows`` in one transaction (through a temporary table, one COPY); how
    many were new."""
    if not rows:
        return 0
    columns = table.column_list()
    async with conn.transaction():
        await conn.execute(f"CREATE TEMP TABLE archive_restore (LIKE {table.name}) ON COMMIT DROP")
        await conn.copy_records_to_table(
            "archive_restore", records=rows, columns=list(table.columns)
        )
        if table is METRICS:
            months = {(row[5].astimezone(UTC).year, row[5].astimezone(UTC).month) for row in rows}
            for year, month in sorted(months):
                moment = datetime(year, month, 1, tzinfo=UTC)
                await conn.execute("SELECT ensure_system_metrics_partition($1)", moment)
            await conn.execute(
                'INSERT INTO system_metric_ids (id, "timestamp")'
                ' SELECT id, "timestamp" FROM archive_restore ON CONFLICT DO NOTHING'
            )
        status = await conn.execute(
            f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM archive_restore"
            " ON CONFLICT DO NOTHING"
        )
    return int(status.split()[-1])
