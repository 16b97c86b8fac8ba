"""Proving a backup restorable: read it back, hash it, restore it, count its rows.

``pg_restore --list`` reads only the table of contents and passes on a truncated
dump; only a real restore verifies. The restore goes into a scratch database
(``{database}_verify_{nonce}``, dropped afterwards, even on failure) straight from the
object store: nothing is copied to local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from worker.config import Settings
from worker.exceptions import MaintenanceError, WorkerError
from worker.progress import Progress
from worker.storage import inventory, postgres_tools
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)

SCRATCH_MARK = "_verify_"


@dataclass(frozen=True)
class Expected:
    """What the backup must be: from the dump just taken, or from its manifest."""

    key: str
    sha256: str
    size_bytes: int
    rows: dict[str, int]


class _Hashed:
    """The object's chunks, hashed and counted as they pass to pg_restore."""

    def __init__(self, chunks: AsyncIterator[bytes], progress: Progress) -> None:
        self._chunks = chunks
        self._progress = progress
        self.digest = hashlib.sha256()
        self.size_bytes = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(self._chunks):  # type: ignore[type-var]
            async for chunk in self._chunks:
                self.digest.update(chunk)
                self.size_bytes += len(chunk)
                self._progress.advance(len(chunk))
                yield chunk


async def verify(
    settings: Settings, store: ObjectStore, expected: Expected, progress: Progress
) -> float:
    """Raise ``MaintenanceError`` naming what differs; the seconds it took otherwise."""
    uri = store.uri(expected.key)
    listed = [o for o in await store.list(expected.key) if o.key == expected.key]
    if not listed:
        raise MaintenanceError(f"verify {uri}: the object is missing")
    if listed[0].size_bytes != expected.size_bytes:
        raise MaintenanceError(
            f"verify {uri}: the object is {listed[0].size_bytes} bytes but should be "
            f"{expected.size_bytes} (truncated or replaced)"
        )
    pg_restore = postgres_tools.tool("pg_restore", settings.pg_bin_dir)
    source = postgres_tools.Connection.from_database_url(settings.database_url)
    scratch = f"{source.database[:40]}{SCRATCH_MARK}{uuid.uuid4().hex[:12]}"
    await inventory.create_database(settings.database_url, scratch)
    try:
        hashed = _Hashed(store.read(expected.key), progress)
        try:
            await postgres_tools.restore_stream(
                pg_restore, source.with_database(scratch), hashed.__aiter__()
            )
        except MaintenanceError as error:
            raise MaintenanceError(f"verify {uri}: the restore failed: {error}") from error
        progress.finish()
        if hashed.digest.hexdigest() != expected.sha256:
            raise MaintenanceError(
                f"verify {uri}: sha256 is {hashed.digest.hexdigest()} but should be "
                f"{expected.sha256} (the object is corrupted)"
            )
        async with inventory.connect(settings.database_url, scratch) as conn:
            restored = await inventory.count_rows(conn)
        compare_rows(uri, expected.rows, restored)
    finally:
        with contextlib.suppress(WorkerError):
            await inventory.drop_database(settings.database_url, scratch)
    log.info("backup verified", extra={"object": uri, "seconds": round(progress.seconds, 3)})
    return progress.seconds


def compare_rows(uri: str, expected: dict[str, int], restored: dict[str, int]) -> None:
    differences = [
        f"{table}: {restored.get(table, 'missing')} restored, "
        f"{expected.get(table, 'none')} expected"
        for table in sorted(expected.keys() | restored.keys())
        if expected.get(table) != restored.get(table)
    ]
    if differences:
        shown = "; ".join(differences[:10])
        raise MaintenanceError(f"verify {uri}: row counts differ: {shown}")


async def drop_leftover_scratch(settings: Settings) -> None:
    """Drop scratch databases a killed verification left (those nobody is connected to)."""
    database = inventory.database_name(settings.database_url)
    for name in await inventory.databases_like(settings.database_url, database[:40] + SCRATCH_MARK):
        try:
            await inventory.drop_database(settings.database_url, name, force=False)
            log.info("leftover verification database dropped", extra={"database": name})
        except WorkerError as error:  # in use: a verification in progress
            log.info("scratch database in use, kept", extra={"database": name, "error": str(error)})
