"""The backup run: take, verify, write the manifest, prune.

The scheduled message (through the ``maintenance`` handler) and ``utxoiq-worker
backup run`` both call ``run_backup`` inside the run ledger, so an operator's run and
a scheduled one are the same run and never overlap.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from handlers.backups import prune, take, verify
from handlers.backups.catalog import manifest_key
from handlers.maintenance_runs import RunKey, RunResult
from schemas.backups import BackupManifest, Verification, render_manifest
from worker.config import Settings
from worker.exceptions import MaintenanceError
from worker.progress import Progress
from worker.storage.objects import ObjectStore, open_store

log = logging.getLogger(__name__)


def backup_store(settings: Settings) -> ObjectStore:
    return open_store(settings.backup_url)


async def run_backup(settings: Settings, run: RunKey, attempt: int) -> RunResult:
    """One attempt of the backup run ``run``: every step or an exception."""
    store = backup_store(settings)
    try:
        return await _run(settings, store, run, attempt)
    finally:
        store.close()


async def _run(settings: Settings, store: ObjectStore, run: RunKey, attempt: int) -> RunResult:
    await verify.drop_leftover_scratch(settings)
    dumped = await take.take(settings, store, Progress("backup dump"))
    expected = verify.Expected(dumped.key, dumped.sha256, dumped.size_bytes, dumped.rows)
    checked_at = datetime.now(UTC)
    try:
        seconds = await verify.verify(settings, store, expected, Progress("backup verify"))
        verification = Verification(passed=True, checked_at=checked_at, seconds=round(seconds, 3))
        failure = None
    except MaintenanceError as error:
        failure = error
        verification = Verification(
            passed=False, checked_at=checked_at, seconds=0.0, error=str(error)[:2000]
        )
    manifest = _manifest(dumped, verification, f"{run} attempt {attempt}")
    await _write_manifest(store, dumped.key, manifest)
    if failure is not None:
        raise failure  # the manifest says so; the run fails and is retried
    doomed = await prune.prune(
        store, dumped.database, datetime.now(UTC), settings.backup_retention_days
    )
    return RunResult(
        objects=[
            {"uri": dumped.uri, "size_bytes": dumped.size_bytes, "sha256": dumped.sha256},
            {"uri": store.uri(manifest_key(dumped.key))},
        ],
        row_counts=dumped.rows,
        details={
            "dump_seconds": round(dumped.seconds, 3),
            "verify_seconds": verification.seconds,
            "server_version": dumped.server_version,
            "alembic_revision": dumped.alembic_revision,
            "pruned": [store.uri(d.backup.key) for d in doomed],
        },
    )


def _manifest(dumped: take.Dumped, verification: Verification, run: str) -> BackupManifest:
    return BackupManifest(
        object=dumped.uri,
        database=dumped.database,
        sha256=dumped.sha256,
        size_bytes=dumped.size_bytes,
        server_version=dumped.server_version,
        pg_dump_major=dumped.pg_dump_major,
        alembic_revision=dumped.alembic_revision,
        rows=dumped.rows,
        started_at=dumped.started_at,
        finished_at=dumped.finished_at,
        verification=verification,
        run=run,
    )


async def _write_manifest(store: ObjectStore, key: str, manifest: BackupManifest) -> None:
    await store.write_bytes(manifest_key(key), render_manifest(manifest))
    log.info(
        "backup manifest written",
        extra={"object": manifest.object, "verified": manifest.verified},
    )
