"""The object store on a local (or mounted) file system: ``file://path``.

An object is a regular file under the root; its key is its path relative to the
root. A write streams into a hidden ``.{name}.partial-{hex}`` file beside its
destination, is fsynced, then published by an atomic rename (``overwrite``) or a
hard link (otherwise: a concurrent writer's object is never replaced, and the file
system needs hard links). No key segment starts with ``.``, so a partial file never
collides with an object, and ``list`` never shows one.

The key rules (``check_key``, ``check_prefix``) are those of every store, so that a
backup can move between ``file://`` and ``gs://``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

from worker.exceptions import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from worker.storage.objects import (
    READ_CHUNK_BYTES,
    ObjectInfo,
    ObjectWriter,
    check_key,
    check_prefix,
    utc_cutoff,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "file://"
# Writes reach the disk (in a worker thread) in pieces of at least this size: small
# chunks from the caller are gathered first, so a thread hop is never paid per line.
WRITE_BUFFER_BYTES = 1024 * 1024
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-[0-9a-f]{32}")
# A read of a name that is a directory, or under a file, finds no object either.
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def _translate(error: OSError, action: str, *, missing: bool) -> ObjectStoreError:
    if missing and error.errno in _MISSING:
        return ObjectNotFoundError(f"{action}: no such object")
    name = errno.errorcode.get(error.errno or 0, "error")
    return ObjectStoreError(f"{action}: {error.strerror or error} ({name}, {error.filename})")


async def _io(action: str, work: Callable[[], T], *, missing: bool = False) -> T:
    """``work()`` in a worker thread, its ``OSError`` translated."""
    try:
        return await asyncio.to_thread(work)
    except OSError as error:
        raise _translate(error, action, missing=missing) from error


def _open_for_read(path: Path) -> BinaryIO:
    return open(path, "rb", buffering=0)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartialFile:
    """The hidden file one ``create`` writes, committed or discarded.

    Its file operations run in worker threads; a lock keeps them in order, so a
    discard after a cancelled write waits until that write's thread has finished
    with the descriptor.
    """

    def __init__(self, path: Path, uri: str, overwrite: bool) -> None:
        self.path = path
        self.uri = uri
        self.overwrite = overwrite
        self.temp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._buffer = bytearray()
        self._ended = False

    def open(self) -> None:
        with self._lock:
            if not self.overwrite and os.path.lexists(self.path):
                raise ObjectExistsError(f"{self.uri} exists already")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    async def write(self, chunk: bytes) -> None:
        if self._ended:
            raise ValueError(f"{self.uri}: write after its create block ended")
        if not self._buffer and len(chunk) >= WRITE_BUFFER_BYTES:
            await _io(f"writing {self.uri}", lambda: self._write(chunk))
            return
        self._buffer += chunk
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            data, self._buffer = self._buffer, bytearray()
            await _io(f"writing {self.uri}", lambda: self._write(data))

    def _write(self, data: bytes | bytearray) -> None:
        with self._lock:
            self._write_locked(data)

    def _write_locked(self, data: bytes | bytearray) -> None:
        if self._fd is None:
            raise ValueError(f"{self.uri}: write after its create block ended")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def commit(self) -> None:
        self._ended = True
        data, self._buffer = self._buffer, bytearray()
        await _io(f"writing {self.uri}", lambda: self._commit(data))

    def _commit(self, tail: bytearray) -> None:
        with self._lock:
            self._write_locked(tail)
            fd, self._fd = self._fd, None
            assert fd is not None  # _write_locked checked it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.overwrite:
                os.replace(self.temp, self.path)
            else:
                try:
                    os.link(self.temp, self.path)
                except FileExistsError:
                    raise ObjectExistsError(f"{self.uri} exists already") from None
                os.unlink(self.temp)
            _fsync_directory(self.path.parent)

    def discard(self) -> None:
        """Close and remove the partial file; never raises (the caller's error matters)."""
        self._ended = True
        with self._lock:
            try:
                if self._fd is not None:
                    fd, self._fd = self._fd, None
                    os.close(fd)
                self.temp.unlink(missing_ok=True)
            except OSError as error:
                log.warning(
                    "could not remove a partial object file",
                    extra={"path": str(self.temp), "error": repr(error)},
                )


def _scan(root: Path, prefix: str, *, partials: bool) -> list[tuple[str, Path, os.stat_result]]:
    """(key, path, stat) of the committed objects (or, with ``partials``, of the
    partial files, by the key they were writing) whose key starts with ``prefix``."""
    head = prefix.rpartition("/")[0]
    stack = [(root.joinpath(*head.split("/")) if head else root, head)]
    found: list[tuple[str, Path, os.stat_result]] = []
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = entry.name
            if entry.is_dir(follow_symlinks=False):
                sub = f"{rel}/{name}" if rel else name
                if not name.startswith(".") and (
                    f"{sub}/".startswith(prefix) or prefix.startswith(f"{sub}/")
                ):
                    stack.append((Path(entry.path), sub))
                continue
            if partials:
                match = _PARTIAL.fullmatch(name)
                if match is None:
                    continue
                name = match["name"]
            elif name.startswith("."):
                continue
            key = f"{rel}/{name}" if rel else name
            if not key.startswith(prefix):
                continue
            try:
                if entry.is_file():
                    found.append((key, Path(entry.path), entry.stat()))
            except FileNotFoundError:
                continue  # deleted while we looked
    return sorted(found, key=lambda item: item[0])


class FileStore:
    """Objects as files under one root directory (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(os.path.abspath(root))
        self._url = SCHEME + self._root.as_posix()
        self._base = self._url if self._url.endswith("/") else self._url + "/"

    @classmethod
    def from_url(cls, url: str) -> FileStore:
        """``file://relative/path`` (from the current directory) or ``file:///abs/path``.

        The path is taken as it is written (no host part, no percent-decoding).
        """
        if not url.startswith(SCHEME) or len(url) == len(SCHEME):
            raise ValueError(f"a file store URL is file://path, got {url!r}")
        return cls(url[len(SCHEME) :])

    @property
    def url(self) -> str:
        return self._url

    @property
    def root(self) -> Path:
        return self._root

    def uri(self, key: str) -> str:
        return self._base + check_key(key)

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self._base):
            raise ValueError(f"{uri!r} is not in the store {self._url}")
        return check_key(uri[len(self._base) :])

    def path_of(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``."""
        return self._root.joinpath(*check_key(key).split("/"))

    @asynccontextmanager
    async def create(self, key: str, *, overwrite: bool = False) -> AsyncIterator[ObjectWriter]:
        partial = _PartialFile(self.path_of(key), self.uri(key), overwrite)
        await _io(f"creating {partial.uri}", partial.open)
        try:
            yield partial
            await partial.commit()
        except BaseException:
            # In a thread too: it waits for a write still running in one (cancelled).
            await asyncio.to_thread(partial.discard)
            raise

    async def read(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        path, action = self.path_of(key), f"reading {self.uri(key)}"
        file = await _io(action, lambda: _open_for_read(path), missing=True)
        try:
            while chunk := await _io(action, lambda: file.read(chunk_bytes)):
                yield chunk
        finally:
            file.close()  # inline: closing a file opened for reading does not block

    async def read_bytes(self, key: str) -> bytes:
        path = self.path_of(key)
        return await _io(f"reading {self.uri(key)}", path.read_bytes, missing=True)

    async def write_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        async with self.create(key, overwrite=overwrite) as writer:
            await writer.write(data)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        found = await _io(
            f"listing {self._base}{prefix}", lambda: _scan(self._root, prefix, partials=False)
        )
        return [
            ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))
            for key, _, stat in found
        ]

    async def delete(self, key: str) -> None:
        path = self.path_of(key)

        def unlink() -> None:
            try:
                path.unlink()
            except OSError as error:
                if error.errno not in _MISSING:
                    raise

        await _io(f"deleting {self.uri(key)}", unlink)

    async def sweep_incomplete(self, prefix: str, older_than: datetime) -> int:
        """Remove the partial files of interrupted writes under ``prefix`` whose last
        write (mtime) is before ``older_than``; returns how many went."""
        check_prefix(prefix)
        cutoff_s = utc_cutoff(older_than).timestamp()

        def sweep() -> int:
            removed = 0
            for _, path, stat in _scan(self._root, prefix, partials=True):
                if stat.st_mtime < cutoff_s:
                    path.unlink(missing_ok=True)
                    removed += 1
            return removed

        count = await _io(f"sweeping {self._base}{prefix}", sweep)
        if count:
            log.info("partial objects swept", extra={"store": self._url, "count": count})
        return count

    def close(self) -> None:
        """Nothing to release (here for symmetry with ``GcsStore.close``)."""
