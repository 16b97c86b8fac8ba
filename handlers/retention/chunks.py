"""Archive objects that no committed chunk vouches for, swept before a run starts.

An object is part of the archive only once ``archive_chunks`` records it as
``archived``, in the same transaction that deleted its rows (or dropped its month).
Anything else under the archive's table prefixes was left by a run that died between
writing an object and that commit: its rows are still in their table, and a later
run exports them again (under the same name, or another if the rows changed). Such
objects are deleted, so that every row is in exactly one archive object.
"""

from __future__ import annotations

import logging
from typing import Any

from handlers.retention.tables import TABLES
from worker.storage.objects import ObjectStore

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl.gz.json", ".jsonl.gz")


def _object_of(key: str) -> str | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".jsonl.gz"
    return None


async def sweep_unrecorded(conn: Any, store: ObjectStore) -> int:
    """Delete every archive object (and manifest) not recorded as archived; how many."""
    archived = {
        row["object_key"]
        for row in await conn.fetch(
            "SELECT object_key FROM archive_chunks WHERE state = 'archived'"
        )
    }
    removed = 0
    for table in TABLES:
        for info in await store.list(f"{table}/"):
            owner = _object_of(info.key)
            if owner is not None and owner not in archived:
                await store.delete(info.key)
                removed += 1
    await conn.execute("DELETE FROM archive_chunks WHERE state <> 'archived'")
    if removed:
        log.warning("unrecorded archive objects removed", extra={"objects": removed})
    return removed
