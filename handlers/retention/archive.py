"""Archive objects: gzip JSON lines and their manifest, written, read back, checked.

``{table}/{YYYY}/{MM}/{table}-{first key}-{last key}.jsonl.gz`` (the month of its first
row) and ``....jsonl.gz.json`` beside it. Names depend only on the rows' keys, and the
bytes only on the rows (gzip without a time stamp, its input cut the same way; with
another build of the compressor they may differ, which nothing relies on): a rerun of
the same range writes the same object over itself, never a second copy.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from isal import isal_zlib
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from handlers.retention.tables import TableSpec, edge_key
from worker.exceptions import MaintenanceError
from worker.storage.objects import ObjectStore

T = TypeVar("T")

# ISA-L's deflate, not zlib's: any gzip reader opens its streams, and it compresses and
# inflates several times faster, which is most of an archive's CPU (README, retention).
# Its level 1 keeps zlib level 3's ratio on archive lines.
GZIP_LEVEL = 1
GZIP_WBITS = 31  # a gzip stream: header and trailer, no file name, time stamp 0
_ANY_WBITS = 47  # inflate a zlib or gzip stream, whichever the header says


class ArchiveManifest(BaseModel):
    """What an archive object holds (CONTRACT.md: rows, sha256, key range, run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    object: str
    table: str
    rows: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int
    first_key: str
    last_key: str
    first_at: AwareDatetime
    last_at: AwareDatetime
    run: str


def object_key(table: TableSpec, first_at: datetime, first_key: str, last_key: str) -> str:
    return f"{table.name}/{first_at:%Y}/{first_at:%m}/{table.name}-{first_key}-{last_key}.jsonl.gz"


def manifest_key(key: str) -> str:
    return key + ".json"


# One thread for the archive's CPU work: compression is serial anyway, and every extra
# thread would keep a malloc arena of its own (tens of MB of RSS after a large run).
_CPU = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-gzip")


async def off_loop(work: Callable[[bytes], T], data: bytes) -> T:
    """``work(data)`` on the archive's thread."""
    return await asyncio.get_running_loop().run_in_executor(_CPU, work, data)


def gzip_lines(raw: bytes) -> bytes:
    """``raw`` archive lines as a gzip stream (CPU-bound: call it in a thread)."""
    compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
    return compressor.compress(raw) + compressor.flush()


def count_lines(data: bytes) -> int:
    """Lines in a gzip stream of archive lines (CPU-bound: call it in a thread),
    decompressed a slice at a time (never the whole chunk's text at once)."""
    decompressor = isal_zlib.decompressobj(_ANY_WBITS)
    lines = 0
    for start in range(0, len(data), 256 * 1024):
        lines += decompressor.decompress(data[start : start + 256 * 1024]).count(b"\n")
    return lines + decompressor.flush().count(b"\n")


class Gzipper:
    """Gathers archive lines as COPY streams them; ``finish`` compresses them in a
    thread, so the event loop (heartbeats, ingestion in the same process) never waits."""

    def __init__(self) -> None:
        self._raw = bytearray()
        self.lines = 0

    async def feed(self, data: bytes) -> None:
        self.lines += data.count(b"\n")
        self._raw += data

    async def finish(self) -> bytes:
        return await off_loop(gzip_lines, bytes(self._raw))


@dataclass(frozen=True)
class Exported:
    key: str
    manifest: ArchiveManifest


async def write(
    store: ObjectStore,
    table: TableSpec,
    data: bytes,
    rows: int,
    edges: tuple[tuple[datetime, object], tuple[datetime, object]],
    run: str,
) -> Exported:
    """Store a chunk's object, then its manifest (both overwritten on a rerun)."""
    (first_at, first_id), (last_at, last_id) = edges
    first_key = edge_key(first_at, first_id)  # type: ignore[arg-type]
    last_key = edge_key(last_at, last_id)  # type: ignore[arg-type]
    key = object_key(table, first_at, first_key, last_key)
    manifest = ArchiveManifest(
        object=store.uri(key),
        table=table.name,
        rows=rows,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        first_key=first_key,
        last_key=last_key,
        first_at=first_at,
        last_at=last_at,
        run=run,
    )
    await store.write_bytes(key, data, overwrite=True)
    await store.write_bytes(
        manifest_key(key), manifest.model_dump_json(indent=2).encode(), overwrite=True
    )
    return Exported(key, manifest)


async def read_back(store: ObjectStore, exported: Exported) -> None:
    """Raise ``MaintenanceError`` unless the stored object and manifest are the ones
    written: same manifest, same sha256, as many lines as rows."""
    uri = store.uri(exported.key)
    stored = ArchiveManifest.model_validate_json(await store.read_bytes(manifest_key(exported.key)))
    if stored != exported.manifest:
        raise MaintenanceError(f"archive {uri}: the stored manifest differs from the one written")
    data = await store.read_bytes(exported.key)
    digest = hashlib.sha256(data).hexdigest()
    if digest != exported.manifest.sha256:
        raise MaintenanceError(
            f"archive {uri}: sha256 is {digest}, written {exported.manifest.sha256}"
        )
    lines = await off_loop(count_lines, data)
    if lines != exported.manifest.rows:
        raise MaintenanceError(
            f"archive {uri}: {lines} lines read back, {exported.manifest.rows} written"
        )
