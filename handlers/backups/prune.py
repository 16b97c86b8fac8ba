"""Backup retention: what goes, decided by a pure function, then deleted.

Kept: every complete backup taken within ``BACKUP_RETENTION_DAYS``, and whatever
its age, the newest verified backup (the last one known to restore). Deleted: older
complete backups; incomplete leftovers (a dump without manifest, a manifest without
dump) older than a day: younger ones may belong to a run in progress.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from handlers.backups.catalog import Backup, latest_verified, list_backups, manifest_key
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)

LEFTOVER_AGE = timedelta(days=1)


@dataclass(frozen=True)
class Doomed:
    backup: Backup
    why: str


def plan(backups: list[Backup], now: datetime, retention_days: int) -> list[Doomed]:
    """The backups to delete, with the reason for each."""
    keep = latest_verified(backups)
    cutoff = now - timedelta(days=retention_days)
    doomed = []
    for backup in backups:
        if backup is keep:
            continue
        if backup.complete:
            if backup.taken_at < cutoff:
                doomed.append(Doomed(backup, f"older than {retention_days} days"))
        elif backup.taken_at < now - LEFTOVER_AGE:
            doomed.append(Doomed(backup, "incomplete, older than a day"))
    return doomed


async def prune(
    store: ObjectStore, database: str, now: datetime, retention_days: int, *, dry_run: bool = False
) -> list[Doomed]:
    """Delete what ``plan`` dooms (the manifest first: a crash in between leaves an
    incomplete dump, which a later prune removes, never a manifest without its dump
    that looks like a backup). Returns what was (or, dry, would be) deleted."""
    doomed = plan(await list_backups(store, database), now, retention_days)
    if dry_run:
        return doomed
    for item in doomed:
        if item.backup.manifest_present:
            await store.delete(manifest_key(item.backup.key))
        if item.backup.dump is not None:
            await store.delete(item.backup.key)
        log.info("backup pruned", extra={"object": store.uri(item.backup.key), "why": item.why})
    swept = await store.sweep_incomplete(f"{database}/", now - LEFTOVER_AGE)
    if swept:
        log.info("interrupted uploads removed", extra={"count": swept})
    return doomed
