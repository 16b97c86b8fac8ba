"""The object store contract, run on both stores: ``FileStore`` (a temporary directory)
and ``GcsStore`` (a fresh bucket of the Cloud Storage emulator, under a prefix).

What only one store has (key files on disk, partial files and their sweep) is
tested on that store alone, at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.object_stores import drop_bucket, fresh_bucket_store
from worker.exceptions import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from worker.storage.object_files import FileStore
from worker.storage.object_gcs import UPLOAD_CHUNK_BYTES, GcsStore
from worker.storage.objects import READ_CHUNK_BYTES, ObjectStore, open_store

MiB = 1024 * 1024
# Larger than one upload chunk: on Cloud Storage, a resumable upload, not one request.
LARGE = UPLOAD_CHUNK_BYTES + MiB
BAD_KEYS = ["", "/abs", "a//b", "a/", "../x", "a/../b", "./a", ".hidden", "a/.b", "a\\b"]


class Boom(Exception):
    pass


@pytest_asyncio.fixture(params=["file", "gcs"], loop_scope="session")
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "file":
        yield FileStore(tmp_path / "objects")
        return
    gcs = await fresh_bucket_store("backups/test")
    try:
        yield gcs
    finally:
        await drop_bucket(gcs)


async def read_all(store: ObjectStore, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, chunk_bytes)])


async def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [info.key for info in await store.list(prefix)]


async def test_small_object_round_trip(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(minutes=1)
    await store.write_bytes("manifests/2026/run.json", b'{"ok": true}')

    assert await store.read_bytes("manifests/2026/run.json") == b'{"ok": true}'
    assert await read_all(store, "manifests/2026/run.json", chunk_bytes=3) == b'{"ok": true}'
    [info] = await store.list()
    assert (info.key, info.size_bytes) == ("manifests/2026/run.json", 12)
    assert before < info.updated_at < datetime.now(UTC) + timedelta(minutes=1)


async def test_a_streamed_object_round_trips_in_bounded_chunks(store: ObjectStore) -> None:
    written = hashlib.sha256()
    async with store.create("dumps/big.bin") as writer:
        for _ in range(20):
            chunk = os.urandom(MiB)
            written.update(chunk)
            await writer.write(chunk)

    read = hashlib.sha256()
    sizes = []
    async for chunk in store.read("dumps/big.bin"):
        read.update(chunk)
        sizes.append(len(chunk))
    assert read.hexdigest() == written.hexdigest()
    assert sum(sizes) == 20 * MiB and max(sizes) <= READ_CHUNK_BYTES
    assert [(i.key, i.size_bytes) for i in await store.list()] == [("dumps/big.bin", 20 * MiB)]


async def test_an_empty_object_is_an_object(store: ObjectStore) -> None:
    async with store.create("empty"):
        pass
    assert await store.read_bytes("empty") == b""
    assert await read_all(store, "empty") == b""
    assert [(i.key, i.size_bytes) for i in await store.list()] == [("empty", 0)]


@pytest.mark.parametrize("size", [10, LARGE], ids=["small", "resumable"])
async def test_an_exception_in_create_leaves_nothing(store: ObjectStore, size: int) -> None:
    with pytest.raises(Boom):
        async with store.create("dumps/broken.bin") as writer:
            await writer.write(b"x" * size)
            raise Boom

    assert await store.list() == []
    with pytest.raises(ObjectNotFoundError):
        await store.read_bytes("dumps/broken.bin")
    if isinstance(store, FileStore):
        assert [p for p in store.root.rglob("*") if p.is_file()] == []


async def test_a_cancelled_write_leaves_nothing(store: ObjectStore) -> None:
    started = asyncio.Event()

    async def write_forever() -> None:
        async with store.create("dumps/cancelled.bin") as writer:
            await writer.write(b"y" * LARGE)
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(write_forever())
    await asyncio.wait_for(started.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.list() == []
    if isinstance(store, FileStore):
        assert [p for p in store.root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("size", [10, LARGE], ids=["small", "resumable"])
async def test_no_overwrite_refuses_an_existing_key(store: ObjectStore, size: int) -> None:
    await store.write_bytes("k", b"old")

    with pytest.raises(ObjectExistsError):
        await store.write_bytes("k", b"n" * size)
    with pytest.raises(ObjectExistsError):
        async with store.create("k") as writer:
            await writer.write(b"n" * size)
    assert await store.read_bytes("k") == b"old"
    assert await keys(store) == ["k"]


async def test_no_overwrite_refuses_an_object_created_during_the_write(store: ObjectStore) -> None:
    # Only an object within one upload chunk: the emulator does not enforce
    # ifGenerationMatch on resumable uploads (Cloud Storage does).
    with pytest.raises(ObjectExistsError):
        async with store.create("k") as writer:
            await writer.write(b"second")
            await store.write_bytes("k", b"first")
    assert await store.read_bytes("k") == b"first"
    assert await keys(store) == ["k"]


@pytest.mark.parametrize("size", [10, LARGE], ids=["small", "resumable"])
async def test_overwrite_replaces(store: ObjectStore, size: int) -> None:
    await store.write_bytes("k", b"old")
    new = os.urandom(size)

    async with store.create("k", overwrite=True) as writer:
        await writer.write(new)
    assert await read_all(store, "k") == new
    await store.write_bytes("k", b"newest", overwrite=True)
    assert await store.read_bytes("k") == b"newest"
    assert await keys(store) == ["k"]


async def test_delete_is_idempotent(store: ObjectStore) -> None:
    await store.write_bytes("a/k", b"data")
    await store.write_bytes("a/kept", b"data")

    await store.delete("a/k")
    await store.delete("a/k")
    await store.delete("never/was")
    assert await keys(store) == ["a/kept"]
    with pytest.raises(ObjectNotFoundError):
        await store.read_bytes("a/k")


async def test_reading_a_missing_key_raises_not_found(store: ObjectStore) -> None:
    await store.write_bytes("a/b", b"data")
    for key in ("missing", "a", "a/b/c"):
        with pytest.raises(ObjectNotFoundError):
            await store.read_bytes(key)
        with pytest.raises(ObjectNotFoundError):
            await read_all(store, key)


async def test_list_by_prefix_sorted(store: ObjectStore) -> None:
    names = ["b/2", "a/1", "b/10", "b/1", "c", "bb/x", "b/sub/deep"]
    for name in names:
        await store.write_bytes(name, name.encode())

    assert await keys(store) == sorted(names)
    assert await keys(store, "b/") == ["b/1", "b/10", "b/2", "b/sub/deep"]
    assert await keys(store, "b") == ["b/1", "b/10", "b/2", "b/sub/deep", "bb/x"]
    assert await keys(store, "b/1") == ["b/1", "b/10"]
    assert await keys(store, "b/sub/") == ["b/sub/deep"]
    assert await keys(store, "nothing/") == []
    sizes = {info.key: info.size_bytes for info in await store.list()}
    assert sizes == {name: len(name) for name in names}


async def test_uri_and_key_of_round_trip(store: ObjectStore) -> None:
    key = "backups/2026-11-27/metrics.dump"
    uri = store.uri(key)

    assert uri == f"{store.url}/{key}"
    assert store.key_of(uri) == key
    assert open_store(store.url).uri(key) == uri
    await store.write_bytes(key, b"x")
    assert [store.uri(info.key) for info in await store.list()] == [uri]
    for foreign in (
        f"{store.url}x/{key}",  # a sibling root that shares the root's spelling
        f"{store.url}/../{key}",
        f"{store.url}/",
        store.url,
        "gs://elsewhere/backups/x",
        "file:///elsewhere/x",
    ):
        with pytest.raises(ValueError):
            store.key_of(foreign)


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.read_bytes(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        store.uri(key)
    assert await store.list() == []


@pytest.mark.parametrize("prefix", ["/", "../", "a//", "a/../"])
async def test_bad_prefixes_are_refused(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        await store.list(prefix)
    with pytest.raises(ValueError):
        await store.sweep_incomplete(prefix, datetime.now(UTC))


async def test_sweep_never_touches_a_committed_object(store: ObjectStore) -> None:
    await store.write_bytes("a/k", b"data")
    assert await store.sweep_incomplete("", datetime.now(UTC) + timedelta(days=1)) == 0
    assert await store.read_bytes("a/k") == b"data"
    with pytest.raises(ValueError):
        await store.sweep_incomplete("", datetime.now())  # naive: ambiguous


def test_open_store_picks_the_store_by_scheme(tmp_path: Path) -> None:
    files = open_store(f"file://{tmp_path}/objects")
    assert isinstance(files, FileStore) and files.url == f"file://{tmp_path}/objects"
    relative = open_store("file://./var/backups")
    assert isinstance(relative, FileStore)
    assert relative.url == f"file://{Path.cwd()}/var/backups"
    assert open_store("file://var/backups").url == relative.url
    gcs = open_store("gs://bucket/backups/prod/")
    assert isinstance(gcs, GcsStore) and gcs.url == "gs://bucket/backups/prod"
    assert open_store("gs://bucket").uri("k") == "gs://bucket/k"
    for url in ("s3://bucket/x", "/var/backups", "http://host/x", "file://", "gs://", "gs://B"):
        with pytest.raises(ValueError):
            open_store(url)


# What only the file store has.


async def test_file_store_keys_stay_under_the_root(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "objects")
    await store.write_bytes("a/b/c.txt", b"data")

    assert (tmp_path / "objects" / "a" / "b" / "c.txt").read_bytes() == b"data"
    assert store.key_of(f"file://{tmp_path}/objects/a/b/c.txt") == "a/b/c.txt"
    with pytest.raises(ValueError):
        store.key_of(f"file://{tmp_path}/objects/../outside")
    assert os.listdir(tmp_path) == ["objects"]


def partial_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.partial-*"))


async def test_a_write_in_progress_is_invisible(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    async with store.create("a/k") as writer:
        await writer.write(b"z" * (2 * MiB))
        assert await store.list() == []
        assert [p.parent for p in partial_files(tmp_path)] == [tmp_path / "a"]
        # Young: a sweep with an older cutoff leaves it to its writer.
        assert await store.sweep_incomplete("", datetime.now(UTC) - timedelta(hours=1)) == 0
    assert partial_files(tmp_path) == []
    assert [(i.key, i.size_bytes) for i in await store.list()] == [("a/k", 2 * MiB)]


async def test_sweep_removes_only_old_partial_files_under_the_prefix(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.write_bytes("a/old-object", b"committed")
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    leftovers = {
        "a": tmp_path / "a" / f".k.partial-{'0' * 32}",
        "b": tmp_path / "b" / f".k.partial-{'1' * 32}",
    }
    for path in [*leftovers.values(), tmp_path / "a" / ".keep"]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
        os.utime(path, (two_hours_ago, two_hours_ago))
    os.utime(tmp_path / "a" / "old-object", (two_hours_ago, two_hours_ago))

    assert await keys(store) == ["a/old-object"]
    three_hours_ago = datetime.now(UTC) - timedelta(hours=3)
    assert await store.sweep_incomplete("", three_hours_ago) == 0
    assert partial_files(tmp_path) == sorted(leftovers.values())

    one_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    assert await store.sweep_incomplete("a/k", one_hour_ago) == 1
    assert partial_files(tmp_path) == [leftovers["b"]]
    assert await store.sweep_incomplete("", one_hour_ago) == 1
    assert partial_files(tmp_path) == []
    assert (tmp_path / "a" / ".keep").exists()
    assert await store.read_bytes("a/old-object") == b"committed"


async def test_a_write_whose_partial_file_was_swept_fails(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ObjectStoreError):
        async with store.create("k") as writer:
            await writer.write(b"slow")
            [partial] = partial_files(tmp_path)
            os.utime(partial, (0, 0))
            assert await store.sweep_incomplete("", datetime.now(UTC)) == 1
    assert await store.list() == []
    assert partial_files(tmp_path) == []
