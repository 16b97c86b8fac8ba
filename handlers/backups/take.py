"""Taking a dump: ``pg_dump -Fc`` streamed into the object store.

The dump runs in a snapshot exported by a transaction of our own, and the rows are
counted in that same snapshot: the manifest's counts are exactly what the dump
holds, however busy ingestion is meanwhile. The object is created only when pg_dump
exits 0; anything else cancels it (nothing partial is ever visible).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from handlers.backups.catalog import dump_key
from worker.config import Settings
from worker.progress import Progress
from worker.storage import inventory, postgres_tools
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dumped:
    """A dump stored in full (no manifest yet)."""

    key: str
    uri: str
    database: str
    sha256: str
    size_bytes: int
    rows: dict[str, int]
    server_version: str
    pg_dump_major: int
    alembic_revision: str | None
    started_at: datetime
    finished_at: datetime
    seconds: float


async def take(settings: Settings, store: ObjectStore, progress: Progress) -> Dumped:
    """Dump the database of ``settings`` into ``store``; raise ``MaintenanceError`` on failure."""
    pg_dump = postgres_tools.tool("pg_dump", settings.pg_bin_dir)
    target = postgres_tools.Connection.from_database_url(settings.database_url)
    client_major = await postgres_tools.client_major(pg_dump)
    started_at = datetime.now(UTC)
    key = dump_key(target.database, started_at)
    async with inventory.connect(settings.database_url) as conn:
        version_num = await inventory.server_version_num(conn)
        postgres_tools.require_dump_compatible(client_major, version_num, pg_dump)
        server_version = await inventory.server_version(conn)
        async with inventory.exported_snapshot(conn) as snapshot:
            revision = await inventory.alembic_revision(conn)
            digest = hashlib.sha256()
            size = 0
            async with store.create(key) as writer:
                async for chunk in postgres_tools.dump(pg_dump, target, snapshot):
                    digest.update(chunk)
                    size += len(chunk)
                    await writer.write(chunk)
                    progress.advance(len(chunk))
            progress.finish()
            seconds = progress.seconds
            finished_at = datetime.now(UTC)
            rows = await inventory.count_rows(conn)
    dumped = Dumped(
        key=key,
        uri=store.uri(key),
        database=target.database,
        sha256=digest.hexdigest(),
        size_bytes=size,
        rows=rows,
        server_version=server_version,
        pg_dump_major=client_major,
        alembic_revision=revision,
        started_at=started_at,
        finished_at=finished_at,
        seconds=seconds,
    )
    log.info(
        "backup dumped",
        extra={
            "object": dumped.uri,
            "size_bytes": size,
            "seconds": round(seconds, 3),
            "mib_per_s": round(progress.rate_mib_per_s(), 1),
            "rows": sum(rows.values()),
        },
    )
    return dumped
