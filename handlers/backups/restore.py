"""An operator's restore: a chosen backup into a target database, checked.

The target must hold no tables, unless the operator asks to replace what it holds
(``clean``: its ``public`` schema is dropped and recreated). With ``jobs`` > 1 the dump
is first copied to a local temporary file (pg_restore's parallel jobs need to seek;
it takes the dump's size on local disk), hashed on the way and checked against the
manifest before anything is restored; with ``jobs`` = 1 it streams from the store.
After the restore, the rows per table must equal the manifest's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlers.backups.catalog import Backup
from handlers.backups.verify import compare_rows
from schemas.backups import BackupManifest
from worker.config import Settings
from worker.exceptions import MaintenanceError
from worker.progress import Progress
from worker.storage import inventory, postgres_tools
from worker.storage.migrate import head_revision
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    uri: str
    database: str
    rows: dict[str, int]
    revision: str | None
    head: str
    seconds: float


async def restore(
    settings: Settings,
    store: ObjectStore,
    backup: Backup,
    target_url: str,
    *,
    clean: bool,
    jobs: int,
) -> Restored:
    manifest = backup.manifest
    if manifest is None:
        raise MaintenanceError(f"{store.uri(backup.key)} has no manifest: not a backup")
    uri = store.uri(backup.key)
    target_name = inventory.database_name(target_url)
    await inventory.ensure_database(target_url, target_name)
    await _prepare_target(target_url, target_name, clean=clean)
    pg_restore = postgres_tools.tool("pg_restore", settings.pg_bin_dir)
    target = postgres_tools.Connection.from_database_url(target_url)
    started = time.monotonic()
    progress = Progress("restore", total_bytes=manifest.size_bytes)
    if jobs > 1:
        with tempfile.TemporaryDirectory(prefix="utxoiq-restore-") as scratch:
            path = Path(scratch) / "backup.dump"
            await _download(store, backup.key, path, manifest, progress)
            await postgres_tools.restore_file(pg_restore, target, path, jobs)
    else:
        digest = hashlib.sha256()
        await postgres_tools.restore_stream(
            pg_restore, target, _hashing(store, backup.key, digest, progress)
        )
        _check_digest(uri, digest.hexdigest(), manifest)
    progress.finish()
    async with inventory.connect(target_url) as conn:
        rows = await inventory.count_rows(conn)
        revision = await inventory.alembic_revision(conn)
    compare_rows(uri, manifest.rows, rows)
    if revision != manifest.alembic_revision:
        raise MaintenanceError(
            f"restored revision {revision} but the manifest says {manifest.alembic_revision}"
        )
    seconds = time.monotonic() - started
    log.info(
        "backup restored",
        extra={
            "object": uri,
            "database": target_name,
            "size_bytes": manifest.size_bytes,
            "seconds": round(seconds, 3),
            "rows": sum(rows.values()),
        },
    )
    return Restored(uri, target_name, rows, revision, head_revision(), seconds)


async def _prepare_target(target_url: str, name: str, *, clean: bool) -> None:
    async with inventory.connect(target_url) as conn:
        tables = await inventory.table_count(conn)
        if tables and not clean:
            raise MaintenanceError(
                f"database {name} is not empty ({tables} tables): restore into an empty "
                "database, or pass --clean to replace its contents"
            )
        if tables:
            log.warning("replacing the target's public schema", extra={"database": name})
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


async def _hashing(
    store: ObjectStore, key: str, digest: Any, progress: Progress
) -> AsyncIterator[bytes]:
    """The object's chunks, hashed into ``digest`` as they pass."""
    async with contextlib.aclosing(store.read(key)) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            digest.update(chunk)
            progress.advance(len(chunk))
            yield chunk


async def _download(
    store: ObjectStore, key: str, path: Path, manifest: BackupManifest, progress: Progress
) -> None:
    digest = hashlib.sha256()
    with path.open("wb") as file:
        async for chunk in _hashing(store, key, digest, progress):
            await asyncio.to_thread(file.write, chunk)
    _check_digest(store.uri(key), digest.hexdigest(), manifest)


def _check_digest(uri: str, actual: str, manifest: BackupManifest) -> None:
    if actual != manifest.sha256:
        raise MaintenanceError(
            f"{uri}: sha256 is {actual} but the manifest says {manifest.sha256} (corrupted)"
        )
