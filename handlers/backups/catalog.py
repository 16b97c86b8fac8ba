"""Where backups live in the object store, and what it holds now.

``{database}/{YYYY}/{MM}/{DD}/{database}-{YYYYMMDDTHHMMSSZ}.dump`` and its manifest
``....dump.json`` beside it. A dump without a manifest is incomplete (in progress, or
left by a run that died): never listed as a backup to restore.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from schemas.backups import BackupManifest, parse_manifest, utc_stamp
from worker.exceptions import MaintenanceError, ObjectNotFoundError
from worker.storage.objects import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

DUMP_SUFFIX = ".dump"
MANIFEST_SUFFIX = ".dump.json"
_STAMP = re.compile(r"-(\d{8}T\d{6}Z)\.dump(?:\.json)?\Z")


def dump_key(database: str, started_at: datetime) -> str:
    moment = started_at.astimezone(UTC)
    day = moment.strftime("%Y/%m/%d")
    return f"{database}/{day}/{database}-{utc_stamp(moment)}{DUMP_SUFFIX}"


def manifest_key(dump: str) -> str:
    return dump + ".json"


def taken_at(key: str) -> datetime | None:
    """The start time in a backup object's name; None for a name that is not ours."""
    match = _STAMP.search(key)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Backup:
    """One dump and its manifest, as the store holds them (either may be missing)."""

    key: str
    taken_at: datetime
    dump: ObjectInfo | None
    manifest: BackupManifest | None
    manifest_present: bool
    manifest_error: str | None = None

    @property
    def complete(self) -> bool:
        return self.dump is not None and self.manifest is not None

    @property
    def verified(self) -> bool:
        return self.complete and self.manifest is not None and self.manifest.verified


async def list_backups(store: ObjectStore, database: str) -> list[Backup]:
    """Every backup of ``database`` in the store, oldest first."""
    objects = await store.list(f"{database}/")
    dumps = {o.key: o for o in objects if o.key.endswith(DUMP_SUFFIX)}
    manifests = {o.key[: -len(".json")] for o in objects if o.key.endswith(MANIFEST_SUFFIX)}
    keys = sorted(k for k in dumps.keys() | manifests if taken_at(k) is not None)
    read = await asyncio.gather(*(_manifest(store, k) for k in keys if k in manifests))
    parsed = dict(zip([k for k in keys if k in manifests], read, strict=True))
    backups = []
    for key in keys:
        manifest, error = parsed.get(key, (None, None))
        moment = taken_at(key)
        assert moment is not None
        backups.append(Backup(key, moment, dumps.get(key), manifest, key in manifests, error))
    return sorted(backups, key=lambda b: (b.taken_at, b.key))


async def _manifest(store: ObjectStore, dump: str) -> tuple[BackupManifest | None, str | None]:
    try:
        return parse_manifest(await store.read_bytes(manifest_key(dump))), None
    except ObjectNotFoundError:
        return None, "manifest deleted while listing"
    except ValidationError as error:
        log.warning("unreadable backup manifest", extra={"key": dump, "error": str(error)[:500]})
        return None, f"unreadable manifest: {error.errors()[0]['msg']}"


def latest_verified(backups: list[Backup]) -> Backup | None:
    verified = [b for b in backups if b.verified]
    return verified[-1] if verified else None


async def choose(store: ObjectStore, database: str, object_uri: str | None, latest: bool) -> Backup:
    """The backup an operator named (``--object URI``) or the newest verified one."""
    backups = await list_backups(store, database)
    if object_uri is not None:
        key = store.key_of(object_uri)
        if key.endswith(".json"):
            key = key[: -len(".json")]
        for backup in backups:
            if backup.key == key:
                if not backup.complete:
                    raise MaintenanceError(f"{object_uri} is not a complete backup (no manifest)")
                return backup
        raise MaintenanceError(f"no backup at {object_uri}")
    if not latest:
        raise ValueError("name a backup with --object URI, or pass --latest")
    chosen = latest_verified(backups)
    if chosen is None:
        raise MaintenanceError(f"no verified backup of {database} in {store.url}")
    return chosen
